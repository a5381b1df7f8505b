"""HEST-1k sample files beside ``st/{id}.h5ad``: ``patches/{id}.h5`` and ``metadata/{id}.json``.

``patches/{id}.h5`` (as HEST writes it): ``img`` (N, P, P, 3) uint8 patches centred on the spots,
``coords`` (N, 2) int64 top-left corner of each patch in level-0 pixels (x, y), ``barcode`` (N, 1)
bytes. ``img`` carries the patches' pixel size (µm/px, attr ``pixel_size``; 0.5 in HEST-1k). The
top-left corner is the spot centre minus half the patch's level-0 extent, which is
``P * pixel_size / level0_mpp / 2`` (112 px for 224 px patches at 0.5 µm/px on a 0.5 µm/px slide).

``metadata/{id}.json`` is written by Python's json with bare ``NaN``; it is read as a dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..._core import keys
from ..._core.errors import InputError
from ..._core.files import atomic_path
from .hdf5 import positive_attribute

HEST_PATCH_UM = 0.5  # HEST-1k patches are cut at 0.5 µm/px when the file does not say
MAX_COORD = 2**31  # level-0 px: far beyond any slide (a 200,000 px slide is already large)


@dataclass
class HestPatches:
    """One slide's patch file; ``img`` stays on disk and is read in batches.

    coords: (N, 2) int64 top-left corners, level-0 px (x, y).  barcodes: (N,) str.
    patch_px: side P of each patch.  pixel_size_um: µm per patch pixel.
    """

    path: Path
    coords: np.ndarray
    barcodes: np.ndarray
    patch_px: int
    pixel_size_um: float

    @property
    def n_patches(self) -> int:
        return len(self.coords)

    def centres(self, level0_mpp: float) -> np.ndarray:
        """Spot centres (N, 2) float64 in level-0 px, from the top-left corners.

        level0_mpp: µm per level-0 pixel of the slide the corners refer to.
        """
        half = self.patch_px * self.pixel_size_um / level0_mpp / 2.0
        return self.coords.astype(np.float64) + half

    def iter_batches(self, batch_size: int = 64) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (rows, patches (B, P, P, 3) uint8) in file order, covering all N patches.

        A patch that cannot be decoded (a corrupt compressed chunk) raises InputError.
        """
        with h5py.File(self.path, "r") as h5:
            img = h5[keys.PATCH_IMG]
            for start in range(0, self.n_patches, batch_size):
                rows = slice(start, min(start + batch_size, self.n_patches))
                yield rows, self._read(img, rows, f"{rows.start}..{rows.stop - 1}")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Patches (k, P, P, 3) uint8 of the file rows ``rows`` (k,), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        with h5py.File(self.path, "r") as h5:
            img = h5[keys.PATCH_IMG]
            return (
                np.stack([self._read(img, int(i), str(i)) for i in rows])
                if len(rows)
                else np.zeros((0, self.patch_px, self.patch_px, 3), np.uint8)
            )

    def _read(self, img: h5py.Dataset, rows, label: str) -> np.ndarray:
        try:
            return np.asarray(img[rows], dtype=np.uint8)
        except Exception as exc:  # h5py: OSError for a corrupt chunk, and others
            raise InputError(f"cannot read patches {label} ({exc})", self.path) from exc


def read_hest_patches(path: str | Path) -> HestPatches:
    """Open and validate a HEST ``patches/{id}.h5`` (everything but the pixels is read now)."""
    path = Path(path)
    if not path.exists():
        raise InputError("patch file not found", path)
    try:
        with h5py.File(path, "r") as h5:
            shape, pixel_size, coords, raw = _read_layout(h5, path)
    except InputError:
        raise
    except Exception as exc:  # h5py: OSError, KeyError (dangling links), TypeError, ...
        raise InputError(
            f"cannot read as a HEST patch file ({type(exc).__name__}: {exc})", path
        ) from exc
    try:
        barcodes = np.array(
            [b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object
        )
    except UnicodeDecodeError as exc:
        raise InputError(f"barcodes are not UTF-8 ({exc})", path) from None
    if len(set(barcodes)) != len(barcodes):
        raise InputError("duplicate barcodes", path)
    if coords.dtype.kind not in "iuf" or not np.isfinite(coords).all():
        raise InputError(f"coords must be finite numbers, got {coords.dtype}", path)
    if np.abs(coords.astype(np.float64)).max(initial=0) > MAX_COORD:  # (abs of int64 min < 0)
        raise InputError(f"coords beyond {MAX_COORD:,} px: larger than any slide", path)
    size = _pixel_size(pixel_size, path)
    return HestPatches(path, coords.astype(np.int64), barcodes, int(shape[1]), size)


def _read_layout(
    h5: h5py.File, path: Path
) -> tuple[tuple[int, ...], object, np.ndarray, np.ndarray]:
    """img's shape, its pixel size attribute, coords (N, 2) and barcodes (N,) raw, each checked
    against img's N before it is read (a corrupt file may declare a billion rows)."""
    missing = [k for k in (keys.PATCH_IMG, keys.PATCH_COORDS) if k not in h5]
    if missing:
        raise InputError(f"no '{missing[0]}' dataset (not a HEST patch file?)", path)
    img = h5[keys.PATCH_IMG]
    if not isinstance(img, h5py.Dataset):
        raise InputError("img is not a dataset", path)
    shape, dtype = img.shape, img.dtype
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or dtype != np.uint8:
        raise InputError(f"img has shape {shape} {dtype}, expected (N, P, P, 3) uint8", path)
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f"img has shape {shape}: no patches", path)
    pixel_size = img.attrs.get(keys.PATCH_ATTR_PIXEL_SIZE, h5.attrs.get("pixel_size"))
    ds = h5[keys.PATCH_COORDS]
    if not isinstance(ds, h5py.Dataset) or ds.shape != (shape[0], 2):
        got = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
        raise InputError(f"coords have shape {got}, expected ({shape[0]}, 2)", path)
    coords = np.asarray(ds[...])
    name = next((n for n in (keys.PATCH_BARCODE, keys.H5_BARCODES) if n in h5), None)
    if name is None:
        raise InputError("no 'barcode' dataset: patches cannot be matched to spots", path)
    ds = h5[name]
    if not isinstance(ds, h5py.Dataset) or ds.shape not in ((shape[0],), (shape[0], 1)):
        got = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
        raise InputError(f"{name} has shape {got}, expected {shape[0]} barcodes", path)
    return shape, pixel_size, coords, np.asarray(ds[...]).reshape(-1)


def _pixel_size(value, path: Path) -> float:
    """µm per patch pixel from the ``pixel_size`` attribute (HEST-1k's 0.5 without one)."""
    return HEST_PATCH_UM if value is None else positive_attribute(value, "pixel_size of img", path)


def write_hest_patches(
    path: str | Path,
    img: np.ndarray,
    coords_topleft: np.ndarray,
    barcodes: np.ndarray,
    pixel_size_um: float,
) -> Path:
    """Write a HEST-layout patch file atomically.

    img: (N, P, P, 3) uint8.  coords_topleft: (N, 2) level-0 px (x, y).  barcodes: (N,) str.
    """
    img = np.asarray(img)
    n = len(img)
    if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img must be (N, P, P, 3) uint8, got {img.shape} {img.dtype}")
    if np.shape(coords_topleft) != (n, 2) or len(barcodes) != n:
        raise ValueError("coords (N, 2) and barcodes (N,) must match img's N")
    codes = np.char.encode(np.asarray(barcodes, dtype=str), "ascii").reshape(n, 1)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        ds = h5.create_dataset(
            keys.PATCH_IMG,
            data=img,
            chunks=(min(n, 16), *img.shape[1:]) if n else None,
            compression="gzip",
            compression_opts=1,
        )
        ds.attrs[keys.PATCH_ATTR_PIXEL_SIZE] = float(pixel_size_um)
        ds.attrs["patch_size"] = int(img.shape[1])
        h5.create_dataset(keys.PATCH_COORDS, data=np.asarray(coords_topleft, dtype=np.int64))
        h5.create_dataset(keys.PATCH_BARCODE, data=codes)
    return Path(path)


def read_hest_metadata(path: str | Path) -> dict:
    """Read ``metadata/{id}.json`` (bare NaN allowed) into a dict."""
    path = Path(path)
    if not path.exists():
        raise InputError("metadata file not found", path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise InputError(f"not valid JSON ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(meta, dict):
        raise InputError(f"expected a JSON object, got {type(meta).__name__}", path)
    return meta


def hest_pixel_size(meta: dict) -> float | None:
    """µm per level-0 pixel from HEST metadata: ``pixel_size_um_embedded``, else ``_estimated``.

    (HEST's own order: the embedded value is what the scanner wrote; the estimate is a fallback.)
    """
    for key in keys.META_PIXEL_SIZE:
        try:
            value = float(meta.get(key))
        except (TypeError, ValueError, OverflowError):  # absent, text, an int beyond floats
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


__all__ = [
    "HestPatches",
    "hest_pixel_size",
    "read_hest_metadata",
    "read_hest_patches",
    "write_hest_patches",
]
