"""The built-in synthetic cohort: HEST-layout slides whose biology makes HistoPrism's claims testable.

Generative model, per slide (all randomness from ``SyntheticConfig.seed``):

1. Geometry. A Visium hex grid (100 µm pitch, 0.5 µm/px); the tissue is an irregular blob
   (a radial falloff plus a smooth random field, thresholded to the slide's spot count).
2. Visible tissue state. Six niches (tumour, stroma, immune, normal epithelium, necrosis,
   adipose/vessel) from smooth random fields through a softmax, so spots are mixtures and regions
   are coherent over several hundred µm; niche abundance depends on the cancer type. Two visible
   covariates (nuclear density, stromal texture) and neighbourhood features computed within
   300 µm (tumour x nearby immune, tumour x nearby stroma, nearby necrosis, stroma x nearby
   tumour) and one of the whole slide (tumour x the slide's immune share: "hot" tumours).
3. Expression. Gene programmes are the bundled GPC gene sets (Hallmark + GO); each programme's
   activity is a linear map of the visible drivers whose matrix is a shared part plus a
   substantial cancer-specific part, plus hidden smooth fields that morphology cannot see.
   log mean = log library + gene baseline (Zipf-like) + cancer offset + loadings @ activity;
   counts ~ negative binomial (dispersion 0.1-0.5 per gene).
4. Embeddings. A fixed random 2-layer MLP of the visible per-spot state (composition, nuclear
   density, texture, two nuisance fields, a weak cancer tell), then a per-slide stain shift and
   scale and per-spot noise. The MLP sees one spot only: context must come from the model.
5. Ceiling. Everything hidden (hidden fields, per-slide programme offsets, library size) enters
   the log mean additively and is exactly Gaussian given the visible state, so
   E[log1p(counts) | visible] is a per-gene 1-D integral: Gauss-Hermite over the hidden part
   (``ceiling_draws`` nodes) and an exact sum over the negative-binomial pmf. This is what a
   Monte-Carlo average over fresh hidden draws converges to, without its noise.
6. Images (``SyntheticConfig.images``). H&E-like renderings of the visible state only
   (composition, nuclear density, texture, a thickness nuisance; ``synthetic_images``), as a
   pyramidal TIFF and HEST patches, from a random stream of their own: every other file is the
   same with or without them.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import ndimage, sparse
from scipy.spatial import cKDTree
from scipy.special import digamma

from .._core import keys
from .._core.files import atomic_path, write_text_atomic
from .._core.version import __version__
from ..expression.genes import GENESET_COLLECTIONS, bench_hvg, gene_table, gpc_genesets
from ..io.readers.embeddings import write_embeddings
from .geometry import NICHES, NUCLEAR_BY_NICHE, PITCH_UM, ROW_PITCH_UM, UM_PER_PX

log = logging.getLogger(__name__)

CANCERS = ("IDC", "COAD", "PRAD", "SKCM", "CCRCC", "LUAD")
ORGANS = {
    "IDC": "Breast",
    "COAD": "Bowel",
    "PRAD": "Prostate",
    "SKCM": "Skin",
    "CCRCC": "Kidney",
    "LUAD": "Lung",
}
PANEL_SIZE = 38_982  # genes in the STPath/HistoPrism panel

# log relative niche abundance per cancer (rows: CANCERS, columns: NICHES)
NICHE_LOG_ABUNDANCE = np.array(
    [
        [0.5, 0.5, 0.0, 0.0, -1.0, 0.6],  # IDC: stroma- and fat-rich breast
        [0.7, 0.3, 0.0, 0.4, 0.0, -1.0],  # COAD: glands, dirty necrosis
        [0.3, 0.6, -0.5, 0.7, -1.5, -1.0],  # PRAD: benign glands, little immune
        [1.0, -0.3, 0.5, -0.5, 0.0, -0.5],  # SKCM: sheets of tumour, brisk infiltrate
        [0.8, 0.0, 0.2, -0.3, 0.3, 0.0],  # CCRCC: vessel-rich, necrotic
        [0.5, 0.2, 0.5, 0.2, -0.3, -1.0],  # LUAD
    ]
)
VIS_DRIVERS = NICHES + (
    "nuclear_density",
    "texture",
    "tumour_x_nbhd_immune",
    "tumour_x_nbhd_stroma",
    "nbhd_necrosis",
    "stroma_x_nbhd_tumour",
    "tumour_x_slide_immune",
)
N_SPOT_DRIVERS = 8  # the first 8 drivers are the spot's own state, the rest its neighbourhood
# primary driver of a programme whose name has no keyword below: own spot, context or hidden
PRIMARY_KIND = {"spot": 0.5, "context": 0.3, "hidden": 0.2}
# typical mean and sd of each raw driver, to put them on one scale (measured on default cohorts)
DRIVER_CENTRE = np.array(
    [0.19, 0.2, 0.14, 0.17, 0.09, 0.13, 0.16, 0.0, 0.021, 0.027, 0.092, 0.027, 0.032]
)
DRIVER_SCALE = np.array(
    [0.21, 0.24, 0.19, 0.22, 0.12, 0.19, 0.72, 0.91, 0.027, 0.034, 0.09, 0.036, 0.042]
)
EFFECT_CAP = 1.6  # cap on a gene's programme-driven log-scale size (norm of its effects)
DRIVER_CAP = 3.0  # standardised drivers saturate smoothly at +-3
N_HIDDEN = 4  # hidden smooth fields (programme activity that morphology cannot see)
# programme-name keyword -> primary driver, so that e.g. adipogenesis lives in fat
KEYWORD_DRIVER = (
    ("ADIPO", "adipose"),
    ("FATTY_ACID", "adipose"),
    ("LIPID", "adipose"),
    ("ANGIOGENESIS", "adipose"),
    ("COAGULATION", "adipose"),
    ("INTERFERON_GAMMA", "tumour_x_nbhd_immune"),
    ("INTERFERON_ALPHA", "tumour_x_slide_immune"),
    ("ALLOGRAFT", "tumour_x_nbhd_immune"),
    ("B_CELL", "immune"),
    ("T_CELL", "immune"),
    ("LYMPHOCYTE", "immune"),
    ("LEUKOCYTE", "immune"),
    ("IMMUNE", "immune"),
    ("INFLAMMATORY", "immune"),
    ("COMPLEMENT", "immune"),
    ("COLLAGEN", "stroma"),
    ("EXTRACELLULAR", "stroma"),
    ("MYOGENESIS", "stroma"),
    ("TGF_BETA", "stroma"),
    ("EPITHELIAL_MESENCHYMAL", "tumour_x_nbhd_stroma"),
    ("HYPOXIA", "nbhd_necrosis"),
    ("GLYCOLYSIS", "nbhd_necrosis"),
    ("APOPTOSIS", "necrosis"),
    ("E2F", "tumour"),
    ("G2M", "nuclear_density"),
    ("MITOTIC", "tumour"),
    ("MYC_TARGETS", "tumour"),
    ("APICAL", "epithelium"),
    ("ESTROGEN", "epithelium"),
    ("ANDROGEN", "epithelium"),
)

# --- geometry (Visium; the spot lattice and pixel size are in synthetic_geometry) ---
SPOT_DIAMETER_UM = 55.0
VISIUM_FRAME = (78, 64)  # rows x spots per row (array_col 0..127, parity follows the row)
FRAME_ORIGIN_PX = 1200.0  # margin between image border and the first spot centre
NICHE_SIGMA_UM = 150.0  # smoothing of niche fields
TISSUE_SIGMA_UM = 500.0  # smoothing of the tissue outline field
HIDDEN_SIGMA_UM = 200.0  # smoothing of hidden programme fields
NEIGHBOURHOOD_UM = 300.0  # radius of the neighbourhood features
IMAGE_STREAM = 0x494D47  # "IMG": images draw from SeedSequence([seed, IMAGE_STREAM]), no other
NICHE_SHARPNESS = 2.2  # softmax gain: higher gives purer spots

# --- counts ---
# depth scale: the observed median library is ~2x this (programme variation adds mass), so
# about 6,000 UMIs per spot over the simulated genes, as on Visium
LIB_SCALE = 3000.0
LIB_SLIDE_SD = 0.35  # log-scale sd of slide depth (hidden)
LIB_SPOT_SD = 0.3  # log-scale sd of spot depth around the slide (hidden)
LIB_NUCLEAR = 0.25  # log depth per sd of nuclear density (visible: cellular spots yield more)
SLIDE_PROGRAMME_SD = 0.2  # sd of hidden per-slide programme offsets
XENIUM_LOG_EFFICIENCY = np.log(1.5)  # targeted panels capture more per gene
DISPERSIONS = np.linspace(0.1, 0.5, 9)  # NB dispersion levels: var = mu + phi mu^2

# --- embeddings ---
MLP_HIDDEN = 128
CANCER_TELL = 0.1  # weight of a cancer-specific morphological tell in the MLP input: weak, so
# the cancer type must mostly come from the condition (0.4 let a whole-slide model infer it: the
# no-conditioning ablation then lost only 0.001 HVG-50; at 0.1 it loses 0.022)
STAIN_SCALE_SD = 0.15  # log-scale sd of the per-slide embedding scale
STAIN_SHIFT_SD = 0.35  # sd of the per-slide additive embedding shift (per dimension)
SPOT_NOISE_SD = 0.6  # sd of per-spot embedding noise (per dimension; signal sd is ~1)

# --- ceiling table ---
LOGMU_LO, LOGMU_STEP, LOGMU_N = -16.0, 0.1, 321  # uniform grid of log NB means
FINE_LO, FINE_STEP, FINE_N = -26.0, 0.02, 2601  # finer grid for the un-smoothed expectation
NB_EXACT_MAX = 50.0  # above this mean, the gamma asymptote of E log1p is exact to < 1e-3


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of a synthetic cohort."""

    n_slides: int = 24  # slides in the cohort
    n_cancers: int = 4  # cancer codes taken from CANCERS[:n_cancers]
    spots: tuple[int, int] = (400, 1200)  # min/max spots under tissue per slide
    n_genes: int = 3000  # genes in the universe, capped at the 38,982 panel size
    embed_dim: int = 384  # embedding dimension
    targeted_fraction: float = 0.15  # share of slides measuring only a targeted panel (Xenium-like)
    targeted_genes: int = 400  # targeted panel size (at most half of n_genes)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test share, by patient
    encoder: str = "synthetic"  # folder name under embeddings/
    ceiling_draws: int = 16  # Gauss-Hermite nodes over the hidden part for the ceiling
    seed: int = 0  # seed of everything
    images: bool = False  # also write H&E-like wsis/{id}.tif and HEST patches/{id}.h5
    image_patches: bool = True  # with images: write patches/{id}.h5 too (~80 KB per spot)
    # --- the world's biology and measurement (defaults: the built-in cohort; draw_world varies
    # them). Each is a multiplier or an sd on the scale of the constants named.
    cancer_effect: float = 1.0  # size of what differs by cancer type: gene offsets (sd 0.3 x
    # this) and the cancer-specific part of the tissue -> programme map
    cancer_tell: float = CANCER_TELL  # how visible the cancer type is in one spot's morphology
    context_strength: float = 1.0  # weight of neighbourhood and slide-level programme drivers
    slide_programme_sd: float = SLIDE_PROGRAMME_SD  # hidden per-slide programme offsets
    depth_slide_sd: float = LIB_SLIDE_SD  # log-scale sd of sequencing depth between slides
    stain_shift_sd: float = STAIN_SHIFT_SD  # per-slide additive shift of every embedding dim
    stain_scale_sd: float = STAIN_SCALE_SD  # per-slide log-scale of the embeddings
    spot_noise_sd: float = SPOT_NOISE_SD  # per-spot embedding noise (signal sd ~1 per dim)
    embed_nonlinearity: float = 1.0  # input gain of the embedding map's tanh layer: 0.3 is
    # nearly linear, 3 saturates (a foundation model's features are far from linear in biology)


def tiny(seed: int = 0) -> SyntheticConfig:
    """A test-size config: 8 slides, 2 cancers, 80-200 spots, 300 genes, 32-d embeddings.

    Every cancer gets at least 2 train, 1 val and 1 test slide, and one slide is targeted.
    """
    return SyntheticConfig(
        n_slides=8,
        n_cancers=2,
        spots=(80, 200),
        n_genes=300,
        embed_dim=32,
        targeted_genes=100,
        seed=seed,
    )


EMBED_DIMS = (64, 128, 256, 384, 512, 768, 1024, 1280, 1536)  # what pathology encoders emit


def draw_world(seed: int, *, n_slides: int = 20, n_genes: int = 1000) -> SyntheticConfig:
    """A cohort config whose biology and measurement are drawn from ``seed``, over ranges that
    real cohorts span, so that a recipe can be measured on many worlds instead of one.

    Varied: number of cancer types (2-6); size of the cancer-type effect (0.2-3x the built-in,
    log-uniform) and how visible the type is in a spot (0-0.6); weight of neighbourhood and
    slide-level programmes (0-2x); hidden per-slide programme offsets and depth; per-slide stain
    shift and scale; per-spot embedding noise; embedding dimension (64-1536) and how nonlinear
    the embedding map is (gain 0.3-3); spots per slide (120-1,200); share of targeted-panel
    slides (0-0.35). ``n_slides`` and ``n_genes`` size the cohort. Every world keeps its exact
    ceiling (``ceiling/``). Same seed, same world.
    """
    rng = np.random.default_rng([seed, 0x574F524C44])  # "WORLD": not the cohort's own stream
    low = int(rng.integers(120, 500))
    n_cancers = int(rng.integers(2, 7))
    return SyntheticConfig(
        n_slides=max(n_slides, 4 * n_cancers),  # room for train, val and test of every type
        n_cancers=n_cancers,
        spots=(low, int(low * rng.uniform(1.3, 2.5))),
        n_genes=n_genes,
        embed_dim=int(rng.choice(EMBED_DIMS)),
        targeted_fraction=float(rng.uniform(0.05, 0.35)) if rng.random() < 0.7 else 0.0,
        targeted_genes=max(50, n_genes // 8),
        seed=seed,
        cancer_effect=float(np.exp(rng.uniform(np.log(0.2), np.log(3.0)))),
        cancer_tell=float(rng.uniform(0.0, 0.6)),
        context_strength=float(rng.uniform(0.0, 2.0)),
        slide_programme_sd=float(rng.uniform(0.05, 0.5)),
        depth_slide_sd=float(rng.uniform(0.1, 0.7)),
        stain_shift_sd=float(rng.uniform(0.05, 1.0)),
        stain_scale_sd=float(rng.uniform(0.02, 0.4)),
        spot_noise_sd=float(rng.uniform(0.2, 1.2)),
        embed_nonlinearity=float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))),
    )


# --- bundled data -------------------------------------------------------------------------------


def _gpc_sets() -> dict[str, list[str]]:
    """The bundled GPC gene sets as programmes: Hallmark then GO, name -> symbols."""
    return {n: g for c in GENESET_COLLECTIONS for n, g in gpc_genesets(c).items()}


def _bench_symbols(n_cancers: int) -> list[str]:
    """HEST-bench HVG symbols of the first ``n_cancers`` CANCERS (all have a task), no repeats."""
    return list(dict.fromkeys(g for c in CANCERS[:n_cancers] for g in bench_hvg(c) or ()))


def _ensembl_ids(symbols: np.ndarray) -> np.ndarray:
    """Ensembl id per symbol (first listed); a stable made-up ENSG9... id where none is known."""
    known = gene_table()["ensembl"].reindex(symbols).to_numpy(dtype=object)
    for i in np.flatnonzero(pd.isna(known)):
        known[i] = f"ENSG9{zlib.crc32(str(symbols[i]).encode()) % 10**10:010d}"
    return known.astype(str)


# --- gene universe and the cohort-wide "world" ------------------------------------------------


@dataclass(frozen=True)
class _Genes:
    """The gene universe, sorted by symbol."""

    symbols: np.ndarray  # (G,) str, gene symbols
    ensembl: np.ndarray  # (G,) str, Ensembl ids
    sets: dict[str, np.ndarray]  # programme name -> gene indices (G-index, int)
    hvg: np.ndarray  # (G,) bool, HEST-bench HVG of one of the cohort's cancers


def _pick_symbols(cfg: SyntheticConfig, rng: np.random.Generator) -> list[str]:
    """Bench HVGs first, then whole GPC sets (random order) while they fit, then panel fillers."""
    n_genes = min(cfg.n_genes, PANEL_SIZE)
    chosen = dict.fromkeys(_bench_symbols(cfg.n_cancers))
    sets = list(_gpc_sets().values())
    for i in rng.permutation(len(sets)):
        new = [g for g in sets[i] if g not in chosen]
        if len(chosen) + len(new) <= n_genes:
            chosen.update(dict.fromkeys(new))
    if len(chosen) < n_genes:  # fill with panel genes, so the model's panel covers them
        table = gene_table()
        pool = np.array(sorted(set(table.index[table["in_panel"]]) - set(chosen)))
        chosen.update(dict.fromkeys(rng.choice(pool, n_genes - len(chosen), replace=False)))
    return list(chosen)[:n_genes]


def _gene_universe(cfg: SyntheticConfig, rng: np.random.Generator) -> _Genes:
    """Gene universe with programme membership (sets keep only genes in the universe)."""
    symbols = np.array(sorted(_pick_symbols(cfg, rng)))
    index = {g: i for i, g in enumerate(symbols)}
    sets = {}
    for name, genes in _gpc_sets().items():
        idx = np.array([index[g] for g in genes if g in index], dtype=np.int64)
        if len(idx) >= 3:  # a programme needs a few genes to be a programme
            sets[name] = idx
    hvg = np.isin(symbols, _bench_symbols(cfg.n_cancers))
    return _Genes(symbols, _ensembl_ids(symbols), sets, hvg)


def _loadings(genes: _Genes, rng: np.random.Generator) -> np.ndarray:
    """Positive gene loadings on programmes, (P, G); bench HVGs outside every set join two.

    A gene in k programmes gets loadings ~ U(0.4, 0.8) / sqrt(k), so its total programme-driven
    log-scale sd is similar whatever k is; bench HVGs are boosted to be clearly variable.
    """
    n_prog, n_genes = len(genes.sets), len(genes.symbols)
    member = np.zeros((n_prog, n_genes), dtype=bool)
    for p, idx in enumerate(genes.sets.values()):
        member[p, idx] = True
    orphans = np.flatnonzero(genes.hvg & ~member.any(axis=0))
    for g in orphans:  # bench HVGs must be driven by programmes
        member[rng.choice(n_prog, 2, replace=False), g] = True
    load = rng.uniform(0.4, 0.8, member.shape) * member
    load /= np.sqrt(np.maximum(member.sum(axis=0), 1))
    load[:, genes.hvg] *= 1.6
    return load


def _programme_drivers(
    names: list[str], cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Driver -> programme activity maps.

    Returns
    -------
    visible : (C, Kd, P) float, standardised visible drivers -> activity, per cancer
        (shared part + cancer-specific part: the same morphology means different expression;
        ``cfg.cancer_effect`` scales the cancer-specific part, ``cfg.context_strength`` the
        neighbourhood and slide-level drivers).
    hidden : (N_HIDDEN, P) float, hidden unit fields -> activity.
    """
    n_vis, n_prog = len(VIS_DRIVERS), len(names)
    base, hidden = np.zeros((n_vis, n_prog)), np.zeros((N_HIDDEN, n_prog))
    for p, name in enumerate(names):
        hit = [VIS_DRIVERS.index(d) for key, d in KEYWORD_DRIVER if key in name]
        kind = "keyword" if hit else rng.choice(list(PRIMARY_KIND), p=list(PRIMARY_KIND.values()))
        if kind == "hidden":  # a programme morphology cannot see
            hidden[rng.integers(N_HIDDEN), p] = rng.uniform(0.8, 1.2)
        else:
            pools = {"keyword": hit, "spot": range(N_SPOT_DRIVERS)}
            pool = pools.get(kind, range(N_SPOT_DRIVERS, n_vis))  # else: context
            base[rng.choice(list(pool)), p] = rng.uniform(0.8, 1.2)
        base[rng.choice(n_vis, 2, replace=False), p] += rng.normal(0.0, 0.4, 2)
        hidden[rng.integers(N_HIDDEN), p] += rng.normal(0.0, 0.3)
    n_cancers = cfg.n_cancers
    gain = rng.uniform(0.4, 1.6, (n_cancers, 1, n_prog))  # cancer-specific strength ...
    extra = np.zeros((n_cancers, n_vis, n_prog))  # ... and cancer-specific drivers
    for c in range(n_cancers):
        rows = rng.integers(n_vis, size=(2, n_prog))
        extra[c, rows, np.arange(n_prog)] = rng.normal(0.0, 0.7, (2, n_prog))
    gain = 1.0 + cfg.cancer_effect * (gain - 1.0)
    visible = base[None] * np.clip(gain, 0.05, None) + cfg.cancer_effect * extra
    visible[:, N_SPOT_DRIVERS:] *= cfg.context_strength
    return visible, hidden


@dataclass(frozen=True)
class _World:
    """Cohort-wide parameters: the same for every slide."""

    genes: _Genes
    base: np.ndarray  # (G,) log share of the library at the average tissue state
    offset: np.ndarray  # (C, G) cancer-specific log offsets
    effect: np.ndarray  # (C, Kd, G) standardised visible drivers -> log mean
    hidden: np.ndarray  # (N_HIDDEN, G) hidden unit fields -> log mean
    loadings: np.ndarray  # (P, G) gene loadings, for per-slide hidden programme offsets
    dispersion: np.ndarray  # (G,) int, index into DISPERSIONS
    hidden_sd: np.ndarray  # (G,) sd of the whole hidden log-scale term
    panel: np.ndarray  # (G_t,) int, genes measured on targeted slides, sorted
    mlp: tuple[np.ndarray, np.ndarray, np.ndarray]  # W1 (S, H), b1 (H,), W2 (H, D)
    ceiling: np.ndarray  # (G, LOGMU_N) E[log1p counts | visible log mean] on the log-mean grid


def _baseline(genes: _Genes, in_prog: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like log shares (G,): many low genes, a few very high; HVGs and programmes higher."""
    priority = rng.normal(0.0, 1.0, len(genes.symbols)) + 1.0 * genes.hvg + 0.5 * in_prog
    rank = np.empty(len(priority))
    rank[np.argsort(-priority)] = np.arange(len(priority))
    logshare = -np.log(rank + 10.0) + rng.normal(0.0, 0.3, len(rank))
    return logshare - np.log(np.exp(logshare).sum())


def _targeted_panel(
    genes: _Genes, in_prog: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Gene indices of the targeted panel: weighted towards HVGs and programme genes."""
    weight = 1.0 + 3.0 * genes.hvg + 2.0 * in_prog
    pick = rng.choice(len(weight), n, replace=False, p=weight / weight.sum())
    return np.sort(pick)


def _tanh_rescale(gain: float) -> float:
    """Output factor that keeps tanh(gain * z) units, z ~ N(0, 1.5^2), at the variance they have
    at gain 1 (Gauss-Hermite expectation; exactly 1 at gain 1)."""
    nodes, weights = np.polynomial.hermite.hermgauss(64)

    def var(g: float) -> float:
        return float(weights @ np.tanh(1.5 * g * np.sqrt(2.0) * nodes) ** 2 / np.sqrt(np.pi))

    return float(np.sqrt(var(1.0) / var(gain)))


def _make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    """Draw the cohort-wide gene programmes, loadings, baselines and embedding MLP."""
    genes = _gene_universe(cfg, rng)
    load = _loadings(genes, rng)  # (P, G)
    visible, hidden_prog = _programme_drivers(list(genes.sets), cfg, rng)
    in_prog = load.any(axis=0)
    effect = np.einsum("ckp,pg->ckg", visible, load)  # (C, Kd, G)
    hidden = hidden_prog @ load  # (N_HIDDEN, G)
    # genes whose programmes pull the same way add up; cap their log-scale size (realistic tails)
    size = np.sqrt((effect**2).sum(1).mean(0) + (hidden**2).sum(0))  # (G,)
    shrink = np.minimum(1.0, EFFECT_CAP / np.maximum(size, 1e-12))
    effect, hidden = effect * shrink, hidden * shrink
    n_genes = len(genes.symbols)
    offset = rng.normal(0.0, 0.3 * cfg.cancer_effect, (cfg.n_cancers, n_genes))
    dispersion = rng.integers(len(DISPERSIONS), size=n_genes)
    hidden_var = (hidden**2).sum(0) + cfg.slide_programme_sd**2 * (load**2).sum(0)
    hidden_sd = np.sqrt(hidden_var + cfg.depth_slide_sd**2 + LIB_SPOT_SD**2)
    n_panel = min(cfg.targeted_genes, n_genes // 2)
    n_look = len(NICHES) + 4 + cfg.n_cancers
    gain = cfg.embed_nonlinearity
    mlp = (
        rng.normal(0.0, 1.5 * gain / np.sqrt(n_look), (n_look, MLP_HIDDEN)),
        rng.normal(0.0, 0.5, MLP_HIDDEN),
        # tanh units have variance ~0.4 at gain 1, so outputs come out with sd ~1 per dimension;
        # other gains are rescaled to the same output sd
        rng.normal(0.0, 1.0 / np.sqrt(MLP_HIDDEN * 0.4), (MLP_HIDDEN, cfg.embed_dim))
        * _tanh_rescale(gain),
    )
    return _World(
        genes=genes,
        base=_baseline(genes, in_prog, rng),
        offset=offset,
        effect=effect,
        hidden=hidden,
        loadings=load,
        dispersion=dispersion,
        hidden_sd=hidden_sd,
        panel=_targeted_panel(genes, in_prog, n_panel, rng),
        mlp=mlp,
        ceiling=_ceiling_table(dispersion, hidden_sd, cfg.ceiling_draws),
    )


# --- negative binomial expectation and the ceiling table --------------------------------------


def _nb_log1p_exact(mu: np.ndarray, phi: float, n_terms: int) -> np.ndarray:
    """E[log1p(X)], X ~ NB(mu, phi), by summing the pmf over 0..n_terms-1; (len(mu),) float64."""
    k = np.arange(float(n_terms))
    r, q = 1.0 / phi, phi * mu / (1.0 + phi * mu)
    ratio = np.ones((len(mu), n_terms))  # pmf(k) / pmf(k - 1) = (k - 1 + r) / k * q
    ratio[:, 1:] = ((k[:-1] + r) / k[1:])[None] * q[:, None]
    pmf = np.exp(-r * np.log1p(phi * mu))[:, None] * np.cumprod(ratio, axis=1)
    return pmf @ np.log1p(k)


@cache
def _nb_log1p_table() -> np.ndarray:
    """E[log1p(X)], X ~ NB(mean=exp(l), dispersion), on the fine log-mean grid.

    Returns (len(DISPERSIONS), FINE_N) float64. Exact pmf sums up to NB_EXACT_MAX; above it, the
    gamma asymptote log mu + digamma(r) - log r + 1 / (2 mu (1 - phi)), r = 1/phi.
    """
    mu = np.exp(FINE_LO + FINE_STEP * np.arange(FINE_N))
    table = np.empty((len(DISPERSIONS), FINE_N))
    # terms needed: P(X >= 60) < 1e-15 for mean <= 1, P(X >= 1000) < 1e-15 for mean <= 50
    tiers = [(mu <= 1.0, 60), ((mu > 1.0) & (mu <= NB_EXACT_MAX), 1000)]
    big = mu > NB_EXACT_MAX
    for j, phi in enumerate(DISPERSIONS):
        for where, n_terms in tiers:
            table[j, where] = _nb_log1p_exact(mu[where], phi, n_terms)
        r = 1.0 / phi
        asymptote = digamma(r) - np.log(r) + 1.0 / (2 * mu[big] * (1 - phi))
        table[j, big] = np.log(mu[big]) + asymptote
    return table


def _ceiling_table(dispersion: np.ndarray, hidden_sd: np.ndarray, n_nodes: int) -> np.ndarray:
    """Per-gene E[log1p(counts)] as a function of the visible log mean, (G, LOGMU_N) float32.

    The hidden log-scale term is N(0, hidden_sd^2); integrate it with Gauss-Hermite nodes.
    """
    nodes, weights = np.polynomial.hermite.hermgauss(n_nodes)
    grid = LOGMU_LO + LOGMU_STEP * np.arange(LOGMU_N)
    fine = _nb_log1p_table()
    out = np.empty((len(dispersion), LOGMU_N), dtype=np.float32)
    for j in np.unique(dispersion):
        genes = np.flatnonzero(dispersion == j)
        shift = np.sqrt(2.0) * hidden_sd[genes, None, None] * nodes  # (g, 1, Q)
        t = np.clip((grid[None, :, None] + shift - FINE_LO) / FINE_STEP, 0, FINE_N - 1.001)
        i = t.astype(np.int64)
        value = fine[j, i] + (t - i) * (fine[j, i + 1] - fine[j, i])  # (g, M, Q)
        out[genes] = value @ weights / np.sqrt(np.pi)
    return out


def _ceiling(table: np.ndarray, log_mu: np.ndarray) -> np.ndarray:
    """E[log1p(counts) | visible state], (N, g) float32, by interpolating ceiling tables.

    ``table`` (g, LOGMU_N) holds the rows of ``_World.ceiling`` of the g genes whose visible
    log mean is ``log_mu`` (N, g).
    """
    t = np.clip((log_mu - LOGMU_LO) / LOGMU_STEP, 0, LOGMU_N - 1.001).astype(np.float32)
    i = t.astype(np.int64)
    frac = t - i
    i += (np.arange(len(table)) * LOGMU_N)[None]  # row offsets into the flattened (g, M) table
    flat = table.ravel()
    return flat[i] + frac * (flat[i + 1] - flat[i])


# --- slide geometry -----------------------------------------------------------------------------


def _frame_shape(cfg: SyntheticConfig) -> tuple[int, int]:
    """Rows x spots per row: the Visium frame, grown when slides need more than ~30% of it."""
    grow = max(1.0, np.sqrt(cfg.spots[1] / (0.3 * VISIUM_FRAME[0] * VISIUM_FRAME[1])))
    return int(np.ceil(VISIUM_FRAME[0] * grow)), int(np.ceil(VISIUM_FRAME[1] * grow))


def _smooth_fields(
    rng: np.random.Generator, n: int, shape: tuple[int, int], sigma_um: float
) -> np.ndarray:
    """Unit-variance Gaussian random fields on the hex frame, (n, rows, cols) float.

    Periodic ('wrap') filtering makes every value exactly N(0, 1), which the ceiling relies on.
    """
    sigma = (sigma_um / ROW_PITCH_UM, sigma_um / PITCH_UM)
    noise = rng.standard_normal((n, *shape))
    fields = ndimage.gaussian_filter(noise, sigma=(0, *sigma), mode="wrap")
    delta = np.zeros(shape)
    delta[0, 0] = 1.0
    kernel = ndimage.gaussian_filter(delta, sigma=sigma, mode="wrap")
    return fields / np.sqrt((kernel**2).sum())


def _tissue_spots(rng: np.random.Generator, shape: tuple[int, int], n_spots: int) -> np.ndarray:
    """Flat frame indices (n_spots,) of an irregular tissue blob, sorted."""
    rows, cols = np.indices(shape)
    y_um, x_um = rows * ROW_PITCH_UM, cols * PITCH_UM
    radius = np.sqrt(n_spots * PITCH_UM * ROW_PITCH_UM / np.pi)  # of a disk with n_spots
    cy = shape[0] * ROW_PITCH_UM * rng.uniform(0.4, 0.6)
    cx = shape[1] * PITCH_UM * rng.uniform(0.4, 0.6)
    aspect = np.exp(rng.normal(0.0, 0.25))  # elongated blobs
    d2 = ((x_um - cx) * aspect) ** 2 + ((y_um - cy) / aspect) ** 2
    score = -2.0 * d2 / radius**2 + _smooth_fields(rng, 1, shape, TISSUE_SIGMA_UM)[0]
    return np.sort(np.argsort(-score.ravel(), kind="stable")[:n_spots])


def _hex_positions(spots: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Visium array indices and full-resolution pixel centres of frame spots.

    Returns ``array_row``, ``array_col`` (N,) int64 (array_col parity = array_row parity) and
    ``xy`` (N, 2) int64 pixel centres (x = column, y = row) at UM_PER_PX.
    """
    row, j = np.divmod(spots, shape[1])
    col = 2 * j + row % 2
    x = FRAME_ORIGIN_PX + col * (PITCH_UM / 2) / UM_PER_PX
    y = FRAME_ORIGIN_PX + row * ROW_PITCH_UM / UM_PER_PX
    xy = np.rint(np.stack([x, y], axis=1)).astype(np.int64)
    return {"array_row": row.astype(np.int64), "array_col": col.astype(np.int64), "xy": xy}


def _neighbour_mean(xy: np.ndarray, values: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean of ``values`` (N, k) over the other spots within ``radius_px``; own value if none."""
    pairs = cKDTree(xy).query_pairs(radius_px, output_type="ndarray")
    n = len(xy)
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    count = np.asarray(adj.sum(axis=1))
    total = adj @ values
    return np.where(count > 0, total / np.maximum(count, 1), values)


# --- visible tissue state -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Tissue:
    """What a slide looks like: fixed when the ceiling integrates over what it does not show."""

    spots: np.ndarray  # (N,) int, flat frame indices
    array_row: np.ndarray  # (N,) int64
    array_col: np.ndarray  # (N,) int64
    xy: np.ndarray  # (N, 2) int64, spot centres in level-0 px (x, y)
    composition: np.ndarray  # (N, 6) float, niche shares (rows sum to 1)
    drivers: np.ndarray  # (N, Kd) float, standardised visible drivers of expression
    look: np.ndarray  # (N, S) float, per-spot visible state fed to the embedding MLP


def _composition(
    rng: np.random.Generator, shape: tuple[int, int], spots: np.ndarray, cancer: int
) -> np.ndarray:
    """Soft niche composition (N, 6): softmax of smooth fields plus cancer/slide abundance."""
    fields = _smooth_fields(rng, len(NICHES), shape, NICHE_SIGMA_UM).reshape(len(NICHES), -1)
    fields = fields[:, spots].T  # (N, 6)
    fields[:, 4] = 0.6 * fields[:, 4] + 0.8 * fields[:, 0]  # necrosis sits inside tumour
    prior = NICHE_LOG_ABUNDANCE[cancer] + rng.normal(0.0, 0.5, len(NICHES))
    logits = NICHE_SHARPNESS * fields + prior
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def _tissue(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_spots: int,
    cancer: int,
    cfg: SyntheticConfig,
) -> _Tissue:
    """Draw a slide's tissue: outline, niches, visible covariates and context drivers."""
    spots = _tissue_spots(rng, shape, n_spots)
    pos = _hex_positions(spots, shape)
    comp = _composition(rng, shape, spots, cancer)
    covariates = _smooth_fields(rng, 4, shape, NICHE_SIGMA_UM).reshape(4, -1)[:, spots].T
    # nuclear density: cellular niches are dense, fat and necrosis are not; plus local variation
    nuclear = comp @ NUCLEAR_BY_NICHE + 0.5 * covariates[:, 0]
    texture = covariates[:, 1]  # e.g. collagen fibre alignment, visible and expression-relevant
    nbhd = _neighbour_mean(pos["xy"], comp, NEIGHBOURHOOD_UM / UM_PER_PX)  # (N, 6)
    tumour = comp[:, 0]
    hot = comp[:, 2].mean()  # slide-wide immune share: "hot" tumours respond everywhere
    context = [tumour * nbhd[:, 2], tumour * nbhd[:, 1], nbhd[:, 4], comp[:, 1] * nbhd[:, 0]]
    context.append(tumour * hot)
    raw = np.column_stack([comp, nuclear, texture, *context])  # order of VIS_DRIVERS
    # standardise, then saturate: products of shares are skewed and must not explode exp()
    drivers = DRIVER_CAP * np.tanh((raw - DRIVER_CENTRE) / DRIVER_SCALE / DRIVER_CAP)
    tell = np.zeros((n_spots, cfg.n_cancers))
    tell[:, cancer] = cfg.cancer_tell
    # the look: one spot's worth of tissue (no neighbourhood); two nuisance visible fields
    look = np.column_stack([(comp - 1 / 6) / 0.3, nuclear, texture, covariates[:, 2:], tell])
    # (the image renderer reads nuclear, texture and the first nuisance back: see _spot_look)
    return _Tissue(spots, pos["array_row"], pos["array_col"], pos["xy"], comp, drivers, look)


# --- expression ---------------------------------------------------------------------------------


def _visible_log_mean(world: _World, tissue: _Tissue, cancer: int, targeted: bool) -> np.ndarray:
    """Log NB mean (N, G) given the visible state only (hidden terms at their mean, zero)."""
    log_mu = tissue.drivers @ world.effect[cancer] + world.base + world.offset[cancer]
    nuclear = tissue.drivers[:, VIS_DRIVERS.index("nuclear_density")]
    depth = np.log(LIB_SCALE) + LIB_NUCLEAR * nuclear + XENIUM_LOG_EFFICIENCY * targeted
    return (log_mu + depth[:, None]).astype(np.float32)


def _hidden_log_term(
    world: _World,
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    shape: tuple[int, int],
    spots: np.ndarray,
) -> np.ndarray:
    """One draw of everything morphology cannot see, on the log-mean scale, (N, G) float32.

    Hidden programme fields, per-slide programme offsets, slide depth and spot depth: each
    Gaussian with mean zero, so the sum is N(0, world.hidden_sd^2) per spot and gene.
    """
    fields = _smooth_fields(rng, N_HIDDEN, shape, HIDDEN_SIGMA_UM).reshape(N_HIDDEN, -1)
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
    world: _World, rng: np.random.Generator, tissue: _Tissue, cfg: SyntheticConfig
) -> np.ndarray:
    """Patch embeddings (N, D) float32: fixed MLP of the look, slide stain shift, spot noise."""
    w1, b1, w2 = world.mlp
    signal = np.tanh(tissue.look @ w1 + b1) @ w2  # (N, D), roughly unit sd per dimension
    scale = np.exp(rng.normal(0.0, cfg.stain_scale_sd))
    shift = rng.normal(0.0, cfg.stain_shift_sd, cfg.embed_dim)
    noise = rng.normal(0.0, cfg.spot_noise_sd, signal.shape)
    return (signal * scale + shift + noise).astype(np.float32)


# --- cohort table and splits -------------------------------------------------------------------


def _patient_sizes(n: int, rng: np.random.Generator) -> list[int]:
    """Slides per patient (1-3) for n slides of one cancer, with >= 3 patients when n >= 3."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]), n - sum(sizes))))
    while len(sizes) < min(n, 3):  # val and test each need a patient of their own
        big = int(np.argmax(sizes))
        sizes[big] -= 1
        sizes.append(1)
    return sizes


def _assign_splits(
    sizes: list[int], fractions: tuple[float, ...], rng: np.random.Generator
) -> list[int]:
    """Split index (0 train, 1 val, 2 test) per patient of one cancer.

    The two smallest patients go to test and val (when there are >= 3 patients), the rest greedily
    to the split furthest below its share of slides.
    """
    order = list(rng.permutation(len(sizes)))
    order.sort(key=lambda p: sizes[p])
    split = [0] * len(sizes)
    have = np.zeros(3)
    if len(sizes) >= 3:
        for s, p in zip((2, 1), order[:2], strict=True):
            split[p], have[s] = s, have[s] + sizes[p]
        order = order[2:]
    target = np.asarray(fractions) / sum(fractions) * sum(sizes)
    for p in sorted(order, key=lambda p: -sizes[p]):
        s = int(np.argmax(target - have))
        split[p], have[s] = s, have[s] + sizes[p]
    return split


def _slide_table(cfg: SyntheticConfig, rng: np.random.Generator) -> pd.DataFrame:
    """One row per slide: id, cancer index, patient, split, targeted, n_spots."""
    rows = []
    per_cancer = np.full(cfg.n_cancers, cfg.n_slides // cfg.n_cancers)
    per_cancer[: cfg.n_slides % cfg.n_cancers] += 1
    for cancer, n in enumerate(per_cancer):
        sizes = _patient_sizes(int(n), rng)
        for size, split in zip(sizes, _assign_splits(sizes, cfg.split, rng), strict=True):
            patient = f"SYNP{len({r['patient'] for r in rows}):03d}"
            rows += [{"cancer": cancer, "patient": patient, "split": split}] * size
    table = pd.DataFrame(rows)
    table.insert(0, "id", [f"SYN{i:03d}" for i in range(len(table))])
    n_targeted = int(round(cfg.targeted_fraction * len(table)))
    table["targeted"] = np.isin(np.arange(len(table)), rng.permutation(len(table))[:n_targeted])
    table["n_spots"] = rng.integers(cfg.spots[0], cfg.spots[1] + 1, len(table))
    return table


def _metadata(table: pd.DataFrame, n_genes: list[int], rng: np.random.Generator) -> pd.DataFrame:
    """HEST-style metadata.csv rows for the slide table."""
    codes = [CANCERS[c] for c in table["cancer"]]
    return pd.DataFrame(
        {
            keys.META_ID: table["id"],
            keys.META_CANCER: codes,
            keys.META_PATIENT: table["patient"],
            keys.META_ORGAN: [ORGANS[c] for c in codes],
            keys.META_TECH: np.where(table["targeted"], "Xenium", "Visium"),
            "disease_state": "Cancer",
            keys.META_PIXEL_SIZE[0]: UM_PER_PX,
            keys.META_PIXEL_SIZE[1]: np.round(UM_PER_PX * rng.normal(1.0, 0.002, len(table)), 5),
            "spots_under_tissue": table["n_spots"],
            "nb_genes": n_genes,
            "inter_spot_dist": PITCH_UM,
            "spot_diameter": SPOT_DIAMETER_UM,
        }
    )


# --- writers ------------------------------------------------------------------------------------


def _barcode_whitelist(n: int, rng: np.random.Generator) -> np.ndarray:
    """n unique 10x-style barcodes (16 ACGT + '-1'), one per frame position, like Visium."""
    while True:
        letters = np.array(list("ACGT"))[rng.integers(0, 4, (n, 16))]
        codes = np.char.add(letters.view("<U16").ravel(), "-1")
        if len(np.unique(codes)) == n:
            return codes


def _st_anndata(
    counts: np.ndarray, tissue: _Tissue, barcodes: np.ndarray, genes: _Genes, idx: np.ndarray
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


def _ceiling_anndata(st: ad.AnnData, ceiling: np.ndarray, tissue: _Tissue, code: str) -> ad.AnnData:
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


def _write_embedding(
    path: Path,
    features: np.ndarray,
    xy: np.ndarray,
    barcodes: np.ndarray,
    rng: np.random.Generator,
    encoder: str,
) -> None:
    """features (N, D), coords (N, 2) px, barcodes (N,) str via ``write_embeddings``, in a shuffled
    spot order (extractors do not keep the h5ad's order; readers must align by barcode)."""
    order = rng.permutation(len(barcodes))
    write_embeddings(
        path, features[order], xy[order], barcodes[order], **{keys.H5_ATTR_ENCODER: encoder}
    )


# --- the cohort ---------------------------------------------------------------------------------


def _simulate_slide(
    world: _World,
    cfg: SyntheticConfig,
    slide: dict,
    shape: tuple[int, int],
    whitelist: np.ndarray,
    rng: np.random.Generator,
) -> dict:
    """One slide: ``st`` and ``ceiling`` AnnData, ``features`` (N, D), ``xy``, ``barcodes``."""
    cancer, targeted = int(slide["cancer"]), bool(slide["targeted"])
    tissue = _tissue(rng, shape, int(slide["n_spots"]), cancer, cfg)
    genes = world.panel if targeted else np.arange(len(world.genes.symbols))
    log_mu = _visible_log_mean(world, tissue, cancer, targeted)[:, genes]
    hidden = _hidden_log_term(world, cfg, rng, shape, tissue.spots)[:, genes]
    counts = _draw_counts(rng, log_mu + hidden, world.dispersion[genes])
    barcodes = whitelist[tissue.spots]
    st = _st_anndata(counts, tissue, barcodes, world.genes, genes)
    ceiling = _ceiling(world.ceiling[genes], log_mu)
    return {
        "st": st,
        "ceiling": _ceiling_anndata(st, ceiling, tissue, CANCERS[cancer]),
        "features": _embed(world, rng, tissue, cfg),
        "xy": tissue.xy,
        "barcodes": barcodes,
        "tissue": tissue,
    }


def _frame_px(shape: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the level-0 image of the hex frame: the spots plus FRAME_ORIGIN_PX."""
    x_max = FRAME_ORIGIN_PX + (2 * shape[1] - 1) * (PITCH_UM / 2) / UM_PER_PX
    y_max = FRAME_ORIGIN_PX + (shape[0] - 1) * ROW_PITCH_UM / UM_PER_PX
    return int(np.ceil(x_max + FRAME_ORIGIN_PX)), int(np.ceil(y_max + FRAME_ORIGIN_PX))


def _write_images(
    out: Path,
    sid: str,
    sim: dict,
    frame: tuple[int, int],
    seq: np.random.SeedSequence,
    *,
    patches: bool = True,
) -> dict[str, float]:
    """``wsis/{sid}.tif`` and ``patches/{sid}.h5`` of one slide, from what its spots show."""
    from . import images as synthetic_images  # needs tifffile (the `wsi` extra)

    tissue, n = sim["tissue"], len(NICHES)
    look = synthetic_images.SpotLook(
        xy=tissue.xy,
        composition=tissue.composition,
        nuclear=tissue.look[:, n],
        texture=tissue.look[:, n + 1],
        thickness=tissue.look[:, n + 2],  # the first visible nuisance field
    )
    return synthetic_images.write_slide_images(
        look,
        sim["barcodes"],
        wsi_path=out / keys.WSI_DIR / f"{sid}.tif",
        patches_path=out / keys.PATCHES_DIR / f"{sid}.h5" if patches else None,
        frame=frame,
        seed=seq,
    )


def _validate(cfg: SyntheticConfig) -> None:
    if not 1 <= cfg.n_cancers <= len(CANCERS):
        raise ValueError(f"n_cancers must be 1..{len(CANCERS)}, got {cfg.n_cancers}")
    if cfg.n_slides < cfg.n_cancers:
        raise ValueError("need at least one slide per cancer type")
    if not 1 <= cfg.spots[0] <= cfg.spots[1]:
        raise ValueError(f"spots must be (min, max) with 1 <= min <= max, got {cfg.spots}")
    if cfg.n_genes < 10 or cfg.embed_dim < 1 or cfg.ceiling_draws < 1:
        raise ValueError("n_genes >= 10, embed_dim >= 1 and ceiling_draws >= 1 are required")
    if len(cfg.split) != 3 or min(cfg.split) < 0 or sum(cfg.split) <= 0:
        raise ValueError(f"split must be three non-negative shares, got {cfg.split}")
    if not 0.0 <= cfg.targeted_fraction <= 1.0 or cfg.targeted_genes < 1:
        raise ValueError("targeted_fraction must be in [0, 1] and targeted_genes >= 1")


def _readme(cfg: SyntheticConfig) -> str:
    return (
        f"Synthetic spatial-transcriptomics cohort written by histoprism {__version__} "
        f"(histoprism.synthetic.world.make_cohort, {cfg}). Visium-like hex grids (100 um pitch, "
        "0.5 um/px) with six smooth tissue niches whose abundance and niche-to-programme map "
        "depend on the cancer type; gene programmes are the bundled GPC gene sets, some driven "
        "by the spot, some by its 300 um neighbourhood and some by hidden fields; raw counts "
        "are negative binomial. embeddings/ hold a fixed random MLP of what each spot looks "
        "like, with per-slide stain shifts and per-spot noise, in a shuffled spot order. "
        "ceiling/ holds E[log1p(counts) | what the tissue shows], the attainable prediction, "
        "with the true niche composition in obsm['niche_composition']. Same seed, same files.\n"
        + (
            "wsis/ hold H&E-like pyramidal TIFFs (0.5 um/px, the pixels of obsm['spatial']) and "
            "patches/ HEST patch files (224 px centred on the spots) rendered from what each spot "
            "shows: niche composition, nuclear density, stromal texture and a thickness nuisance, "
            "with a per-slide stain; never the hidden fields.\n"
            if cfg.images
            else ""
        )
    )


def make_cohort(out: str | Path, *, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write a synthetic cohort in the cohort-directory layout.

    Layout: docs/formats.md, "Cohort directory" (and "ceiling/{id}.h5ad (synthetic cohorts)").

    Parameters
    ----------
    out : directory to write (created; existing files of the same names are replaced).
    config : sizes and seed; the same config gives identical files.

    Returns
    -------
    The cohort directory, holding ``metadata.csv``, ``st/{id}.h5ad`` (raw counts, float32 CSR),
    ``embeddings/{encoder}/{id}.h5`` (features (N, D) float32, coords (N, 2) float64 px,
    barcodes (N,) bytes), ``splits/{train,val,test}_split.csv``, ``ceiling/{id}.h5ad``
    (E[log1p counts | visible], dense float32) and ``README.txt``; with ``config.images`` also
    ``wsis/{id}.tif`` (H&E-like pyramidal TIFF of the whole frame, 0.5 µm/px, the pixels of
    ``obsm['spatial']``) and ``patches/{id}.h5`` (HEST: img (N, 224, 224, 3) uint8 centred on the
    spots, coords (N, 2) int64 top-left corners, barcode (N, 1) bytes). Images draw their own
    random stream, so every other file is identical with and without them.
    """
    cfg, out, start = config, Path(out), time.perf_counter()
    _validate(cfg)
    world_seq, table_seq, *slide_seqs = np.random.SeedSequence(cfg.seed).spawn(2 + cfg.n_slides)
    world_rng, table_rng = np.random.default_rng(world_seq), np.random.default_rng(table_seq)
    world = _make_world(cfg, world_rng)
    shape = _frame_shape(cfg)
    whitelist = _barcode_whitelist(shape[0] * shape[1], world_rng)
    table = _slide_table(cfg, table_rng)
    image_seqs = np.random.SeedSequence([cfg.seed, IMAGE_STREAM]).spawn(cfg.n_slides)
    n_genes, image_s = [], np.zeros(2)
    for i, (slide, seq) in enumerate(zip(table.to_dict("records"), slide_seqs, strict=True)):
        rng = np.random.default_rng(seq)
        sim = _simulate_slide(world, cfg, slide, shape, whitelist, rng)
        for folder, adata in ((keys.ST_DIR, sim["st"]), (keys.CEILING_DIR, sim["ceiling"])):
            with atomic_path(out / folder / f"{slide['id']}.h5ad") as tmp:
                adata.write_h5ad(tmp)
        h5 = out / keys.EMBEDDINGS_DIR / cfg.encoder / f"{slide['id']}.h5"
        _write_embedding(h5, sim["features"], sim["xy"], sim["barcodes"], rng, cfg.encoder)
        n_genes.append(sim["st"].n_vars)
        if cfg.images:
            seconds = _write_images(
                out, slide["id"], sim, _frame_px(shape), image_seqs[i], patches=cfg.image_patches
            )
            image_s += (seconds["render_s"], seconds["write_s"])
    if cfg.images:
        log.info("synthetic images: %.1f s rendering, %.1f s writing", *image_s)
    _write_splits(out, table)
    with atomic_path(out / keys.METADATA_FILES[0]) as tmp:
        _metadata(table, n_genes, table_rng).to_csv(tmp, index=False)
    write_text_atomic(out / "README.txt", _readme(cfg))
    log.info(
        "synthetic cohort: %d slides in %.1f s -> %s", len(table), time.perf_counter() - start, out
    )
    return out


def _write_splits(out: Path, table: pd.DataFrame) -> None:
    for s, name in enumerate(keys.SPLIT_NAMES):
        part = table[table["split"] == s]
        codes = [CANCERS[c] for c in part["cancer"]]
        frame = pd.DataFrame({keys.SPLIT_ID: part["id"], keys.META_CANCER: codes})
        with atomic_path(out / keys.SPLITS_DIR / f"{name}_split.csv") as tmp:
            frame.to_csv(tmp, index=False)


__all__ = ["CANCERS", "NICHES", "SyntheticConfig", "draw_world", "make_cohort", "tiny"]
