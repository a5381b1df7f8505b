"""The built-in synthetic cohort: HEST-layout slides whose biology makes HistoPrism's claims testable.

``make_cohort(out, config=SyntheticConfig(...))`` writes the cohort directory (docs/formats.md,
"Cohort directory"). Generative model (all randomness from ``SyntheticConfig.seed``: one stream
for the world, one for the slide table, one per slide, and one per slide for images):

1. World (``world.py``). Gene programmes are the bundled GPC gene sets (Hallmark + GO); each
   programme's activity is a linear map of the visible drivers whose matrix is a shared part plus
   a substantial cancer-specific part, plus hidden smooth fields that morphology cannot see.
2. Slide table (here). Cancer type, patient, split (by patient), targeted panel, spot count.
3. Tissue (``tissue.py``). A Visium hex grid (100 µm pitch, 0.5 µm/px); an irregular blob of
   tissue; six niches (tumour, stroma, immune, normal epithelium, necrosis, adipose/vessel) from
   smooth random fields through a softmax, so spots are mixtures and regions are coherent over
   several hundred µm; two visible covariates and neighbourhood and slide-level features.
4. Measurements (``slide.py``). log mean = log library + gene baseline (Zipf-like) + cancer
   offset + loadings @ activity; counts ~ negative binomial (dispersion 0.1-0.5 per gene).
   Embeddings: a fixed random 2-layer MLP of one spot's visible state (composition, nuclear
   density, texture, two nuisance fields, a weak cancer tell), then a per-slide stain shift and
   scale and per-spot noise. The MLP sees one spot only: context must come from the model.
5. Ceiling (``ceiling.py``). Everything hidden (hidden fields, per-slide programme offsets,
   library size) enters the log mean additively and is exactly Gaussian given the visible state,
   so E[log1p(counts) | visible] is a per-gene 1-D integral: Gauss-Hermite over the hidden part
   (``ceiling_draws`` nodes) of E[log1p] of the negative binomial. This is what a Monte-Carlo
   average over fresh hidden draws converges to, without its noise.
6. Images (``SyntheticConfig.images``). H&E-like renderings of the visible state only
   (composition, nuclear density, texture, a thickness nuisance; ``images.py``), as a pyramidal
   TIFF and HEST patches, from a random stream of their own: every other file is the same with or
   without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .._core import keys
from .._core.files import atomic_path, write_text_atomic
from .._core.version import __version__
from ..io.readers.embeddings import write_embeddings
from .geometry import NICHES, PITCH_UM, UM_PER_PX
from .slide import simulate_slide
from .tissue import frame_px, frame_shape
from .world import CANCERS, ORGANS, VIS_DRIVERS, SyntheticConfig, draw_world, make_world, tiny

log = logging.getLogger(__name__)

SPOT_DIAMETER_UM = 55.0  # Visium spot, written to metadata.csv
IMAGE_STREAM = 0x494D47  # "IMG": images draw from SeedSequence([seed, IMAGE_STREAM]), no other
BUILT_IN = SyntheticConfig()  # the built-in cohort, make_cohort's default


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
        f"(histoprism.synthetic.cohort.make_cohort, {cfg}). Visium-like hex grids (100 um pitch, "
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


def make_cohort(out: str | Path, *, config: SyntheticConfig = BUILT_IN) -> Path:
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
    world, shape, whitelist, table, table_rng, slide_seqs = _streams(cfg)
    image_seqs = np.random.SeedSequence([cfg.seed, IMAGE_STREAM]).spawn(cfg.n_slides)
    n_genes, image_s = [], np.zeros(2)
    for i, (slide, seq) in enumerate(zip(table.to_dict("records"), slide_seqs, strict=True)):
        rng = np.random.default_rng(seq)
        sim = simulate_slide(world, cfg, slide, shape, whitelist, rng)
        for folder, adata in ((keys.ST_DIR, sim["st"]), (keys.CEILING_DIR, sim["ceiling"])):
            with atomic_path(out / folder / f"{slide['id']}.h5ad") as tmp:
                adata.write_h5ad(tmp)
        h5 = out / keys.EMBEDDINGS_DIR / cfg.encoder / f"{slide['id']}.h5"
        _write_embedding(h5, sim["features"], sim["xy"], sim["barcodes"], rng, cfg.encoder)
        n_genes.append(sim["st"].n_vars)
        if cfg.images:
            seconds = _write_images(
                out, slide["id"], sim, frame_px(shape), image_seqs[i], patches=cfg.image_patches
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


def _streams(cfg: SyntheticConfig):
    """The cohort's world, frame shape, barcode whitelist, slide table, the table's stream (its
    metadata draws come after the slides) and one seed sequence per slide, as ``make_cohort``
    draws them: what replaying a cohort needs to reproduce it."""
    world_seq, table_seq, *slide_seqs = np.random.SeedSequence(cfg.seed).spawn(2 + cfg.n_slides)
    world_rng, table_rng = np.random.default_rng(world_seq), np.random.default_rng(table_seq)
    world = make_world(cfg, world_rng)
    shape = frame_shape(cfg)
    whitelist = _barcode_whitelist(shape[0] * shape[1], world_rng)
    table = _slide_table(cfg, table_rng)
    return world, shape, whitelist, table, table_rng, slide_seqs


def true_drivers(
    config: SyntheticConfig, ids: Iterable[str] | None = None
) -> dict[str, pd.DataFrame]:
    """The visible drivers of expression behind a synthetic cohort's slides, which its files do
    not hold: slide id -> (N, Kd) standardised drivers (``world.VIS_DRIVERS`` columns, indexed
    by barcode), replayed from ``config`` exactly as ``make_cohort`` drew them. ``ids``: only
    these slides (default all). For diagnostics: which part of the ceiling a model misses."""
    world, shape, whitelist, table, _, slide_seqs = _streams(config)
    wanted = None if ids is None else set(ids)
    out = {}
    for slide, seq in zip(table.to_dict("records"), slide_seqs, strict=True):
        if wanted is not None and slide["id"] not in wanted:
            continue
        sim = simulate_slide(world, config, slide, shape, whitelist, np.random.default_rng(seq))
        out[slide["id"]] = pd.DataFrame(
            sim["tissue"].drivers, index=sim["barcodes"], columns=list(VIS_DRIVERS)
        )
    return out


def _write_splits(out: Path, table: pd.DataFrame) -> None:
    for s, name in enumerate(keys.SPLIT_NAMES):
        part = table[table["split"] == s]
        codes = [CANCERS[c] for c in part["cancer"]]
        frame = pd.DataFrame({keys.SPLIT_ID: part["id"], keys.META_CANCER: codes})
        with atomic_path(out / keys.SPLITS_DIR / f"{name}_split.csv") as tmp:
            frame.to_csv(tmp, index=False)


__all__ = [
    "CANCERS",
    "NICHES",
    "SyntheticConfig",
    "draw_world",
    "make_cohort",
    "tiny",
    "true_drivers",
]
