"""The synthetic world: what every slide of a cohort shares, drawn once from the config's seed.

Data path: ``SyntheticConfig`` (sizes, seed and the biology knobs that ``draw_world`` varies) ->
``make_world(cfg, rng)`` -> ``World``:

- genes: the universe of G genes (bench HVGs first, then whole bundled GPC gene sets, then panel
  fillers), sorted by symbol, and the P programmes (gene sets) with their member indices;
- programme loadings (P, G); visible drivers -> log mean, per cancer, (C, Kd, G) with Kd =
  len(VIS_DRIVERS); hidden unit fields -> log mean (N_HIDDEN, G); cancer offsets (C, G); the
  gene baseline (G,) (Zipf-like log shares);
- NB dispersion level per gene (G,) (index into DISPERSIONS) and the sd of the gene's whole
  hidden log-scale term (G,);
- the targeted panel (G_t,), the embedding MLP (W1 (S, H), b1 (H,), W2 (H, D)) and the ceiling
  table (G, LOGMU_N) of ``ceiling.ceiling_table``.

Each programme's activity is a linear map of the visible drivers (a shared part plus a
cancer-specific part) plus hidden smooth fields that morphology cannot see.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..expression.genes import GENESET_COLLECTIONS, bench_hvg, gene_table, gpc_genesets
from .ceiling import ceiling_table
from .geometry import NICHES

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
EFFECT_CAP = 1.6  # cap on a gene's programme-driven log-scale size (norm of its effects)
N_HIDDEN = 4  # hidden smooth fields (programme activity that morphology cannot see)
HIDDEN_SIGMA_UM = 200.0  # smoothing of the hidden programme fields
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
# weight of a cancer-specific morphological tell in the MLP input: weak, so that the cancer type
# must mostly come from the condition (at 0.4 a whole-slide model could infer it)
CANCER_TELL = 0.1
STAIN_SCALE_SD = 0.15  # log-scale sd of the per-slide embedding scale
STAIN_SHIFT_SD = 0.35  # sd of the per-slide additive embedding shift (per dimension)
SPOT_NOISE_SD = 0.6  # sd of per-spot embedding noise (per dimension; signal sd is ~1)


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
class Genes:
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


def _gene_universe(cfg: SyntheticConfig, rng: np.random.Generator) -> Genes:
    """Gene universe with programme membership (sets keep only genes in the universe)."""
    symbols = np.array(sorted(_pick_symbols(cfg, rng)))
    index = {g: i for i, g in enumerate(symbols)}
    sets = {}
    for name, genes in _gpc_sets().items():
        idx = np.array([index[g] for g in genes if g in index], dtype=np.int64)
        if len(idx) >= 3:  # a programme needs a few genes to be a programme
            sets[name] = idx
    hvg = np.isin(symbols, _bench_symbols(cfg.n_cancers))
    return Genes(symbols, _ensembl_ids(symbols), sets, hvg)


def _loadings(genes: Genes, rng: np.random.Generator) -> np.ndarray:
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
class World:
    """Cohort-wide parameters: the same for every slide."""

    genes: Genes
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


def _baseline(genes: Genes, in_prog: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like log shares (G,): many low genes, a few very high; HVGs and programmes higher."""
    priority = rng.normal(0.0, 1.0, len(genes.symbols)) + 1.0 * genes.hvg + 0.5 * in_prog
    rank = np.empty(len(priority))
    rank[np.argsort(-priority)] = np.arange(len(priority))
    logshare = -np.log(rank + 10.0) + rng.normal(0.0, 0.3, len(rank))
    return logshare - np.log(np.exp(logshare).sum())


def _targeted_panel(
    genes: Genes, in_prog: np.ndarray, n: int, rng: np.random.Generator
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


def make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> World:
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
    return World(
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
        ceiling=ceiling_table(DISPERSIONS[dispersion], hidden_sd, cfg.ceiling_draws),
    )


__all__ = [
    "CANCERS",
    "EMBED_DIMS",
    "NICHES",
    "SyntheticConfig",
    "World",
    "draw_world",
    "make_world",
    "tiny",
]
