"""Checks on an HDF5 file's declared sizes, made before any array is read.

A few-KB file can declare a (1e9, 1536) dataset (chunked, never written) that h5py, or anndata
on top of it, would try to allocate in full. Real arrays of this field compress little (float
features ~1.1x, sparse counts ~3x), so a dataset that declares a thousand times more bytes than
it stores is damaged or forged.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError, first_line

MAX_COMPRESSION = 1_000  # declared bytes per stored byte
SMALL_DATASET_BYTES = 64 * 2**20  # below this a dataset is never refused for its size
MAX_DATASET_BYTES = 64 * 2**30  # no one slide's array is this large


def check_declared_size(ds: h5py.Dataset, path: Path) -> None:
    """InputError when ``ds`` declares more bytes than the file plausibly holds for it."""
    shape = ds.shape or ()
    declared = int(np.prod(shape, dtype=np.float64)) * ds.dtype.itemsize
    if declared <= SMALL_DATASET_BYTES:
        return
    stored = ds.id.get_storage_size()
    if declared > MAX_DATASET_BYTES or declared > MAX_COMPRESSION * max(stored, 1):
        raise InputError(
            f"'{ds.name}' declares shape {shape} ({declared / 2**30:.1f} GiB) but stores "
            f"{stored / 2**20:.1f} MiB: damaged or not written",
            path,
        )


def check_file(path: Path) -> None:
    """Open ``path`` as HDF5 and check every dataset's declared size; InputError on a file that
    is not HDF5, whose object tree cannot be walked, or that declares an implausible array."""
    try:
        with h5py.File(path, "r") as h5:
            datasets: list[h5py.Dataset] = []
            h5.visititems(
                lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None
            )
            for ds in datasets:
                check_declared_size(ds, path)
    except InputError:
        raise
    except Exception as exc:  # OSError, RuntimeError, KeyError ... from a damaged file
        raise InputError(f"cannot read as HDF5 ({first_line(exc)})", path) from exc
