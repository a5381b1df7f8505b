"""``histoprism extract``: patches or whole-slide images -> ``embeddings/{encoder}/{id}.h5``.

Per slide the source is HEST's ``patches/{id}.h5`` when present (``source="auto"``), else the
slide's image (``wsis/{id}.*`` or the metadata's ``wsi_path``) cut into patches centred on the spots
of ``st/{id}.h5ad`` at the encoder's µm/px. A slide that was never sequenced gets a hexagonal grid
of virtual spots over its tissue, so its embeddings can be predicted on.

Each slide's file is written to a temporary name and renamed when complete, and finished slides are
skipped: a killed run restarts where it stopped. Under ``torchrun`` each rank takes every
WORLD_SIZE-th slide; no process group is needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._core import keys
from .._core.distributed import local_device, rank_share
from .._core.errors import InputError
from .._core.progress import progress_bar
from ..io.cohort import Cohort
from ..io.readers.embeddings import write_embeddings
from ..io.readers.hest import read_hest_patches
from ..io.readers.st import read_st
from .encoders import Encoder, load_encoder

log = logging.getLogger(__name__)

SOURCES = ("auto", "patches", "wsi")
GRID_PITCH_UM = 100.0  # virtual spots of unsequenced slides: Visium's centre-to-centre pitch
GRID_MIN_TISSUE = 0.5  # a virtual spot needs this tissue fraction under its patch
TISSUE_FREE_WARN = 0.25  # warn when more of a slide's patches than this show no tissue
FOV_TOLERANCE = 0.05  # relative field-of-view mismatch of stored patches before a warning


@dataclass
class SlideExtraction:
    """What happened to one slide."""

    sample_id: str
    source: str  # "patches" | "wsi" | "skipped"
    n_spots: int = 0
    n_out_of_bounds: int = 0
    n_tissue_free: int = 0
    seconds: float = 0.0
    path: Path | None = None


def extract(
    data: str | Path,
    encoder: str,
    *,
    weights: str | Path | None = None,
    allow_download: bool = False,
    samples: str = "all",
    source: str = "auto",
    mpp: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> list[SlideExtraction]:
    """Embed every slide of cohort ``data`` (or ``samples``: comma-separated ids) with ``encoder``.

    mpp: µm per level-0 pixel of the images, overriding metadata and file tags. Returns one record
    per slide of this rank, finished or skipped.
    """
    if source not in SOURCES:
        raise InputError(f"unknown source '{source}' (one of: {', '.join(SOURCES)})")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    cohort = Cohort(data)
    ids = cohort.select(samples, among=_extractable(cohort, source))
    mine = rank_share(ids)
    out_dir = cohort.root / keys.EMBEDDINGS_DIR / encoder
    todo = [i for i in mine if overwrite or not (out_dir / f"{i}.h5").exists()]
    records = [
        SlideExtraction(i, "skipped", path=out_dir / f"{i}.h5") for i in mine if i not in todo
    ]
    if not todo:
        return records
    model = load_encoder(encoder, weights, allow_download=allow_download, device=_device(device))
    with progress_bar(enabled=progress) as bar:
        slides = bar.add_task(f"extract {encoder}", total=len(todo))
        for sample_id in todo:
            records.append(
                extract_slide(
                    cohort, sample_id, model, source=source, mpp=mpp, batch_size=batch_size,
                    out=out_dir / f"{sample_id}.h5", bar=bar,
                )
            )  # fmt: skip
            bar.update(slides, advance=1, info=sample_id)
    return records


def extract_slide(
    cohort: Cohort,
    sample_id: str,
    model: Encoder,
    *,
    out: Path,
    source: str = "auto",
    mpp: float | None = None,
    batch_size: int = 64,
    bar=None,
) -> SlideExtraction:
    """Embed one slide and write ``out`` atomically (``write_embeddings``): features (N, D)
    float32, coords (N, 2) spot centres in level-0 px, barcodes (N,) bytes."""
    start = time.perf_counter()
    for stale in out.parent.glob(f".{out.stem}.*.partial{out.suffix}"):
        stale.unlink()  # left by a killed run (atomic_path cleans up only after exceptions)
    patches = cohort.patches_path(sample_id)
    use_patches = source == "patches" or (source == "auto" and patches.exists())
    if use_patches:
        record, arrays = _from_patches(cohort, sample_id, model, mpp, batch_size, bar)
    else:
        record, arrays = _from_wsi(cohort, sample_id, model, mpp, batch_size, bar)
    features, coords, barcodes = arrays
    if not np.isfinite(features).all():
        raise InputError(f"encoder '{model.config.name}' returned NaN/inf features", out)
    attrs = {
        keys.H5_ATTR_ENCODER: model.config.name,
        keys.H5_ATTR_MPP: model.config.mpp,
        keys.H5_ATTR_PATCH_PX: model.config.patch_size,
        keys.H5_ATTR_SOURCE: record.source,
    }
    write_embeddings(out, features, coords, barcodes, **attrs)
    record.seconds, record.path = time.perf_counter() - start, out
    return record


def _from_patches(cohort, sample_id, model, mpp, batch_size, bar):
    """Embed HEST's stored patches; they were cut at their own pixel size, so a field of view that
    differs from the encoder's is only warned about (re-cutting needs the image)."""
    hp = read_hest_patches(cohort.patches_path(sample_id))
    level0 = mpp or cohort.pixel_size_um(sample_id) or hp.pixel_size_um
    fov, want = hp.patch_px * hp.pixel_size_um, model.config.patch_size * model.config.mpp
    if abs(fov - want) > FOV_TOLERANCE * want:
        log.warning(
            "%s: stored patches cover %.0f µm, encoder '%s' expects %.0f µm; using them as they are",
            sample_id, fov, model.config.name, want,
        )  # fmt: skip
    features = np.empty((hp.n_patches, model.dim), dtype=np.float32)
    task = bar.add_task(sample_id, total=hp.n_patches) if bar is not None else None
    for rows, img in hp.iter_batches(batch_size):
        features[rows] = model.embed(img)
        if task is not None:
            bar.update(task, advance=len(img))
    if task is not None:
        bar.remove_task(task)
    record = SlideExtraction(sample_id, "patches", n_spots=hp.n_patches)
    return record, (features, hp.centres(level0), hp.barcodes)


def _from_wsi(cohort, sample_id, model, mpp, batch_size, bar):
    from ..io.readers.wsi import open_wsi
    from .patching import PatchReport, iter_patch_batches, plan_patches, tissue_fraction

    image = cohort.wsi_path(sample_id)
    if image is None:
        raise InputError(
            f"sample '{sample_id}' has neither patches/{sample_id}.h5 nor an image in "
            f"{keys.WSI_DIR}/ (or the metadata's '{keys.META_WSI}')",
            cohort.root,
        )
    cut = dict(target_mpp=model.config.mpp, size=model.config.patch_size)
    with open_wsi(image, mpp=mpp or cohort.pixel_size_um(sample_id)) as wsi:
        centres, barcodes = _spots(cohort, sample_id, wsi)
        plan = plan_patches(wsi, centres, **cut)
        features = np.empty((len(centres), model.dim), dtype=np.float32)
        tissue = np.empty(len(centres))
        task = bar.add_task(sample_id, total=len(centres)) if bar is not None else None
        for rows, img in iter_patch_batches(wsi, centres, batch_size=batch_size, **cut):
            features[rows] = model.embed(img)
            tissue[rows] = tissue_fraction(img)
            if task is not None:
                bar.update(task, advance=len(rows))
        if task is not None:
            bar.remove_task(task)
    report = PatchReport.from_plan(plan, tissue, slide=sample_id)
    # patches on fat or glass are expected at a tissue edge; many of them suggest a misregistration
    worrying = report.n_out_of_bounds or report.n_tissue_free > TISSUE_FREE_WARN * len(centres)
    log.log(logging.WARNING if worrying else logging.INFO, "%s", report.summary())
    record = SlideExtraction(
        sample_id, "wsi", len(centres), report.n_out_of_bounds, report.n_tissue_free
    )
    return record, (features, centres, barcodes)


def _spots(cohort: Cohort, sample_id: str, wsi) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres (N, 2) level-0 px and barcodes (N,): the sequenced spots, else a tissue grid."""
    st = cohort.st_path(sample_id)
    if st.exists():
        adata = read_st(st)
        if "in_tissue" in adata.obs.columns:
            adata = adata[adata.obs["in_tissue"].astype(int) == 1]
        xy = np.asarray(adata.obsm[keys.OBSM_SPATIAL][:, :2], dtype=np.float64)
        return xy, adata.obs_names.to_numpy().astype(str)
    xy = tissue_grid(wsi, pitch_um=GRID_PITCH_UM)
    if not len(xy):
        raise InputError("no tissue found for a grid of virtual spots", wsi.path)
    names = np.array([f"x{int(x)}_y{int(y)}" for x, y in xy], dtype=object)
    log.info(
        "%s: no counts file; %d virtual spots on a %g µm grid", sample_id, len(xy), GRID_PITCH_UM
    )
    return xy, names


def tissue_grid(
    wsi, *, pitch_um: float = GRID_PITCH_UM, min_tissue: float = GRID_MIN_TISSUE
) -> np.ndarray:
    """Centres (M, 2) level-0 px of a hexagonal grid (``pitch_um`` apart) over the slide's tissue.

    Tissue is found on a thumbnail at ~8 µm/px; a point is kept when at least ``min_tissue`` of the
    thumbnail within half a pitch of it is tissue.
    """
    from scipy import ndimage

    from .patching import tissue_fraction

    w, h = wsi.dimensions
    scale = max(1.0, 8.0 / wsi.mpp)  # level-0 px per thumbnail px
    thumb = wsi.thumbnail(int(np.ceil(max(w, h) / scale)))
    th, tw = thumb.shape[:2]
    mask = tissue_fraction(thumb.reshape(-1, 1, 1, 3)).reshape(th, tw)  # per pixel: 0 or 1
    pitch = pitch_um / wsi.mpp  # level-0 px
    window = max(1, round(pitch / (w / tw)))
    cover = ndimage.uniform_filter(mask.astype(np.float32), size=window, mode="constant")
    rows = np.arange(pitch / 2, h, pitch * np.sqrt(3) / 2)
    xy = np.array(
        [
            (x, y)
            for r, y in enumerate(rows)
            for x in np.arange(pitch / 2 + (r % 2) * pitch / 2, w, pitch)
        ]
    ).reshape(-1, 2)
    i = np.clip((xy[:, 1] * th / h).astype(int), 0, th - 1)
    j = np.clip((xy[:, 0] * tw / w).astype(int), 0, tw - 1)
    return xy[cover[i, j] >= min_tissue]


def _extractable(cohort: Cohort, source: str) -> list[str]:
    """The slides with something to extract from: patches, a slide image, or either."""
    ids = [
        i
        for i in cohort.metadata.index
        if (source != "wsi" and cohort.patches_path(i).exists())
        or (source != "patches" and cohort.wsi_path(i) is not None)
    ]
    if not ids:
        raise InputError(
            f"no slide has {keys.PATCHES_DIR}/{{id}}.h5 or an image in {keys.WSI_DIR}/", cohort.root
        )
    return ids


def _device(device: str) -> str:
    return str(local_device()) if device == "auto" else device


__all__ = ["SlideExtraction", "extract", "extract_slide", "tissue_grid"]
