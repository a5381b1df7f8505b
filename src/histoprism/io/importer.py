"""``histoprism import``: bring one real sample into a cohort directory.

Options: docs/cli.md, "histoprism import"; the file: docs/formats.md, "st/{id}.h5ad: counts".

Writes ``COHORT/st/{id}.h5ad`` (HEST format) atomically and adds or updates the sample's row of the
cohort's metadata table, keeping every other row and column.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import pandas as pd

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path
from .cohort import metadata_path
from .readers.spaceranger import read_spaceranger, read_visium_hd
from .readers.st import read_st

FORMATS = ("hest", "spaceranger", "visium-hd")
TECHNOLOGY = {"spaceranger": "Visium", "visium-hd": "Visium HD"}
META_SPOTS = "spots_under_tissue"
META_GENES = "nb_genes"


def import_sample(
    fmt: str,
    src: str | Path,
    data: str | Path,
    sample_id: str,
    *,
    oncotree_code: str | None = None,
    image: str | Path | None = None,
    bin_um: int = 8,
) -> Path:
    """Import ``src`` (a Space Ranger outs/ folder, a Visium HD outs/ folder or a HEST h5ad) as
    sample ``sample_id`` of cohort ``data``; returns the written ``st/{id}.h5ad``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")
    sample_id = str(sample_id).strip()
    if not sample_id or "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise InputError(f"invalid sample id '{sample_id}'")
    src, data = Path(src), Path(data)
    if image is not None and not Path(image).exists():
        raise InputError("image not found", image)
    out = data / keys.ST_DIR / f"{sample_id}.h5ad"
    if fmt == "hest":
        if not src.is_file():
            raise InputError("HEST h5ad not found", src)
        adata = read_st(src)
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
    else:
        if not src.is_dir():
            raise InputError("Space Ranger outs folder not found", src)
        adata = read_spaceranger(src) if fmt == "spaceranger" else read_visium_hd(src, bin_um)
        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)
    _update_metadata(data, sample_id, adata, fmt, oncotree_code, image)
    return out


def _update_metadata(
    data: Path,
    sample_id: str,
    adata: ad.AnnData,
    fmt: str,
    oncotree_code: str | None,
    image: str | Path | None,
) -> Path:
    path = metadata_path(data) or data / keys.METADATA_FILES[0]
    if path.exists():
        try:
            md = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except Exception as exc:
            raise InputError(f"cannot read metadata ({type(exc).__name__}: {exc})", path) from exc
        if keys.META_ID not in md.columns:
            raise InputError(f"missing required column '{keys.META_ID}'", path)
    else:
        md = pd.DataFrame({keys.META_ID: pd.Series(dtype=str)})
    if keys.META_CANCER not in md.columns:
        md[keys.META_CANCER] = ""
    hit = md.index[md[keys.META_ID] == sample_id]
    if len(hit):
        row = hit[0]
    else:
        row = len(md)
        md.loc[row] = ""
        md.loc[row, keys.META_ID] = sample_id
    values = {META_SPOTS: str(adata.n_obs), META_GENES: str(adata.n_vars)}
    if oncotree_code is not None:
        values[keys.META_CANCER] = oncotree_code
    if fmt in TECHNOLOGY:
        values[keys.META_TECH] = TECHNOLOGY[fmt]
    if image is not None:
        values[keys.META_WSI] = str(Path(image).resolve())
    for col, v in values.items():
        if col not in md.columns:
            md[col] = ""
        md.loc[row, col] = v
    with atomic_path(path) as tmp:
        md.to_csv(tmp, index=False)
    return path
