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

from .. import keys
from ..errors import InputError
from ..io import atomic_path

HEST_PATCH_UM = 0.5  # HEST-1k patches are cut at 0.5 µm/px when the file does not say


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
        """Yield (rows, patches (B, P, P, 3) uint8) in file order, covering all N patches."""
        with h5py.File(self.path, "r") as h5:
            img = h5[keys.PATCH_IMG]
            for start in range(0, self.n_patches, batch_size):
                rows = slice(start, min(start + batch_size, self.n_patches))
                yield rows, np.asarray(img[rows], dtype=np.uint8)


def read_hest_patches(path: str | Path) -> HestPatches:
    """Open and validate a HEST ``patches/{id}.h5`` (everything but the pixels is read now)."""
    path = Path(path)
    if not path.exists():
        raise InputError("patch file not found", path)
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in (keys.PATCH_IMG, keys.PATCH_COORDS) if k not in h5]
            if missing:
                raise InputError(f"no '{missing[0]}' dataset (not a HEST patch file?)", path)
            img = h5[keys.PATCH_IMG]
            shape, dtype = img.shape, img.dtype
            pixel_size = img.attrs.get(keys.PATCH_ATTR_PIXEL_SIZE, h5.attrs.get("pixel_size"))
            coords = np.asarray(h5[keys.PATCH_COORDS][...])
            name = next((n for n in (keys.PATCH_BARCODE, keys.H5_BARCODES) if n in h5), None)
            raw = np.asarray(h5[name][...]).reshape(-1) if name else None
    except OSError as exc:
        raise InputError(f"cannot read as HDF5 ({exc})", path) from exc
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or dtype != np.uint8:
        raise InputError(f"img has shape {shape} {dtype}, expected (N, P, P, 3) uint8", path)
    if coords.ndim != 2 or coords.shape != (shape[0], 2):
        raise InputError(f"coords have shape {coords.shape}, expected ({shape[0]}, 2)", path)
    if raw is None:
        raise InputError("no 'barcode' dataset: patches cannot be matched to spots", path)
    barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object)
    if len(barcodes) != shape[0]:
        raise InputError(f"{len(barcodes)} barcodes for {shape[0]} patches", path)
    if len(set(barcodes)) != len(barcodes):
        raise InputError("duplicate barcodes", path)
    size = float(pixel_size) if pixel_size is not None else HEST_PATCH_UM
    if not (math.isfinite(size) and size > 0):
        raise InputError(f"invalid pixel_size {pixel_size!r} on img", path)
    return HestPatches(path, coords.astype(np.int64), barcodes, int(shape[1]), size)


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from exc
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
        except (TypeError, ValueError):
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
