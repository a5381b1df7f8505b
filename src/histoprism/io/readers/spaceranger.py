"""10x Space Ranger ``outs/`` folders (Visium, Visium HD) -> HEST-format AnnData.

Read with h5py and pandas only (no scanpy). The result follows docs/formats.md, "st/{id}.h5ad:
counts": ``X`` float32 CSR raw counts (spots x genes), ``obs_names`` barcodes, ``var_names`` gene
symbols with Ensembl ids in ``var['gene_ids']``, obs ``in_tissue``, ``array_row/col``,
``pxl_row/col_in_fullres``, ``obsm['spatial']`` int64 (x = pxl_col, y = pxl_row) in
full-resolution pixels and ``uns['spatial']['ST']['scalefactors']``. Only spots under tissue are
kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._core import keys
from ..._core.errors import InputError
from ...expression.genes import sum_columns_by_label

MATRIX_H5 = "filtered_feature_bc_matrix.h5"
SPATIAL_DIR = "spatial"
SCALEFACTORS = "scalefactors_json.json"
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
GENE_EXPRESSION = "Gene Expression"
HD_BINS = (2, 8, 16)


def read_spaceranger(outs: str | Path) -> ad.AnnData:
    """Read a Visium Space Ranger ``outs/`` folder (matrix h5 + ``spatial/``) as HEST AnnData."""
    outs = Path(outs)
    if not outs.is_dir():
        raise InputError("Space Ranger outs folder not found", outs)
    counts, barcodes, symbols, ids = _read_matrix(outs / MATRIX_H5)
    pos_path, positions = _read_positions(outs / SPATIAL_DIR)
    scalefactors = _read_scalefactors(outs / SPATIAL_DIR / SCALEFACTORS)
    return _assemble(counts, barcodes, symbols, ids, positions, pos_path, scalefactors)


def read_visium_hd(outs: str | Path, bin_um: int = 8) -> ad.AnnData:
    """Read one bin size of a Visium HD ``outs/`` folder (``binned_outputs/square_00Xum/``)."""
    outs = Path(outs)
    if bin_um not in HD_BINS:
        raise InputError(f"bin size {bin_um} µm not one of {', '.join(map(str, HD_BINS))}")
    folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
    if not folder.is_dir():
        # accept the bin folder itself as well as outs/
        if (outs / MATRIX_H5).exists() and (outs / SPATIAL_DIR).is_dir():
            folder = outs
        else:
            raise InputError(
                f"Visium HD bin folder not found (no binned_outputs/{folder.name})", outs
            )
    return read_spaceranger(folder)


# --- pieces -----------------------------------------------------------------------------------
def _decode(arr: np.ndarray) -> np.ndarray:
    return np.array([a.decode() if isinstance(a, bytes) else str(a) for a in arr], dtype=object)


def _read_matrix(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """(spots x gene-expression features) CSR counts, barcodes, symbols, ids of a 10x v3 h5."""
    if not path.exists():
        raise InputError("feature-barcode matrix not found", path)
    try:
        with h5py.File(path, "r") as h5:
            m = h5["matrix"]
            f = m["features"]
            n_feat, n_bc = _matrix_shape(m["shape"], path)
            # every declared length is checked against the others before anything is read: a
            # corrupt file may declare a billion entries that are not there
            sizes = {"barcodes": n_bc, "indptr": n_bc + 1}
            sizes |= {f"features/{k}": n_feat for k in ("id", "name", "feature_type") if k in f}
            for name, n in sizes.items():
                _check_length(m[name], n, name, path)
            indptr = _read_int(m["indptr"], path)
            if indptr[0] != 0 or (np.diff(indptr) < 0).any():
                raise InputError("matrix/indptr does not start at 0 and increase", path)
            for name in ("data", "indices"):
                _check_length(m[name], int(indptr[-1]), name, path)
            data = np.asarray(m["data"][...])
            indices = _read_int(m["indices"], path)
            barcodes = _decode(m["barcodes"][...])
            ids = _decode(f["id"][...])
            symbols = _decode(f["name"][...])
            ftype = (
                _decode(f["feature_type"][...])
                if "feature_type" in f
                else np.full(n_feat, GENE_EXPRESSION, dtype=object)
            )
    except InputError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, TypeError ... for a broken file
        raise InputError(
            f"not a 10x HDF5 v3 feature-barcode matrix ({type(exc).__name__}: {exc})", path
        ) from exc
    if data.dtype.kind not in "iuf":
        raise InputError(f"matrix/data holds {data.dtype}, not counts", path)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_feat):
        raise InputError(f"matrix/indices outside 0..{n_feat - 1}", path)
    counts = data.astype(np.float32)  # float64 counts above 3.4e38 become inf: caught here
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise InputError("matrix/data: counts must be finite and non-negative", path)
    dup = pd.Index(barcodes).duplicated()
    if dup.any():
        raise InputError(f"duplicate barcode '{barcodes[dup][0]}' in the matrix", path)
    keep = ftype == GENE_EXPRESSION
    if not keep.any():
        raise InputError(f"no '{GENE_EXPRESSION}' features", path)
    mat = sp.csc_matrix((counts, indices, indptr), shape=(n_feat, n_bc))
    return mat.T.tocsr()[:, np.flatnonzero(keep)], barcodes, symbols[keep], ids[keep]


def _matrix_shape(ds: h5py.Dataset, path: Path) -> tuple[int, int]:
    """(features, barcodes) from matrix/shape: two non-negative integers."""
    _check_length(ds, 2, "shape", path)
    shape = _read_int(ds, path)
    if (shape < 0).any():
        raise InputError(f"matrix/shape is {shape.tolist()}, not (features, barcodes)", path)
    return int(shape[0]), int(shape[1])


def _read_int(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """A dataset of integers as int64 (a float or text dataset is not a 10x index)."""
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "iu":
        raise InputError(f"{ds.name} is not an integer dataset", path)
    values = np.asarray(ds[...])
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        raise InputError(f"{ds.name} holds integers beyond int64", path)
    return values.astype(np.int64)


def _check_length(ds: h5py.Dataset, n: int, name: str, path: Path) -> None:
    """``ds`` is a 1-D dataset of ``n`` entries."""
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"matrix/{name} is not a dataset", path)
    if ds.shape != (n,):
        raise InputError(f"matrix/{name} has shape {ds.shape}, expected ({n},)", path)


def _read_positions(spatial: Path) -> tuple[Path, pd.DataFrame]:
    """The tissue positions table (any of the three 10x variants), indexed by barcode."""
    csv = spatial / "tissue_positions.csv"
    old = spatial / "tissue_positions_list.csv"
    parquet = spatial / "tissue_positions.parquet"
    if csv.exists():
        path, df = csv, _read_csv(csv, header=0)
    elif old.exists():
        path, df = old, _read_csv(old, header=None)
    elif parquet.exists():
        path = parquet
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(
                "reading tissue_positions.parquet needs pyarrow (pip install pyarrow)", parquet
            ) from None
        try:
            df = pd.read_parquet(parquet)
        except Exception as exc:
            raise InputError(f"cannot read parquet ({type(exc).__name__}: {exc})", parquet) from exc
    else:
        raise InputError(
            "no tissue_positions.csv, tissue_positions_list.csv or tissue_positions.parquet",
            spatial,
        )
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", path)
    df = df[list(POSITION_COLUMNS)].copy()
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        raise InputError(
            f"duplicate barcode '{df['barcode'][df['barcode'].duplicated()].iloc[0]}'", path
        )
    for col in POSITION_COLUMNS[1:]:
        vals = pd.to_numeric(df[col], errors="coerce")
        if vals.isna().any():
            raise InputError(f"non-numeric or empty values in column '{col}'", path)
        # inf, or 1e300 that would wrap round on the cast to int64
        if not np.isfinite(vals.to_numpy(dtype=float)).all() or vals.abs().max() >= 2**53:
            raise InputError(f"values in column '{col}' beyond any slide", path)
        df[col] = vals.round().astype(np.int64)
    return path, df.set_index("barcode")


def _read_csv(path: Path, *, header: int | None) -> pd.DataFrame:
    try:
        if header is None:
            return pd.read_csv(path, header=None, names=list(POSITION_COLUMNS))
        return pd.read_csv(path)
    except Exception as exc:
        raise InputError(f"cannot read positions ({type(exc).__name__}: {exc})", path) from exc


def _read_scalefactors(path: Path) -> dict:
    """scalefactors_json.json: names -> positive numbers (scales, diameters and µm per pixel;
    readers of the h5ad take them as floats)."""
    if not path.exists():
        return {}
    try:
        factors = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise InputError(f"not valid JSON ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(factors, dict):
        raise InputError(f"not a JSON object but {type(factors).__name__}", path)
    for name, value in factors.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not (math.isfinite(value) and value > 0):
            raise InputError(f"scale factor '{name}' is {value!r}, not a positive number", path)
    return factors


def _assemble(
    counts: sp.csr_matrix,
    barcodes: np.ndarray,
    symbols: np.ndarray,
    ids: np.ndarray,
    positions: pd.DataFrame,
    pos_path: Path,
    scalefactors: dict,
) -> ad.AnnData:
    rows = positions.index.get_indexer(barcodes.astype(str))
    if (rows < 0).any():
        missing = barcodes[rows < 0]
        raise InputError(
            f"{len(missing)} barcode(s) of the matrix have no position, e.g. '{missing[0]}'",
            pos_path,
        )
    obs = positions.iloc[rows].copy()
    obs.index = pd.Index(barcodes.astype(str), name=None)
    tissue = obs["in_tissue"].to_numpy() == 1
    if not tissue.any():
        raise InputError("no spot under tissue (in_tissue == 1)", pos_path)
    obs, counts = obs[tissue], counts[np.flatnonzero(tissue)]
    counts, var = _merge_symbols(counts, symbols, ids)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm[keys.OBSM_SPATIAL] = np.stack(
        [obs["pxl_col_in_fullres"].to_numpy(), obs["pxl_row_in_fullres"].to_numpy()], axis=1
    ).astype(np.int64)
    adata.uns["spatial"] = {"ST": {"scalefactors": scalefactors}}
    return adata


def _merge_symbols(
    counts: sp.csr_matrix, symbols: np.ndarray, ids: np.ndarray
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Sum raw counts of features sharing a symbol into one column; ids kept ';'-joined."""
    symbols = np.array([s if s else i for s, i in zip(symbols, ids, strict=True)], dtype=object)
    merged, uniq, col = sum_columns_by_label(counts.astype(np.float32), symbols)
    n_genes = len(uniq)
    gene_ids = [""] * n_genes
    for j, gid in zip(col, ids, strict=True):
        gene_ids[j] = f"{gene_ids[j]};{gid}" if gene_ids[j] else gid
    var = pd.DataFrame({keys.VAR_GENE_IDS: gene_ids}, index=pd.Index(uniq.astype(str), name=None))
    return merged, var
