"""One slide's measurements, given the world and the slide's visible tissue.

Data path, per slide (``simulate_slide``, from the slide's own random stream after its tissue):
``Tissue`` -> visible log mean (N, G) (drivers @ effect + baseline + cancer offset + depth) ->
plus one draw of the hidden log-scale term (N, G) (hidden fields, per-slide programme offsets,
slide and spot depth) -> negative-binomial counts (N, g) (g = G, or the targeted panel) ->
``st`` AnnData (raw counts, float32 CSR); the ceiling (N, g) interpolated from the world's table
at the visible log mean -> ``ceiling`` AnnData; embeddings (N, D) = the world's MLP of the
spot's look, times a per-slide stain scale, plus a stain shift and per-spot noise.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from .._core import keys
from .._core.version import __version__
from .ceiling import ceiling_at
from .geometry import NICHES
from .tissue import Tissue, draw_tissue, smooth_fields
from .world import (
    CANCERS,
    DISPERSIONS,
    HIDDEN_SIGMA_UM,
    LIB_NUCLEAR,
    LIB_SCALE,
    LIB_SPOT_SD,
    N_HIDDEN,
    VIS_DRIVERS,
    XENIUM_LOG_EFFICIENCY,
    Genes,
    SyntheticConfig,
    World,
)


def _visible_log_mean(world: World, tissue: Tissue, cancer: int, targeted: bool) -> np.ndarray:
    """Log NB mean (N, G) given the visible state only (hidden terms at their mean, zero)."""
    log_mu = tissue.drivers @ world.effect[cancer] + world.base + world.offset[cancer]
    nuclear = tissue.drivers[:, VIS_DRIVERS.index("nuclear_density")]
    depth = np.log(LIB_SCALE) + LIB_NUCLEAR * nuclear + XENIUM_LOG_EFFICIENCY * targeted
    return (log_mu + depth[:, None]).astype(np.float32)


def _hidden_log_term(
    world: World,
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    shape: tuple[int, int],
    spots: np.ndarray,
) -> np.ndarray:
    """One draw of everything morphology cannot see, on the log-mean scale, (N, G) float32.

    Hidden programme fields, per-slide programme offsets, slide depth and spot depth: each
    Gaussian with mean zero, so the sum is N(0, world.hidden_sd^2) per spot and gene.
    """
    fields = smooth_fields(rng, N_HIDDEN, shape, HIDDEN_SIGMA_UM).reshape(N_HIDDEN, -1)
    term = fields[:, spots].T @ world.hidden  # (N, G)
    slide = rng.normal(0.0, cfg.slide_programme_sd, len(world.loadings)) @ world.loadings
    depth = rng.normal(0.0, cfg.depth_slide_sd) + rng.normal(0.0, LIB_SPOT_SD, len(spots))
    return (term + slide + depth[:, None]).astype(np.float32)


def _draw_counts(
    rng: np.random.Generator, log_mu: np.ndarray, dispersion: np.ndarray
) -> np.ndarray:
    """Negative binomial counts (N, g) float32 as a gamma-Poisson mixture; phi = DISPERSIONS[d]."""
    shape = 1.0 / DISPERSIONS[dispersion]  # (g,)
    rate = rng.gamma(shape, 1.0, size=log_mu.shape) / shape * np.exp(log_mu)
    return rng.poisson(rate).astype(np.float32)


def _embed(
    world: World, rng: np.random.Generator, tissue: Tissue, cfg: SyntheticConfig
) -> np.ndarray:
    """Patch embeddings (N, D) float32: fixed MLP of the look, slide stain shift, spot noise."""
    w1, b1, w2 = world.mlp
    signal = np.tanh(tissue.look @ w1 + b1) @ w2  # (N, D), roughly unit sd per dimension
    scale = np.exp(rng.normal(0.0, cfg.stain_scale_sd))
    shift = rng.normal(0.0, cfg.stain_shift_sd, cfg.embed_dim)
    noise = rng.normal(0.0, cfg.spot_noise_sd, signal.shape)
    return (signal * scale + shift + noise).astype(np.float32)


# --- AnnData of one slide -------------------------------------------------------------------------


def _st_anndata(
    counts: np.ndarray, tissue: Tissue, barcodes: np.ndarray, genes: Genes, idx: np.ndarray
) -> ad.AnnData:
    """HEST-format raw-count AnnData: X (N, g) float32 CSR, var_names = symbols of genes ``idx``
    with ``gene_ids``, Visium obs columns and scanpy QC columns, obsm['spatial'] (N, 2) int64."""
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(barcodes), dtype=np.int64),
            "array_row": tissue.array_row,
            "array_col": tissue.array_col,
            "pxl_row_in_fullres": tissue.xy[:, 1],
            "pxl_col_in_fullres": tissue.xy[:, 0],
            "total_counts": counts.sum(axis=1),
            "n_genes_by_counts": (counts > 0).sum(axis=1).astype(np.int64),
        },
        index=pd.Index(barcodes, name=None),
    )
    var = pd.DataFrame({keys.VAR_GENE_IDS: genes.ensembl[idx]}, index=genes.symbols[idx])
    adata = ad.AnnData(X=sparse.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.obsm[keys.OBSM_SPATIAL] = tissue.xy.astype(np.int64)
    return adata


def _ceiling_anndata(st: ad.AnnData, ceiling: np.ndarray, tissue: Tissue, code: str) -> ad.AnnData:
    """Prediction-format AnnData of the ceiling, plus the true niche composition."""
    obs = pd.DataFrame(
        {
            keys.OBS_CANCER: code,
            "niche": pd.Categorical(np.array(NICHES)[tissue.composition.argmax(1)], NICHES),
        },
        index=st.obs_names.copy(),
    )
    adata = ad.AnnData(X=ceiling.astype(np.float32), obs=obs, var=st.var.copy())
    adata.obsm[keys.OBSM_SPATIAL] = st.obsm[keys.OBSM_SPATIAL].copy()
    adata.obsm["niche_composition"] = tissue.composition.astype(np.float32)
    adata.uns[keys.UNS_HISTOPRISM] = {
        "model": "ceiling",
        "units": keys.UNITS_LOG1P,
        "version": __version__,
        "niches": list(NICHES),
    }
    return adata


# --- one slide ----------------------------------------------------------------------------------


def simulate_slide(
    world: World,
    cfg: SyntheticConfig,
    slide: dict,
    shape: tuple[int, int],
    whitelist: np.ndarray,
    rng: np.random.Generator,
) -> dict:
    """One slide: ``st`` and ``ceiling`` AnnData, ``features`` (N, D), ``xy``, ``barcodes``."""
    cancer, targeted = int(slide["cancer"]), bool(slide["targeted"])
    tissue = draw_tissue(rng, shape, int(slide["n_spots"]), cancer, cfg)
    genes = world.panel if targeted else np.arange(len(world.genes.symbols))
    log_mu = _visible_log_mean(world, tissue, cancer, targeted)[:, genes]
    hidden = _hidden_log_term(world, cfg, rng, shape, tissue.spots)[:, genes]
    counts = _draw_counts(rng, log_mu + hidden, world.dispersion[genes])
    barcodes = whitelist[tissue.spots]
    st = _st_anndata(counts, tissue, barcodes, world.genes, genes)
    ceiling = ceiling_at(world.ceiling[genes], log_mu)
    return {
        "st": st,
        "ceiling": _ceiling_anndata(st, ceiling, tissue, CANCERS[cancer]),
        "features": _embed(world, rng, tissue, cfg),
        "xy": tissue.xy,
        "barcodes": barcodes,
        "tissue": tissue,
    }
