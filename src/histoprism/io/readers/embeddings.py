"""Embedding files: ours / HEST-bench (``features``|``embeddings``, ``coords``, ``barcodes``) and
TRIDENT/CLAM (``features``, ``coords`` = patch top-left corner, attr ``patch_size_level0``), and
HistoPrism repository ``{id}_embeddings.pt`` (barcode -> 1-D tensor; no coordinates). Ours are
written by ``write_embeddings`` only (``histoprism extract`` and the synthetic cohort)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..._core import keys
from ..._core.errors import InputError, first_line
from ..._core.files import atomic_path
from .hdf5 import check_file, positive_attribute

COORDS_ARE = "spot centres, level-0 px (x, y)"  # value of the ``coords_are`` attribute we write


@dataclass
class EmbeddingFile:
    """One slide's patch embeddings.

    features: (N, D) float32.  coords: (N, 2) float64 spot centres, level-0 pixels (x, y).
    barcodes: (N,) str, or None when the file has none (TRIDENT) and spots must be matched by position.
    """

    features: np.ndarray
    coords: np.ndarray
    barcodes: np.ndarray | None
    path: Path


MAX_SPOTS = 20_000_000  # Visium HD 2 µm bins of a whole slide are ~11 M
MAX_DIM = 65_536  # the widest foundation-model embeddings are a few thousand
MAX_ABS_FEATURE = 1e6  # beyond this, float32 arithmetic in the model overflows


def _decode(arr: np.ndarray, path: Path) -> np.ndarray:
    """(N,) str barcodes from bytes/str/number arrays; InputError for undecodable bytes."""
    arr = np.asarray(arr).reshape(-1)
    try:
        if arr.dtype.kind in ("S", "O"):
            return np.array(
                [b.decode() if isinstance(b, bytes) else str(b) for b in arr], dtype=object
            )
    except UnicodeDecodeError as exc:
        raise InputError(f"barcodes are not UTF-8 text ({exc.reason})", path) from exc
    if arr.dtype.kind not in "iuU":
        raise InputError(f"barcodes have dtype {arr.dtype}, expected text", path)
    return arr.astype(str).astype(object)


def _first(h5: h5py.File, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in h5), None)


def _dataset(h5: h5py.File, name: str, kinds: str, path: Path) -> h5py.Dataset:
    """``h5[name]`` after checking, without reading it, that it is a dataset of a numeric
    ``kinds`` dtype (numpy kind letters) shaped like a slide's spots. (Declared sizes against the
    bytes on disk: ``check_file``, which ``read_embeddings`` runs first.)"""
    ds = h5[name]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"'{name}' is a {type(ds).__name__}, expected a dataset", path)
    if ds.dtype.kind not in kinds:
        raise InputError(f"'{name}' has dtype {ds.dtype}, expected numbers", path)
    shape = ds.shape or ()
    if len(shape) == 0 or shape[0] > MAX_SPOTS or int(np.prod(shape[1:], dtype=np.int64)) > MAX_DIM:
        raise InputError(f"'{name}' declares shape {shape}: not a slide's spots", path)
    return ds


def read_embeddings(path: str | Path) -> EmbeddingFile:
    """Read one embedding file and validate it (finite, 2-D, one coordinate pair per row).

    A ``.pt`` file goes to ``read_torch_embeddings``; anything else is read as HDF5. TRIDENT files
    store the patch's top-left corner; with ``patch_size_level0`` known, it is shifted by half a
    patch to the centre so every reader returns spot centres. Shapes and dtypes are checked
    against each other and against the bytes on disk before any array is read.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return read_torch_embeddings(path)
    if not path.exists():
        raise InputError("embedding file not found", path)
    check_file(path)  # a damaged file can crash or hang HDF5: checked in a child process first
    try:
        with h5py.File(path, "r") as h5:
            features, coords, barcodes, patch0 = _read_h5(h5, path)
    except InputError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError ... on damaged files
        raise InputError(f"cannot read as HDF5 ({first_line(exc)})", path) from exc
    _check(features, coords, barcodes, path)
    if coords is None:
        coords = np.full((features.shape[0], 2), np.nan)
    elif barcodes is None and patch0 is not None:
        coords = coords + patch0 / 2.0
    return EmbeddingFile(features=features, coords=coords[:, :2], barcodes=barcodes, path=path)


def _read_h5(h5: h5py.File, path: Path):
    """(features (N, D) float32, coords (N, >=2) float64 or None, barcodes (N,) or None,
    TRIDENT patch size in level-0 px or None), each checked before it is read."""
    fname = _first(h5, (keys.H5_FEATURES, *keys.H5_FEATURES_ALT))
    if fname is None:
        raise InputError(f"no '{keys.H5_FEATURES}' or 'embeddings' dataset", path)
    fds = _dataset(h5, fname, "fiu", path)
    if fds.ndim not in (2, 3):
        raise InputError(f"features have shape {fds.shape}, expected (N, D)", path)
    n = fds.shape[0]
    if n == 0 or int(np.prod(fds.shape[1:])) == 0:
        raise InputError(f"features have shape {fds.shape}, expected (N, D) with N > 0", path)
    cds = _dataset(h5, keys.H5_COORDS, "fiu", path) if keys.H5_COORDS in h5 else None
    if cds is not None and (cds.ndim != 2 or cds.shape[0] != n or cds.shape[1] < 2):
        raise InputError(f"coords have shape {cds.shape}, expected ({n}, 2)", path)
    bname = _first(h5, (keys.H5_BARCODES, *keys.H5_BARCODES_ALT))
    bds = _dataset(h5, bname, "SOUiu", path) if bname else None
    if bds is not None and int(np.prod(bds.shape)) != n:
        raise InputError(f"{int(np.prod(bds.shape))} barcodes for {n} embeddings", path)
    features = np.asarray(fds[...], dtype=np.float32)
    features = features.reshape(n, -1)
    coords = np.asarray(cds[...], dtype=np.float64) if cds is not None else None
    barcodes = _decode(bds[...], path) if bds is not None else None
    patch0 = None
    if cds is not None and "patch_size_level0" in cds.attrs:
        patch0 = positive_attribute(cds.attrs["patch_size_level0"], "patch_size_level0", path)
    return features, coords, barcodes, patch0


def write_embeddings(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    barcodes: np.ndarray,
    **attrs: str | float | int,
) -> Path:
    """Write one slide's embedding file atomically, in the layout ``read_embeddings`` reads back.

    features: (N, D), stored float32.  coords: (N, 2) spot centres, level-0 px (x, y), stored
    float64.  barcodes: (N,) str, stored as UTF-8 bytes.  attrs: file attributes, name (a
    ``keys.H5_ATTR_*``) -> value; ``coords_are`` is always written. Returns ``path``.
    """
    path = Path(path)
    features, coords = np.asarray(features), np.asarray(coords)
    barcodes = np.asarray(barcodes).astype(str)
    n = len(features)
    if features.ndim != 2 or coords.shape != (n, 2) or barcodes.shape != (n,):
        raise ValueError(
            f"features {features.shape}, coords {coords.shape} and barcodes {barcodes.shape} "
            "are not (N, D), (N, 2) and (N,)"
        )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset(keys.H5_FEATURES, data=features.astype(np.float32))
        h5.create_dataset(keys.H5_COORDS, data=coords.astype(np.float64))
        h5.create_dataset(keys.H5_BARCODES, data=np.char.encode(barcodes, "utf-8"))
        for name, value in attrs.items():
            h5.attrs[name] = value
        h5.attrs[keys.H5_ATTR_COORDS_ARE] = COORDS_ARE
    return path


def read_torch_embeddings(path: str | Path) -> EmbeddingFile:
    """Read a HistoPrism repository ``{id}_embeddings.pt`` file.

    The file holds either ``{barcode: (D,) tensor}`` or ``{"embeddings": (N, D) tensor or list of
    (D,) tensors, "barcodes": (N,) list of str}``. It is loaded with ``weights_only=True`` only, so
    a file that needs arbitrary unpickling is refused, never executed.

    Returns an ``EmbeddingFile`` with features (N, D) float32, barcodes (N,) str and coords (N, 2)
    all NaN: these files carry no positions, so spots are matched by barcode.
    """
    import torch  # deferred: reading h5 files must not pay for importing torch

    path = Path(path)
    if not path.exists():
        raise InputError("embedding file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ... on bad files
        raise InputError(
            f"cannot load as a weights-only torch file ({first_line(exc)})", path
        ) from exc
    barcodes, rows = _torch_rows(obj, path)
    dims = {tuple(r.shape) for r in rows}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise InputError(
            f"embeddings must be 1-D tensors of one size, got shapes {sorted(dims)}", path
        )
    features = torch.stack([r.detach().float() for r in rows]).numpy()  # (N, D)
    _check(features, None, barcodes, path)
    coords = np.full((features.shape[0], 2), np.nan)
    return EmbeddingFile(features=features, coords=coords, barcodes=barcodes, path=path)


def _torch_rows(obj, path: Path) -> tuple[np.ndarray, list]:
    """(N,) barcodes and N 1-D tensors from a loaded ``.pt`` object, or InputError."""
    import torch

    if not isinstance(obj, dict) or not obj:
        raise InputError(f"expected a non-empty dict, got {type(obj).__name__}", path)
    if "barcodes" in obj:
        emb = obj.get("embeddings", obj.get(keys.H5_FEATURES))
        if isinstance(emb, torch.Tensor) and emb.ndim == 2:
            rows = list(emb.unbind(0))
        elif isinstance(emb, list | tuple):
            rows = list(emb)
        else:
            raise InputError("'barcodes' given without an (N, D) 'embeddings' tensor", path)
        barcodes = list(obj["barcodes"])
    else:
        barcodes, rows = list(obj.keys()), list(obj.values())
    if not all(isinstance(r, torch.Tensor) for r in rows):
        raise InputError("embeddings must be tensors", path)
    if not all(isinstance(b, str | bytes) for b in barcodes) or len(barcodes) != len(rows):
        raise InputError(f"{len(barcodes)} str barcodes expected for {len(rows)} embeddings", path)
    return _decode(np.array(barcodes, dtype=object), path), rows


def check_features(
    features: np.ndarray, path: Path | None = None, *, what: str = "embeddings"
) -> None:
    """Refuse an (N, D) feature matrix the model cannot use: empty, NaN/inf, or values beyond
    ``MAX_ABS_FEATURE`` (finite float32 that overflows in the first layers)."""
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(f"{what} have shape {features.shape}, expected (N, D) with N > 0", path)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} of {len(features)} {what} contain NaN/inf", path)
    peak = float(np.abs(features).max())
    if peak > MAX_ABS_FEATURE:
        raise InputError(
            f"{what} reach {peak:.3g}: values beyond ±{MAX_ABS_FEATURE:.0e} "
            "are not a foundation model's output",
            path,
        )


def _check(features, coords, barcodes, path: Path) -> None:
    """Refuse what the model cannot use (``check_features``), non-finite coords, counts that
    disagree, duplicate barcodes, no way to place the spots."""
    check_features(features, path)
    n = features.shape[0]
    if coords is not None:
        if coords.shape[0] != n:
            raise InputError(f"{coords.shape[0]} coords for {n} embeddings", path)
        bad = ~np.isfinite(coords[:, :2]).all(axis=1)
        if bad.any():
            raise InputError(f"{int(bad.sum())} of {n} coords are NaN/inf", path)
    if barcodes is not None:
        if len(barcodes) != n:
            raise InputError(f"{len(barcodes)} barcodes for {n} embeddings", path)
        uniq, counts = np.unique(barcodes.astype(str), return_counts=True)
        if (counts > 1).any():
            raise InputError(f"duplicate barcode '{uniq[counts > 1][0]}' in embeddings", path)
    if barcodes is None and coords is None:
        raise InputError("neither barcodes nor coords: cannot match embeddings to spots", path)
