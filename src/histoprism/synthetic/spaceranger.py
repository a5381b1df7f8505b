"""A slide's counts written as Space Ranger writes them: an ``outs/`` folder that ``histoprism
import --format spaceranger`` (``io.readers.read_spaceranger``) reads as it reads a real one.

For tutorials and tests that start where a user starts, from a Space Ranger run:

    outs/filtered_feature_bc_matrix.h5     10x HDF5 v3: matrix/{data, indices, indptr, shape,
                                           barcodes, features/{id, name, feature_type, genome}},
                                           features x barcodes, compressed sparse columns
    outs/spatial/tissue_positions.csv      barcode, in_tissue, array_row, array_col,
                                           pxl_row_in_fullres, pxl_col_in_fullres (Space Ranger 2+;
                                           ``variant`` writes the older headerless list or the
                                           Visium HD parquet instead)
    outs/spatial/scalefactors_json.json    spot_diameter_fullres, tissue_hires_scalef, ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.errors import InputError
from ..io.readers.spaceranger import (  # the names the reader looks for
    GENE_EXPRESSION,
    MATRIX_H5,
    POSITION_COLUMNS,
    SCALEFACTORS,
    SPATIAL_DIR,
)


def write_matrix_h5(
    path: str | Path,
    counts: np.ndarray | sp.spmatrix,
    barcodes: Sequence[str],
    features: Sequence[tuple[str, str, str]],
) -> Path:
    """A 10x HDF5 v3 feature-barcode matrix. counts: (features, barcodes) integers, the 10x
    orientation; features: (id, name, feature_type) per row, e.g. (Ensembl id, symbol,
    "Gene Expression"). Strings are stored as bytes, as Space Ranger does."""
    m = sp.csc_matrix(counts)
    if m.shape != (len(features), len(barcodes)):
        raise ValueError(
            f"counts {m.shape} != ({len(features)} features, {len(barcodes)} barcodes)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.attrs["filetype"] = "matrix"
        h5.attrs["version"] = 2
        g = h5.create_group("matrix")
        g.create_dataset("data", data=np.rint(m.data).astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        g.create_dataset("barcodes", data=np.array(list(barcodes), dtype="S"))
        f = g.create_group("features")
        for j, name in enumerate(("id", "name", "feature_type")):
            f.create_dataset(name, data=np.array([x[j] for x in features], dtype="S"))
        f.create_dataset("genome", data=np.array([b"GRCh38"] * len(features)))
        f.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return path


def write_positions(spatial: str | Path, positions: pd.DataFrame, variant: str = "csv") -> Path:
    """``spatial/`` tissue positions (columns ``POSITION_COLUMNS``): ``csv`` (Space Ranger 2+,
    with a header), ``list`` (Space Ranger 1, ``tissue_positions_list.csv`` without one) or
    ``parquet`` (Visium HD bins)."""
    spatial = Path(spatial)
    spatial.mkdir(parents=True, exist_ok=True)
    table = positions.loc[:, list(POSITION_COLUMNS)]
    if variant == "csv":
        path = spatial / "tissue_positions.csv"
        table.to_csv(path, index=False)
    elif variant == "list":
        path = spatial / "tissue_positions_list.csv"
        table.to_csv(path, index=False, header=False)
    elif variant == "parquet":
        path = spatial / "tissue_positions.parquet"
        table.to_parquet(path, index=False)
    else:
        raise ValueError(f"unknown positions variant '{variant}' (csv, list, parquet)")
    return path


def write_spaceranger(
    st: ad.AnnData, outs: str | Path, *, spot_diameter_um: float = 55.0, mpp: float = 0.5
) -> Path:
    """The slide ``st`` (raw counts in X, var ``gene_ids``, obs ``in_tissue``, ``array_row``,
    ``array_col``, obsm ``spatial`` (x, y) level-0 px, as the built-in cohort's ``st/{id}.h5ad``)
    as a Space Ranger ``outs/`` folder; returns ``outs``. mpp: µm per level-0 pixel of the image
    the positions refer to (for ``spot_diameter_fullres``)."""
    missing = [c for c in ("in_tissue", "array_row", "array_col") if c not in st.obs]
    if "gene_ids" not in st.var or "spatial" not in st.obsm or missing:
        raise InputError(
            f"not a Space Ranger-like slide: needs var gene_ids, obsm spatial, obs {missing}"
        )
    outs = Path(outs)
    features = [(gid, name, GENE_EXPRESSION) for name, gid in st.var["gene_ids"].items()]
    counts = sp.csr_matrix(st.X).T  # (genes, spots)
    write_matrix_h5(outs / MATRIX_H5, counts, list(st.obs_names), features)
    xy = np.asarray(st.obsm["spatial"], dtype=np.float64)
    positions = pd.DataFrame(
        {
            "barcode": st.obs_names,
            "in_tissue": st.obs["in_tissue"].astype(int).to_numpy(),
            "array_row": st.obs["array_row"].astype(int).to_numpy(),
            "array_col": st.obs["array_col"].astype(int).to_numpy(),
            "pxl_row_in_fullres": np.rint(xy[:, 1]).astype(int),
            "pxl_col_in_fullres": np.rint(xy[:, 0]).astype(int),
        }
    )
    write_positions(outs / SPATIAL_DIR, positions)
    scalefactors = {
        "spot_diameter_fullres": spot_diameter_um / mpp,
        "tissue_hires_scalef": 1.0,
        "fiducial_diameter_fullres": 1.6 * spot_diameter_um / mpp,
        "tissue_lowres_scalef": 1.0,
    }
    (outs / SPATIAL_DIR / SCALEFACTORS).write_text(json.dumps(scalefactors))
    return outs


__all__ = ["write_matrix_h5", "write_positions", "write_spaceranger"]
