"""Spatial transcriptomics counts: HEST-style ``st/{id}.h5ad``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..._core import keys
from ..._core.errors import InputError, first_line
from .hdf5 import check_file


def read_st(path: str | Path) -> ad.AnnData:
    """Read and validate one slide's raw counts.

    Returns an AnnData with ``X`` (N, G) float32 CSR raw counts, ``obs_names`` barcodes,
    ``var_names`` genes, ``obsm['spatial']`` (N, 2) float64 spot centres in level-0 pixels (x, y).
    Raises ``InputError`` naming the file for a missing file, no spots, duplicate barcodes or genes,
    missing coordinates or negative / non-finite counts.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("counts file not found", path)
    check_file(path)  # declared sizes first: anndata would allocate whatever the file declares
    adata = read_h5ad(path)
    _check(adata, path)
    adata.X = _counts_csr(adata.X, path)
    adata.obsm[keys.OBSM_SPATIAL] = np.asarray(adata.obsm[keys.OBSM_SPATIAL], dtype=np.float64)
    return adata


def read_h5ad(path: str | Path, *, backed: Literal["r"] | None = None) -> ad.AnnData:
    """``anndata.read_h5ad``, raising ``InputError`` naming the file when it cannot be read."""
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as exc:  # h5py/anndata raise many types for a corrupt file
        raise InputError(f"cannot read as h5ad ({first_line(exc)})", path) from exc


def _counts_csr(X, path: Path) -> sp.csr_matrix:
    """X as float32 CSR after scipy's full structure check: a damaged file's indices or indptr
    out of range would otherwise be used as they are (wrong counts, or a segfault later)."""
    try:
        if sp.issparse(X):
            X = X.tocsr()
            # signed 64-bit first: differences of an unsigned indptr never look decreasing
            X.indptr, X.indices = X.indptr.astype(np.int64), X.indices.astype(np.int64)
            X.check_format(full_check=True)
            return X.astype(np.float32)
        return sp.csr_matrix(np.asarray(X), dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"X is not a valid counts matrix ({first_line(exc)})", path) from exc


def _check(adata: ad.AnnData, path: Path) -> None:
    if adata.X is None:
        raise InputError("no X (the raw counts matrix)", path)
    dtype = adata.X.dtype
    if dtype.kind not in "fiub":
        raise InputError(f"X has dtype {dtype}, expected raw counts (numbers)", path)
    if adata.n_obs == 0:
        raise InputError("slide has no spots", path)
    if adata.n_vars == 0:
        raise InputError("slide has no genes", path)
    for what, names in (("barcode", adata.obs_names), ("gene", adata.var_names)):
        dup = names[names.duplicated()]
        if len(dup):
            raise InputError(f"{len(dup)} duplicate {what}s, e.g. '{dup[0]}'", path)
    if keys.OBSM_SPATIAL not in adata.obsm:
        raise InputError("no obsm['spatial'] (spot centres in pixels)", path)
    xy = np.asarray(adata.obsm[keys.OBSM_SPATIAL])
    if xy.dtype.kind not in "fiu":
        raise InputError(f"obsm['spatial'] has dtype {xy.dtype}, expected numbers", path)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"obsm['spatial'] has shape {xy.shape}, expected (N, 2)", path)
    if not np.isfinite(xy[:, :2]).all():
        raise InputError("obsm['spatial'] has NaN or infinite coordinates", path)
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if data.size and (not np.isfinite(data).all() or data.min() < 0):
        raise InputError("counts must be finite and non-negative (raw counts expected)", path)
