"""Export predictions as SpatialData: one Zarr store per slide, ``OUT/{id}.zarr``.

Each store holds, all in the coordinate system ``global`` = level-0 pixels of the slide (the frame
of ``obsm['spatial']``):

- ``images['image']``: the slide image as a multiscale RGB pyramid (when the cohort has an image),
  scaled into level-0 pixels by a ``Scale`` transform;
- ``shapes['spots']``: one circle per spot, centred at ``obsm['spatial']``, radius
  ``spot_diameter_fullres / 2``, indexed by barcode (``Identity`` transform);
- ``tables['predicted']``: the prediction (dense X, obs, ``obsm['pathways']``), annotating
  ``spots``;
- ``tables['measured']``: the cohort's counts file as stored, when there is one, annotating
  ``spots``.

Memory stays bounded whatever the slide size: the image is read lazily, tile by tile, from the
slide level nearest ``max_image_px`` (see :func:`image_plan`) and written chunk by chunk with dask.
Layout: docs/formats.md, "EXPORT: SpatialData".
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._core import keys
from .._core.errors import InputError
from .._core.progress import progress_bar
from ..io.cohort import Cohort
from ..io.prediction import gene_columns, peek, predicted_ids, read_prediction
from ..io.readers import read_h5ad

log = logging.getLogger(__name__)

# element names and coordinate system of every exported store
COORDINATE_SYSTEM = "global"
IMAGE = "image"
SHAPES = "spots"
TABLE_PREDICTED = "predicted"
TABLE_MEASURED = "measured"
REGION_KEY = "region"  # obs column: the shapes element a table row annotates ("spots")
INSTANCE_KEY = "spot_id"  # obs column: the barcode of the circle a table row annotates

MAX_IMAGE_PX = 20_000  # longest side of the image's finest pyramid level (before padding)
PYRAMID_MIN_PX = 512  # the pyramid halves the image until its longest side is at most this
IMAGE_CHUNK_PX = 512  # Zarr chunk of the image: (3, 512, 512) uint8
READ_PX = 2048  # longest side of one region read from the slide
# a factorised prediction is multiplied out into a dense table: refuse all genes beyond this
MAX_DENSE_SPOTS = 200_000
INSTALL_HINT = "pip install 'histoprism[ecosystem]'"


def export_spatialdata(
    pred: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    samples: str = "all",
    genes: Sequence[str] | None = None,
    max_image_px: int = MAX_IMAGE_PX,
    progress: bool = True,
) -> list[Path]:
    """Write ``out/{id}.zarr`` (SpatialData) for the predicted slides ``pred/{id}.h5ad``.

    Parameters
    ----------
    pred : folder of predictions (``predict --out``).
    data : the cohort directory: slide images (``wsis/{id}.*`` or the metadata's ``wsi_path``)
        and counts (``st/{id}.h5ad``) come from it.
    out : folder of the stores; created if needed.
    samples : 'all' (every prediction in ``pred``), a split ('train', 'val', 'test') or
        comma-separated sample ids; each must have a prediction.
    genes : genes of the ``predicted`` table (all of the prediction's by default). Required for
        a factorised prediction of more than ``MAX_DENSE_SPOTS`` spots.
    max_image_px : longest side of the image's finest level; the slide level nearest above is
        read and block-averaged down to it (never upsampled). See :func:`image_plan`.
    progress : show a progress bar.

    Returns the stores written. Each is written as ``out/.{id}.zarr.tmp`` and renamed, so an
    existing ``{id}.zarr`` is replaced only by a complete one. Raises ``InputError`` (one line
    naming the file) for a missing spatialdata, no predictions, an unknown sample or gene, or a
    factorised slide too large to multiply out without ``genes``.
    """
    try:
        import spatialdata  # noqa: F401  (optional: the ecosystem extra)
    except ImportError as exc:
        raise InputError(f"SpatialData export needs spatialdata: {INSTALL_HINT}") from exc
    pred, out = Path(pred), Path(out)
    if max_image_px < PYRAMID_MIN_PX:
        raise InputError(f"max_image_px must be at least {PYRAMID_MIN_PX}, got {max_image_px}")
    if genes is not None:
        genes = list(dict.fromkeys(str(g) for g in genes))
        if not genes:
            raise InputError("no gene given to export")
    cohort = Cohort(data)
    ids = _predicted_ids(pred, cohort, samples)
    paths = {sid: pred / f"{sid}.h5ad" for sid in ids}
    for path in paths.values():  # every slide is checked before the first is written
        _check_prediction(path, genes)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("exporting", total=len(ids), info="")
        for sid, path in paths.items():
            written.append(
                export_slide(
                    sid, path, cohort, out / f"{sid}.zarr", genes=genes, max_image_px=max_image_px
                )
            )
            bar.update(task, advance=1, info=sid)
    return written


def export_slide(
    sample_id: str,
    path: str | Path,
    cohort: Cohort,
    dest: str | Path,
    *,
    genes: Sequence[str] | None = None,
    max_image_px: int = MAX_IMAGE_PX,
) -> Path:
    """Write one prediction ``path`` with the cohort's image and counts of ``sample_id`` as the
    SpatialData store ``dest`` (atomically). Returns ``dest``."""
    import dask
    from spatialdata import SpatialData

    path, dest = Path(path), Path(dest)
    prediction = read_prediction(path, genes)
    shapes = _spots(prediction, sample_id, path)
    tables = {TABLE_PREDICTED: _table(prediction, path)}
    st_path = cohort.st_path(sample_id)
    if st_path.exists():
        measured = _measured(read_h5ad(st_path), shapes.index, st_path)
        if measured is not None:
            tables[TABLE_MEASURED] = measured
    image_path = cohort.wsi_path(sample_id)
    tmp = dest.with_name(f".{dest.name}.tmp")
    _remove(tmp)
    try:
        wsi = None
        images = {}
        if image_path is not None:
            from ..io.readers.wsi import open_wsi  # image readers are an optional extra

            wsi = open_wsi(image_path, mpp=1.0)  # the pixel size plays no part in the pixels
            images[IMAGE] = _image(wsi, max_image_px)
        try:
            sdata = SpatialData(images=images, shapes={SHAPES: shapes}, tables=tables)
            # threads: the open slide is shared by the read tasks (a distributed scheduler would
            # have to pickle it); zarr's notice of a future default comes once per array
            with dask.config.set(scheduler="threads"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="zarr v3 autosharding")
                sdata.write(tmp)
        finally:
            if wsi is not None:
                wsi.close()
        _replace(tmp, dest)
    finally:
        _remove(tmp)
    log.info(
        "%s: %d spots, %d genes predicted%s%s",
        dest,
        len(shapes),
        tables[TABLE_PREDICTED].n_vars,
        f", {tables[TABLE_MEASURED].n_vars} measured" if TABLE_MEASURED in tables else "",
        f", image of {image_path.name}" if image_path is not None else ", no image",
    )
    return dest


# --- the image ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    """How the finest pyramid level is made from the slide.

    ``level`` of the slide is read and averaged over ``factor`` x ``factor`` blocks into an image
    of ``shape`` (height, width) px, white-padded at the bottom and right to a multiple of
    2 ** ``n_halvings``; that level-0 px per image px is ``scale`` (y, x); the pyramid adds
    ``n_halvings`` levels, each half the previous.
    """

    level: int
    factor: int
    shape: tuple[int, int]
    scale: tuple[float, float]
    n_halvings: int


def image_plan(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    max_image_px: int = MAX_IMAGE_PX,
) -> ImagePlan:
    """The finest pyramid level for a slide of these levels ((width, height) each, level 0
    first): the slide level with the largest downsample that still has at least the detail of
    an image of longest side ``max_image_px``, block-averaged by the smallest integer factor
    that brings it within ``max_image_px``, then white-padded by fewer than 2 ** n_halvings px
    so that every halving of the pyramid is exact. Never upsampled: a slide smaller than
    ``max_image_px`` is kept at full resolution."""
    w0, h0 = level_dimensions[0]
    wanted = max(w0, h0) / max_image_px  # level-0 px per image px at most
    fine = [i for i, d in enumerate(level_downsamples) if d <= max(wanted, 1.0) * 1.01]
    level = max(fine, key=lambda i: level_downsamples[i]) if fine else 0
    w, h = level_dimensions[level]
    factor = 1
    while True:
        bw, bh = math.ceil(w / factor), math.ceil(h / factor)
        n = 0
        while max(bw, bh) / 2**n > PYRAMID_MIN_PX:
            n += 1
        if max(bw, bh) <= max_image_px:
            break
        factor += 1
    pw, ph = (math.ceil(v / 2**n) * 2**n for v in (bw, bh))
    return ImagePlan(
        level=level,
        factor=factor,
        shape=(ph, pw),
        scale=(factor * h0 / h, factor * w0 / w),
        n_halvings=n,
    )


def _image(wsi, max_image_px: int):
    """The slide as an Image2DModel pyramid (DataTree), read lazily: nothing is read until the
    store is written, then one region of at most READ_PX^2 level px per task."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    plan = image_plan(wsi.level_dimensions, wsi.level_downsamples, max_image_px)
    f, lock = plan.factor, threading.Lock()  # one reader at a time: not every backend is threadsafe

    def block(block_info=None) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        h, w = y1 - y0, x1 - x0
        with lock:
            rgb = wsi.read_level(plan.level, x0 * f, y0 * f, w * f, h * f)  # (h f, w f, 3)
        if f > 1:
            sums = rgb.reshape(h, f, w, f, 3).sum(axis=(1, 3), dtype=np.uint32)
            rgb = ((sums + f * f // 2) // (f * f)).astype(np.uint8)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))  # (3, h, w)

    step = max(64, min(IMAGE_CHUNK_PX, READ_PX // f))
    height, width = plan.shape
    base = da.map_blocks(
        block,
        chunks=((3,), _splits(height, step), _splits(width, step)),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), np.uint8),
    )
    log.info(
        "%s: image from level %d (%dx%d px) / %d -> %dx%d px, %d pyramid levels",
        wsi.path,
        plan.level,
        *wsi.level_dimensions[plan.level],
        f,
        width,
        height,
        plan.n_halvings + 1,
    )
    return Image2DModel.parse(
        base,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * plan.n_halvings,
        chunks={"c": 3, "y": IMAGE_CHUNK_PX, "x": IMAGE_CHUNK_PX},
        transformations={COORDINATE_SYSTEM: Scale(list(plan.scale), axes=("y", "x"))},
    )


def _splits(n: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, n - i) for i in range(0, n, step))


# --- spots and tables --------------------------------------------------------------------------


def _spots(prediction: ad.AnnData, sample_id: str, path: Path):
    """Circles at the spot centres (level-0 px), radius half the spot diameter, index barcodes."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    if keys.OBSM_SPATIAL not in prediction.obsm:
        raise InputError(f"prediction has no obsm['{keys.OBSM_SPATIAL}']", path)
    if prediction.obs_names.has_duplicates:
        dup = prediction.obs_names[prediction.obs_names.duplicated()][0]
        raise InputError(f"duplicate barcode '{dup}'", path)
    coords = np.asarray(prediction.obsm[keys.OBSM_SPATIAL], dtype=np.float64)[:, :2]
    radius = _spot_diameter(prediction, sample_id, coords, path) / 2
    return ShapesModel.parse(
        coords,
        geometry=0,
        radius=np.full(len(coords), radius),
        index=pd.Index(prediction.obs_names.astype(str)),
        transformations={COORDINATE_SYSTEM: Identity()},
    )


def _spot_diameter(prediction: ad.AnnData, sample_id: str, coords: np.ndarray, path) -> float:
    """``uns['spatial'][id]['scalefactors']['spot_diameter_fullres']`` (level-0 px); the only
    library's when the file was renamed; from the spot pitch when the file has none."""
    libraries = prediction.uns.get(keys.UNS_SPATIAL, {})
    library = libraries.get(sample_id)
    if library is None and len(libraries) == 1:
        library = next(iter(libraries.values()))
    diameter = (library or {}).get("scalefactors", {}).get("spot_diameter_fullres")
    if diameter is not None and np.isfinite(diameter) and diameter > 0:
        return float(diameter)
    from ..io.spatial import spot_diameter_px

    log.warning("%s: no spot_diameter_fullres; drawing spots at 0.55 x their pitch", path)
    return spot_diameter_px(coords)


def _table(adata: ad.AnnData, path: Path) -> ad.AnnData:
    """``adata`` as a table annotating the circles ``spots``: region and instance key columns
    added, the images of ``uns['spatial']`` dropped (the image is its own element)."""
    from spatialdata.models import TableModel

    spatial = adata.uns.get(keys.UNS_SPATIAL)
    if isinstance(spatial, Mapping):
        for library in spatial.values():
            if isinstance(library, dict):
                library.pop("images", None)
    _sanitize_names(adata, path)
    for column in (REGION_KEY, INSTANCE_KEY):
        if column in adata.obs:
            log.warning("%s: obs['%s'] replaced by the SpatialData key column", path, column)
    adata.obs[REGION_KEY] = pd.Categorical([SHAPES] * adata.n_obs)
    adata.obs[INSTANCE_KEY] = adata.obs_names.astype(str).to_numpy()
    try:
        return TableModel.parse(
            adata,
            region=SHAPES,
            region_key=REGION_KEY,
            instance_key=INSTANCE_KEY,
            overwrite_metadata=True,  # a counts file may carry another store's annotation
        )
    except ValueError as exc:  # e.g. barcodes that are not unique
        raise InputError(f"spatialdata refuses the table: {_one_line(exc)}", path) from exc


def _sanitize_names(adata: ad.AnnData, path: Path) -> None:
    """Column and key names as spatialdata allows them (letters, digits, ``_ - .``): others are
    renamed by ``spatialdata.sanitize_table`` (e.g. 'in tissue' -> 'in_tissue'), with a warning."""
    from spatialdata import sanitize_table

    slots = ("obs", "var", "obsm", "obsp", "varm", "varp", "uns", "layers")
    before = {slot: list(getattr(adata, slot).keys()) for slot in slots}
    sanitize_table(adata, inplace=True)
    renamed = [
        f"{slot}['{old}'] -> '{new}'"
        for slot in slots
        for old, new in zip(before[slot], getattr(adata, slot).keys(), strict=True)
        if old != new
    ]
    if renamed:
        log.warning("%s: renamed for SpatialData: %s", path, ", ".join(renamed))


def _measured(st: ad.AnnData, barcodes: pd.Index, path: Path) -> ad.AnnData | None:
    """The counts file as stored, less spots with no circle (no prediction), as a table."""
    if st.obs_names.has_duplicates:
        raise InputError(f"duplicate barcode '{st.obs_names[st.obs_names.duplicated()][0]}'", path)
    keep = st.obs_names.isin(barcodes)
    if not keep.any():
        log.warning("%s: no spot is in the prediction; no 'measured' table", path)
        return None
    if not keep.all():
        log.info("%s: %d spots without a prediction left out", path, int((~keep).sum()))
        st = st[keep].copy()
    return _table(st, path)


def _one_line(exc: Exception) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    details = [s for s in lines if "http" not in s and not s.startswith("To fix")]
    return "; ".join(details[:3]) if details else type(exc).__name__


# --- samples and checks ------------------------------------------------------------------------


def _predicted_ids(pred: Path, cohort: Cohort, samples: str) -> list[str]:
    """``cohort.select(samples)`` among the slides with a prediction in ``pred``."""
    if not pred.is_dir():
        raise InputError("predictions folder not found", pred)
    have = predicted_ids(pred)
    if not have:
        raise InputError("no predictions (*.h5ad) in this folder", pred)
    ids = cohort.select(samples, among=have)
    if not ids:
        raise InputError(f"no sample in '{samples}'", pred)
    missing = sorted(set(ids) - set(have), key=ids.index)
    if missing:
        raise InputError(f"no prediction for sample(s): {', '.join(missing)}", pred)
    return ids


def _check_prediction(path: Path, genes: Sequence[str] | None) -> None:
    """Unknown genes and too large factorised slides, found before anything is written."""
    names, n_spots, factorised = peek(path)
    if genes is not None:
        gene_columns(names, genes, path)
    elif n_spots > MAX_DENSE_SPOTS and factorised:
        gb = n_spots * len(names) * 4 / 1e9
        raise InputError(
            f"factorised prediction of {n_spots:,} spots: all {len(names):,} genes would make a "
            f"{gb:.0f} GB dense table; name the genes to export (--genes)",
            path,
        )


def _replace(tmp: Path, dest: Path) -> None:
    """Move the complete store ``tmp`` onto ``dest`` (a directory cannot be renamed over a
    non-empty one: the old store is moved aside first and removed last)."""
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    _remove(old)
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
