"""LazySlide / wsidata bridge: a trained run as a LazySlide feature-prediction model, and a
wsidata tile-feature table as a histoprism ``Slide`` or embedding file.

LazySlide (``lazyslide``, with ``wsidata``) tiles a whole-slide image and stores tile features as
an AnnData table ``wsi[f"{encoder}_{tile_key}"]`` whose rows are the tiles of the GeoDataFrame
``wsi[tile_key]``: boxes in level-0 pixels, their spec in ``wsi.tile_spec(tile_key)``.
``zs.tl.feature_prediction(wsi, model, feature_key)`` calls ``model.predict(features, coords)``
once with every tile when the model sets ``whole_slide`` and ``needs_coords`` (HistoPrism attends
over the whole slide), ``coords`` being the tiles' top-left corners in level-0 pixels
(``bounds[["minx", "miny"]]``), and stores the returned ``{gene: (N,) array}`` as the table
``wsi[key_added]`` (default ``"{model.name}_{tile_key}"``): X (tiles x genes), var names the genes.

lazyslide and wsidata are optional (the ``lazyslide`` extra) and imported only where used.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core import keys
from .._core.errors import InputError
from ..io.cohort import Slide
from ..io.readers.embeddings import check_features

if TYPE_CHECKING:
    from ..models.run import Run

log = logging.getLogger(__name__)

TILE_KEY = "tiles"  # LazySlide's default tile table
SOURCE = "lazyslide"  # ``source`` attribute of embedding files written from a wsidata
BLOCK_GENES = 4096  # widest block of panel columns predicted at once
FOV_TOLERANCE = 0.1  # relative difference of tile and encoder field of view that warns


class LazySlidePredictor:
    """A trained run (any model kind) as a LazySlide feature-prediction model.

    ``zs.tl.feature_prediction(wsi, LazySlidePredictor.from_wsidata(run_dir, wsi, cancer="IDC"),
    feature_key="uni")`` writes predicted log1p(counts) (>= 0, as ``histoprism predict``) per tile
    to the table ``wsi["histoprism_tiles"]``.

    Parameters
    ----------
    run : a run directory written by ``histoprism train``, or a ``predict.Run`` already loaded.
    cancer : the slide's OncoTree code. A code the model was not trained on warns (naming it) and
        predicts with the 'Unknown' token.
    mpp : µm per level-0 pixel of the slide (the model sees tile centres in µm).
    tile_px : level-0 size of one tile, px: an int, or (width, height). LazySlide passes the tiles'
        top-left corners; the model wants their centres, half a tile further.
    genes : panel genes to return, in this order (symbols or Ensembl ids; another naming of a
        panel gene is found through the bundled id table, and keeps the name asked for). None:
        every panel gene. The whole panel (38,982 genes for the released model) costs
        N x G x 4 bytes here and again in LazySlide's table, 3 GB each for 20,000 tiles: pass a
        list when only some genes are wanted.
    name : the model's name; LazySlide's default output key is ``f"{name}_{tile_key}"``.
    attention, attention_radius_um, device : passed to ``models.run.load`` when ``run`` is a path.
    """

    needs_coords = True  # LazySlide passes the tiles' top-left corners
    whole_slide = True  # attention spans the slide: never feed it a batch of tiles

    def __init__(
        self,
        run: str | Path | Run,
        *,
        cancer: str,
        mpp: float,
        tile_px: int | tuple[int, int],
        genes: list[str] | tuple[str, ...] | np.ndarray | None = None,
        name: str = "histoprism",
        attention: str | None = None,
        attention_radius_um: float | None = None,
        device: str | None = None,
    ) -> None:
        from ..models.run import load

        if isinstance(run, (str, Path)):
            run = load(
                run, attention=attention, attention_radius_um=attention_radius_um, device=device
            )
        self.run = run
        self.model = run.predictor  # LazySlide's model protocol asks for ``model`` and ``name``
        self.name = name
        self.features_model_name = run.config.get("encoder")  # LazySlide's default feature key
        self.cancer = str(cancer)
        if self.cancer not in run.vocab.codes:
            warnings.warn(
                f"cancer code '{self.cancer}' is not one the model was trained on "
                f"({', '.join(run.vocab.codes)}); predicting with the "
                f"'{keys.UNKNOWN_CANCER}' token",
                stacklevel=2,
            )
        self.cancer_used = run.vocab.codes[run.vocab.index(self.cancer, fallback=True)]
        if mpp is None or not np.isfinite(mpp) or mpp <= 0:
            raise InputError(f"the slide's µm per pixel must be a positive number, not {mpp}")
        self.mpp = float(mpp)
        self.tile_px = _pair(tile_px)
        self.genes, self.columns = _select_genes(run.panel, genes)

    @classmethod
    def from_wsidata(
        cls,
        run: str | Path | Run,
        wsi: Any,
        *,
        cancer: str,
        tile_key: str = TILE_KEY,
        mpp: float | None = None,
        **kwargs: Any,
    ) -> LazySlidePredictor:
        """The predictor for the tiles ``tile_key`` of ``wsi``: their level-0 size from
        ``wsi.tile_spec(tile_key)``, the slide's µm per pixel from ``wsi.properties`` (``mpp``
        overrides). Warns when the tiles' field of view differs from the run's encoder's."""
        spec = _tile_spec(wsi, tile_key)
        level0_mpp = mpp if mpp is not None else _slide_mpp(wsi, spec)
        if level0_mpp is None:
            raise InputError(
                "the slide records no µm per pixel: pass mpp= (or wsi.set_mpp) to predict"
            )
        self = cls(
            run,
            cancer=cancer,
            mpp=level0_mpp,
            tile_px=(spec.base_width, spec.base_height),
            **kwargs,
        )
        _check_field_of_view(self.run.config.get("encoder"), spec, level0_mpp)
        return self

    # --- LazySlide's model protocol ---------------------------------------------------------
    def get_transform(self) -> None:
        return None  # features in, not images

    def to(self, device: Any) -> LazySlidePredictor:
        """Move a HistoPrism network to ``device`` (the baselines run on the CPU)."""
        import torch

        from ..models.run import HistoPrismPredictor

        if isinstance(self.model, HistoPrismPredictor):
            self.model.device = torch.device(device)
            self.model.model.to(self.model.device)
        return self

    def try_compile(self, **compile_kws: Any) -> None:
        return None  # one pass per slide: compiling would not pay for itself

    def predict(self, features: Any, coords: Any = None) -> dict[str, np.ndarray]:
        """{gene: (N,) float32 predicted log1p(counts), >= 0} for the N tiles of one slide.

        features: (N, D) tile features.  coords: (N, 2) tile top-left corners, level-0 px (x, y),
        as ``zs.tl.feature_prediction`` passes them.
        """
        if coords is None:
            raise InputError(
                "HistoPrism needs the tiles' coordinates: call it through "
                "zs.tl.feature_prediction, or pass coords (N, 2) top-left corners"
            )
        slide = self.to_slide(features, coords)
        predictor = self.model
        prepared = predictor.prepare(slide, unknown_cancer=True)
        out = np.empty((len(self.columns), slide.n_spots), dtype=np.float32)  # one row per gene
        for pos, lo, hi in _column_blocks(self.columns):
            block = predictor.predict_genes(prepared, slice(lo, hi))  # (N, hi - lo)
            out[pos] = np.maximum(block[:, self.columns[pos] - lo], 0).T  # log1p is >= 0
        return dict(zip(self.genes, out, strict=True))

    def to_slide(self, features: Any, coords: Any) -> Slide:
        """The ``Slide`` the model sees for tiles with these features and top-left corners:
        tile centres (corner + half a tile) in level-0 px, barcodes '0' ... 'N-1'."""
        features = _dense_features(features)
        coords = np.asarray(coords, dtype=np.float64)
        n = len(features)
        if coords.shape != (n, 2):
            raise InputError(f"{n} tiles of features but coords of shape {coords.shape}")
        if n == 0:
            raise InputError("no tiles to predict")
        return Slide(
            id=self.name,
            cancer=self.cancer,
            barcodes=np.arange(n).astype(str).astype(object),
            features=features,
            coords=_centres(coords, self.tile_px),
            pixel_size_um=self.mpp,
        )


# --- wsidata -> Slide / embedding file -----------------------------------------------------------
def slide_from_wsidata(
    wsi: Any,
    feature_key: str,
    *,
    cancer: str,
    sample_id: str | None = None,
    tile_key: str = TILE_KEY,
    mpp: float | None = None,
) -> Slide:
    """A wsidata feature table and its tiles as a histoprism ``Slide`` (without counts).

    ``feature_key``: the table ``wsi[feature_key]``, or ``wsi[f"{feature_key}_{tile_key}"]`` as
    LazySlide names it (``"uni"`` -> ``"uni_tiles"``). Spots are the tiles: centres (top-left +
    half a tile) in level-0 px, barcodes the tile ids. ``pixel_size_um``: ``mpp``, else the slide's
    recorded µm per pixel (None when it has none). ``sample_id`` defaults to the file's stem.
    """
    table = _read_tiles(wsi, feature_key, tile_key)
    level0_mpp = mpp if mpp is not None else _slide_mpp(wsi, table["spec"])
    return Slide(
        id=sample_id if sample_id is not None else Path(str(wsi.name)).stem,
        cancer=str(cancer),
        barcodes=table["barcodes"],
        features=table["features"],
        coords=table["centres"],
        pixel_size_um=level0_mpp,
    )


def write_embeddings_from_wsidata(
    wsi: Any, feature_key: str, path: str | Path, *, tile_key: str = TILE_KEY
) -> Path:
    """Write a wsidata feature table as a histoprism embedding file (``readers.write_embeddings``;
    docs/formats.md, "embeddings/{encoder}/{id}.h5: patch embeddings"): features, tile centres in
    level-0 px, tile ids as barcodes, and the
    attributes ``encoder`` (the feature key without ``_{tile_key}``), ``target_mpp`` and
    ``patch_size`` (the tiles'), ``source`` 'lazyslide'. Put it at
    ``{cohort}/embeddings/{encoder}/{id}.h5``; the slide's µm per pixel (``wsi.properties.mpp``)
    goes in the metadata table's ``pixel_size_um_embedded``. Returns ``path``."""
    from ..io.readers import write_embeddings

    table = _read_tiles(wsi, feature_key, tile_key)
    spec, key = table["spec"], table["key"]
    encoder = key[: -len(tile_key) - 1] if key.endswith(f"_{tile_key}") else key
    attrs = {
        keys.H5_ATTR_ENCODER: encoder,
        keys.H5_ATTR_MPP: None if spec is None else spec.mpp,
        keys.H5_ATTR_PATCH_PX: None if spec is None else spec.width,
        keys.H5_ATTR_SOURCE: SOURCE,
    }
    attrs = {k: v for k, v in attrs.items() if v is not None}
    return write_embeddings(path, table["features"], table["centres"], table["barcodes"], **attrs)


# --- helpers -------------------------------------------------------------------------------------
def _pair(size: int | tuple[int, int]) -> tuple[float, float]:
    w, h = (size, size) if np.isscalar(size) else tuple(size)
    if not (w > 0 and h > 0):
        raise InputError(f"tile size must be positive, not {size}")
    return float(w), float(h)


def _centres(top_left: np.ndarray, tile_px: tuple[float, float]) -> np.ndarray:
    """(N, 2) tile top-left corners -> centres, level-0 px (x, y)."""
    return top_left + np.asarray(tile_px, dtype=np.float64) / 2


def _dense_features(features: Any) -> np.ndarray:
    """(N, D) float32 from a numpy, scipy sparse or dask matrix, checked by ``check_features``."""
    if hasattr(features, "toarray"):
        features = features.toarray()
    elif hasattr(features, "compute"):
        features = features.compute()
    if np.iscomplexobj(features) or np.asarray(features).dtype.kind not in "fiub":
        raise InputError(f"tile features have dtype {np.asarray(features).dtype}, expected numbers")
    features = np.asarray(features, dtype=np.float32)
    check_features(features, what="tiles")
    return features


def _select_genes(panel, genes) -> tuple[tuple[str, ...], np.ndarray]:
    """(names returned, (G,) int64 panel columns) of the genes asked for; None: the panel."""
    if genes is None:
        return tuple(panel.genes), np.arange(len(panel), dtype=np.int64)
    names = [str(g) for g in np.asarray(genes, dtype=object).reshape(-1)]
    if not names:
        raise InputError("empty gene list")
    if len(set(names)) != len(names):
        dup = next(g for g in names if names.count(g) > 1)
        raise InputError(f"gene '{dup}' is asked for twice")
    cols = panel.locate(names)
    if (cols < 0).any():  # another naming of a panel gene: symbol <-> Ensembl id
        from ..expression.genes import GeneIdMap

        idmap = GeneIdMap.bundled()
        missing = np.flatnonzero(cols < 0)
        asked = np.asarray(names, dtype=object)[missing]
        for conv in (idmap.to_ensembl(asked), idmap.to_symbol(asked)):
            found = panel.locate([c if c is not None else "" for c in conv])
            cols[missing] = np.where(cols[missing] < 0, found, cols[missing])
    if (cols < 0).any():
        absent = [g for g, c in zip(names, cols, strict=True) if c < 0]
        raise InputError(
            f"{len(absent)} of {len(names)} genes are not in the model's gene panel: "
            + ", ".join(absent[:10])
            + (" ..." if len(absent) > 10 else "")
        )
    return tuple(names), cols


def _column_blocks(columns: np.ndarray):
    """Yield (positions in ``columns``, lo, hi): runs of the sorted columns whose panel range
    [lo, hi) is at most BLOCK_GENES wide."""
    order = np.argsort(columns, kind="stable")
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or columns[order[i]] - columns[order[start]] >= BLOCK_GENES:
            pos = order[start:i]
            yield pos, int(columns[pos[0]]), int(columns[pos[-1]]) + 1
            start = i


def _tile_spec(wsi: Any, tile_key: str):
    if tile_key not in wsi.shapes:
        raise InputError(
            f"no tiles '{tile_key}' in the wsidata (have: {', '.join(wsi.shapes) or 'none'}); "
            "run zs.pp.tile_tissues first"
        )
    spec = wsi.tile_spec(tile_key)
    if spec is None:
        raise InputError(f"tiles '{tile_key}' have no tile spec (wsi.tile_spec)")
    return spec


def _slide_mpp(wsi: Any, spec) -> float | None:
    """µm per level-0 pixel: the slide's record, else what its tile spec implies."""
    mpp = wsi.properties.mpp
    if mpp is None and spec is not None and spec.mpp is not None:
        mpp = spec.mpp / spec.base_downsample  # tiles at spec.mpp are base_downsample level-0 px
    return None if mpp is None else float(mpp)


def _check_field_of_view(encoder: str | None, spec, mpp: float) -> None:
    """Warn when tiles cover another width of tissue than the run's encoder was trained on."""
    from ..images.encoders import ENCODERS

    cfg = ENCODERS.get(encoder or "")
    if cfg is None:
        return
    tile_um, want_um = spec.base_width * mpp, cfg.patch_size * cfg.mpp
    if abs(tile_um - want_um) > FOV_TOLERANCE * want_um:
        warnings.warn(
            f"tiles are {tile_um:.0f} µm wide, the run's encoder '{encoder}' was trained on "
            f"{want_um:.0f} µm patches ({cfg.patch_size} px at {cfg.mpp} µm/px): tile with "
            f"zs.pp.tile_tissues(wsi, {cfg.patch_size}, mpp={cfg.mpp})",
            stacklevel=3,
        )


def _read_tiles(wsi: Any, feature_key: str, tile_key: str) -> dict:
    """Features, tile centres (level-0 px), barcodes and spec of a feature table's tiles."""
    if tile_key not in wsi.shapes:
        raise InputError(
            f"no tiles '{tile_key}' in the wsidata (have: {', '.join(wsi.shapes) or 'none'})"
        )
    tables = list(wsi.tables)
    key = next((k for k in (feature_key, f"{feature_key}_{tile_key}") if k in tables), None)
    if key is None:
        raise InputError(
            f"no feature table '{feature_key}' or '{feature_key}_{tile_key}' in the wsidata "
            f"(have: {', '.join(tables) or 'none'})"
        )
    table, tiles = wsi.tables[key], wsi.shapes[tile_key]
    if table.n_obs != len(tiles):
        raise InputError(
            f"feature table '{key}' has {table.n_obs} rows but tiles '{tile_key}' has "
            f"{len(tiles)}: were the tiles changed after the features were extracted?"
        )
    if "tile_id" in tiles.columns and "tile_id" in table.obs.columns:
        if not np.array_equal(tiles["tile_id"].to_numpy(), table.obs["tile_id"].to_numpy()):
            raise InputError(f"rows of feature table '{key}' are not the tiles '{tile_key}'")
    try:
        features = _dense_features(table.X)
    except InputError as exc:
        raise InputError(f"feature table '{key}': {exc}") from None
    spec = wsi.tile_spec(tile_key)
    bounds = tiles.bounds[["minx", "miny", "maxx", "maxy"]].to_numpy(dtype=np.float64)
    if spec is not None:
        centres = _centres(bounds[:, :2], (spec.base_width, spec.base_height))
    else:  # tiles made without a spec: the middle of each box
        centres = (bounds[:, :2] + bounds[:, 2:]) / 2
    ids = tiles["tile_id"].to_numpy() if "tile_id" in tiles.columns else tiles.index.to_numpy()
    return dict(
        key=key,
        features=features,
        centres=centres,
        barcodes=np.asarray(ids).astype(str).astype(object),
        spec=spec,
    )


__all__ = ["LazySlidePredictor", "slide_from_wsidata", "write_embeddings_from_wsidata"]
