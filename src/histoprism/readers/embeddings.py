"""Embedding files: ours / HEST-bench (``features``|``embeddings``, ``coords``, ``barcodes``) and
TRIDENT/CLAM (``features``, ``coords`` = patch top-left corner, attr ``patch_size_level0``), and
HistoPrism repository ``{id}_embeddings.pt`` (barcode -> 1-D tensor; no coordinates). Ours are
written by ``write_embeddings`` only (``histoprism extract`` and the synthetic cohort)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import keys
from ..errors import InputError
from ..io import atomic_path

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


def _decode(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind in ("S", "O"):
        return np.array([b.decode() if isinstance(b, bytes) else str(b) for b in arr], dtype=object)
    return arr.astype(str).astype(object)


def _first(h5: h5py.File, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in h5), None)


def read_embeddings(path: str | Path) -> EmbeddingFile:
    """Read one embedding file and validate it (finite, 2-D, one coordinate pair per row).

    A ``.pt`` file goes to ``read_torch_embeddings``; anything else is read as HDF5. TRIDENT files
    store the patch's top-left corner; with ``patch_size_level0`` known, it is shifted by half a
    patch to the centre so every reader returns spot centres.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return read_torch_embeddings(path)
    if not path.exists():
        raise InputError("embedding file not found", path)
    try:
        with h5py.File(path, "r") as h5:
            fname = _first(h5, (keys.H5_FEATURES, *keys.H5_FEATURES_ALT))
            if fname is None:
                raise InputError(f"no '{keys.H5_FEATURES}' or 'embeddings' dataset", path)
            features = np.asarray(h5[fname][...], dtype=np.float32)
            coords = (
                np.asarray(h5[keys.H5_COORDS][...], dtype=np.float64)
                if keys.H5_COORDS in h5
                else None
            )
            bname = _first(h5, (keys.H5_BARCODES, *keys.H5_BARCODES_ALT))
            barcodes = _decode(h5[bname][...]) if bname else None
            patch0 = (
                h5[keys.H5_COORDS].attrs.get("patch_size_level0") if coords is not None else None
            )
    except OSError as exc:
        raise InputError(f"cannot read as HDF5 ({exc})", path) from exc
    features = features.reshape(features.shape[0], -1) if features.ndim == 3 else features
    _check(features, coords, barcodes, path)
    if coords is None:
        coords = np.full((features.shape[0], 2), np.nan)
    elif barcodes is None and patch0 is not None:
        coords = coords + float(patch0) / 2.0
    return EmbeddingFile(features=features, coords=coords[:, :2], barcodes=barcodes, path=path)


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load as a weights-only torch file ({first})", path) from exc
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
    return _decode(np.array(barcodes, dtype=object)), rows


def _check(features, coords, barcodes, path: Path) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise InputError(f"features have shape {features.shape}, expected (N, D) with N > 0", path)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} of {len(features)} embeddings contain NaN/inf", path)
    n = features.shape[0]
    if coords is not None and coords.shape[0] != n:
        raise InputError(f"{coords.shape[0]} coords for {n} embeddings", path)
    if barcodes is not None:
        if len(barcodes) != n:
            raise InputError(f"{len(barcodes)} barcodes for {n} embeddings", path)
        uniq, counts = np.unique(barcodes.astype(str), return_counts=True)
        if (counts > 1).any():
            raise InputError(f"duplicate barcode '{uniq[counts > 1][0]}' in embeddings", path)
    if barcodes is None and coords is None:
        raise InputError("neither barcodes nor coords: cannot match embeddings to spots", path)
