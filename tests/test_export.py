"""SpatialData export: the image pyramid maps onto level-0 px, circles sit on the spots, the tables
equal the prediction and the counts file and annotate the circles, writes are atomic, errors are
one line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.inference.predict import predict
from histoprism.integrations import spatialdata as export_mod
from histoprism.integrations.spatialdata import export_spatialdata, image_plan
from histoprism.io.prediction import read_prediction

sd = pytest.importorskip("spatialdata")

ENCODER = "synthetic"
BLOCK = 16  # level-0 px per colour block of the test image: ~3 image px at the finest level
MAX_PX = 2000  # the test slide (~8,000 px) is averaged 5x down to this


def _write_slide_image(cohort: Path, sid: str) -> np.ndarray:
    """A PNG covering the slide's spots as wsis/{id}.png: random colours in BLOCK x BLOCK blocks.
    Returns the (rows, cols, 3) block colours: level-0 pixel (x, y) has colour [y // B, x // B]."""
    from PIL import Image

    xy = ad.read_h5ad(cohort / keys.ST_DIR / f"{sid}.h5ad").obsm[keys.OBSM_SPATIAL]
    w, h = (int(v) + 50 for v in xy.max(0))
    blocks = np.random.default_rng(0).integers(0, 256, (h // BLOCK + 1, w // BLOCK + 1, 3))
    blocks = blocks.astype(np.uint8)
    rgb = np.repeat(np.repeat(blocks, BLOCK, axis=0), BLOCK, axis=1)[:h, :w]
    (cohort / keys.WSI_DIR).mkdir(exist_ok=True)
    Image.fromarray(rgb).save(cohort / keys.WSI_DIR / f"{sid}.png")
    return blocks


@pytest.fixture(scope="module")
def exported(tiny_cohort, trained_runs, tmp_path_factory):
    """The smallest slide of a cohort copy with an image, predicted dense and factorised, the
    dense prediction exported for 3 genes."""
    root = tmp_path_factory.mktemp("export")
    cohort = Path(
        shutil.copytree(
            tiny_cohort, root / "cohort", ignore=shutil.ignore_patterns(keys.CEILING_DIR)
        )
    )
    extent = {
        p.stem: ad.read_h5ad(p).obsm[keys.OBSM_SPATIAL].max()
        for p in (cohort / keys.ST_DIR).glob("*.h5ad")
    }
    sid = min(extent, key=extent.get)
    blocks = _write_slide_image(cohort, sid)
    run = trained_runs["histoprism"]
    pred, predf = root / "pred", root / "predf"
    predict(run, cohort, ENCODER, pred, samples=sid, images=False, progress=False)
    predict(
        run, cohort, ENCODER, predf, samples=sid, images=False, output="factorised", progress=False
    )
    genes = list(ad.read_h5ad(pred / f"{sid}.h5ad").var_names[[5, 0, 17]])  # not in file order
    out = root / "out"
    written = export_spatialdata(
        pred, cohort, out, samples=sid, genes=genes, max_image_px=MAX_PX, progress=False
    )
    return SimpleNamespace(
        sid=sid,
        cohort=cohort,
        pred=pred,
        predf=predf,
        out=out,
        written=written,
        genes=genes,
        blocks=blocks,
    )


def _assert_pixels_match(
    pixels: np.ndarray, scale_yx, xy: np.ndarray, blocks, *, per_pixel: int, level_ds=1, atol=1
) -> None:
    """Image pixel (i, j) = floor(level-0 (x, y) / scale) of each spot holds the mean colour of
    the ``per_pixel`` x ``per_pixel`` slide pixels it covers from (per_pixel i, per_pixel j), on
    the slide level of downsample ``level_ds`` (its pixel p is level-0 px level_ds p ...)."""
    sy, sx = scale_yx
    worst = 0.0
    for x, y in xy:
        i, j = int(x // sx), int(y // sy)
        cols, rows = (
            np.minimum((per_pixel * k + np.arange(per_pixel)) * level_ds // BLOCK, n - 1)
            for k, n in ((i, blocks.shape[1]), (j, blocks.shape[0]))
        )
        expected = blocks[rows][:, cols].reshape(-1, 3).mean(axis=0)
        worst = max(worst, float(np.abs(pixels[:, j, i] - expected).max()))
    assert worst <= atol


def _scale(transformation) -> dict[str, float]:
    return dict(
        zip(transformation.axes, np.asarray(transformation.scale, dtype=float), strict=True)
    )


def test_round_trip_image_spots_and_tables(exported):
    from spatialdata.transformations import get_transformation

    sid = exported.sid
    assert exported.written == [exported.out / f"{sid}.zarr"]
    assert sorted(p.name for p in exported.out.iterdir()) == [f"{sid}.zarr"]  # no temporary left
    sdata = sd.read_zarr(exported.written[0])
    assert set(sdata.images) == {"image"} and set(sdata.shapes) == {"spots"}
    assert set(sdata.tables) == {"measured", "predicted"}
    assert set(sdata.coordinate_systems) == {"global"}
    prediction = ad.read_h5ad(exported.pred / f"{sid}.h5ad")
    xy = np.asarray(prediction.obsm[keys.OBSM_SPATIAL])

    # image: a pyramid, each level half the previous; its transform maps image px onto level-0 px
    tree = sdata.images["image"]
    levels = [tree[name]["image"] for name in sorted(tree.children, key=lambda n: int(n[5:]))]
    shapes = np.array([lv.shape[1:] for lv in levels])  # (y, x) per level
    assert len(levels) >= 3 and max(shapes[0]) <= MAX_PX + 4
    assert (shapes[1:] * 2 == shapes[:-1]).all()  # padded: every halving exact
    base = _scale(get_transformation(tree, "global"))
    assert base["x"] == pytest.approx(5.0) and base["y"] == pytest.approx(5.0)
    for k in (0, len(levels) - 1):  # finest (averaged 5x, rounded); coarsest (floored k times)
        sy, sx = (base[a] * shapes[0][i] / shapes[k][i] for i, a in enumerate("yx"))
        assert sx == sy == 5 * 2**k
        pixels = levels[k].values.astype(np.float64)
        _assert_pixels_match(pixels, (sy, sx), xy, exported.blocks, per_pixel=5 * 2**k, atol=k + 1)

    # circles: at obsm['spatial'], radius half the spot diameter, indexed by barcode
    circles = sdata.shapes["spots"]
    assert list(circles.index) == list(prediction.obs_names)
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], xy)
    diameter = prediction.uns[keys.UNS_SPATIAL][sid]["scalefactors"]["spot_diameter_fullres"]
    np.testing.assert_allclose(circles["radius"], diameter / 2)
    assert isinstance(get_transformation(circles, "global"), sd.transformations.Identity)

    # predicted: read_prediction's values of the chosen genes, pathways, obs columns; no images
    predicted = sdata.tables["predicted"]
    expected = read_prediction(exported.pred / f"{sid}.h5ad", exported.genes)
    assert list(predicted.var_names) == exported.genes
    np.testing.assert_array_equal(np.asarray(predicted.X), expected.X)
    np.testing.assert_array_equal(
        predicted.obsm[keys.OBSM_PATHWAYS], expected.obsm[keys.OBSM_PATHWAYS]
    )
    assert set(prediction.obs.columns) <= set(predicted.obs.columns)
    assert "images" not in predicted.uns[keys.UNS_SPATIAL][sid]
    assert predicted.uns[keys.UNS_HISTOPRISM]["model"] == "histoprism"

    # measured: the counts file as stored
    measured = sdata.tables["measured"]
    st = ad.read_h5ad(exported.cohort / keys.ST_DIR / f"{sid}.h5ad")
    assert list(measured.obs_names) == list(st.obs_names)
    assert list(measured.var_names) == list(st.var_names)
    assert sp.issparse(measured.X) and (measured.X != st.X).nnz == 0

    # each table row names its circle: region 'spots', instance key = barcode
    for table in (predicted, measured):
        attrs = table.uns["spatialdata_attrs"]
        assert attrs["region"] == "spots"
        assert (table.obs[attrs["region_key"]] == "spots").all()
        assert set(table.obs[attrs["instance_key"]]) <= set(circles.index)
        assert list(table.obs[attrs["instance_key"]]) == list(table.obs_names)
    gene = exported.genes[0]
    joined = sd.get_values(gene, sdata=sdata, element_name="spots", table_name="predicted")
    by_barcode = dict(zip(expected.obs_names, expected[:, gene].X[:, 0], strict=True))
    np.testing.assert_array_equal(joined[gene].to_numpy(), [by_barcode[b] for b in joined.index])


def test_factorised_exports_equal_to_dense_and_replace_a_store(exported, tiny_cohort, tmp_path):
    """A factorised prediction gives the dense one's table (every gene by default); exporting over
    an existing store replaces it; a cohort without the slide's image gives no image element."""
    sid, out = exported.sid, tmp_path / "out"
    shutil.copytree(exported.written[0], out / f"{sid}.zarr")
    written = export_spatialdata(exported.predf, tiny_cohort, out, samples="all", progress=False)
    assert written == [out / f"{sid}.zarr"] and sorted(p.name for p in out.iterdir()) == [
        f"{sid}.zarr"
    ]
    sdata = sd.read_zarr(written[0])
    assert not sdata.images and set(sdata.shapes) == {"spots"}  # the new store, not the copy
    predicted = sdata.tables["predicted"]
    expected = read_prediction(exported.predf / f"{sid}.h5ad")
    assert list(predicted.var_names) == list(expected.var_names)
    np.testing.assert_array_equal(np.asarray(predicted.X), expected.X)
    dense = read_prediction(exported.pred / f"{sid}.h5ad").X
    np.testing.assert_allclose(np.asarray(predicted.X), dense, rtol=1e-4, atol=1e-4)
    assert keys.OBSM_HIDDEN not in predicted.obsm and keys.VARM_HEAD not in predicted.varm
    assert keys.OBSM_PATHWAYS in predicted.obsm and "measured" in sdata.tables


def test_failure_mid_write_leaves_no_store_and_keeps_the_old_one(
    exported, tiny_cohort, tmp_path, monkeypatch
):
    from spatialdata import SpatialData

    original, seen = SpatialData._write_element, []

    def fail_on_tables(self, element, zarr_container_path, element_type, *args, **kwargs):
        if element_type == "tables":
            seen.append(sorted(p.name for p in Path(zarr_container_path).iterdir()))
            raise OSError("disk full")
        return original(self, element, zarr_container_path, element_type, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "_write_element", fail_on_tables)
    sid = exported.sid
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    shutil.copytree(exported.written[0], kept / f"{sid}.zarr")
    for out in (fresh, kept):
        with pytest.raises(OSError, match="disk full"):
            export_spatialdata(
                exported.pred,
                tiny_cohort,
                out,
                samples=sid,
                genes=exported.genes[:1],
                progress=False,
            )
    assert seen and "shapes" in seen[0]  # it failed after writing the circles
    assert list(fresh.iterdir()) == []
    assert sorted(p.name for p in kept.iterdir()) == [f"{sid}.zarr"]
    monkeypatch.undo()
    old = sd.read_zarr(kept / f"{sid}.zarr")
    assert list(old.tables["predicted"].var_names) == exported.genes


def _write_pyramidal_tiff(path: Path, blocks: np.ndarray, size: tuple[int, int]) -> None:
    """A generic tiled TIFF as OpenSlide reads it, levels 1x and 4x of the BLOCK pattern,
    written tile by tile (never the whole level in memory)."""
    tifffile = pytest.importorskip("tifffile")
    w0, h0 = size

    def tiles(w, h, ds):
        ys, xs = np.arange(256), np.arange(256)
        for y in range(0, h, 256):
            for x in range(0, w, 256):
                rows = np.minimum((y + ys) * ds // BLOCK, blocks.shape[0] - 1)
                cols = np.minimum((x + xs) * ds // BLOCK, blocks.shape[1] - 1)
                yield blocks[rows][:, cols]

    with tifffile.TiffWriter(path) as tif:
        for i, ds in enumerate((1, 4)):
            w, h = w0 // ds, h0 // ds
            tif.write(
                tiles(w, h, ds), shape=(h, w, 3), dtype=np.uint8, photometric="rgb", tile=(256, 256),
                compression="zlib", resolution=(2e4 / ds, 2e4 / ds), resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1, metadata=None,
            )  # fmt: skip


def test_whole_slide_pyramid_level_and_measured_spots_without_prediction(
    exported, cohort_copy, tmp_path
):
    """A tiled pyramidal TIFF through OpenSlide: the 4x level is read and averaged 2x (scale 8
    and a bit: the level is w0 // 4 px wide); a counted spot with no prediction is left out, a
    column name spatialdata refuses is sanitised."""
    pytest.importorskip("openslide")
    sid, cc = exported.sid, cohort_copy()
    shutil.rmtree(cc.root / keys.WSI_DIR, ignore_errors=True)
    (cc.root / keys.WSI_DIR).mkdir()
    h0, w0 = (np.array(exported.blocks.shape[:2]) * BLOCK).tolist()
    w0, h0 = w0 - 13, h0 - 7  # not a multiple of 4: the level's ratio is not exactly 4
    _write_pyramidal_tiff(cc.root / keys.WSI_DIR / f"{sid}.tif", exported.blocks, (w0, h0))

    def add_spot(st: ad.AnnData) -> ad.AnnData:
        extra = st[:1].copy()
        extra.obs_names = ["NO-PREDICTION-1"]
        st = ad.concat([st, extra], merge="same")
        st.obs["in tissue?"] = 1  # a name spatialdata refuses
        return st

    cc.edit_st(sid, add_spot)
    written = export_spatialdata(
        exported.pred, cc.root, tmp_path, samples=sid, genes=exported.genes[:1], max_image_px=1500,
        progress=False,
    )  # fmt: skip
    sdata = sd.read_zarr(written[0])
    from spatialdata.transformations import get_transformation

    scale = _scale(get_transformation(sdata.images["image"], "global"))
    assert scale["x"] == pytest.approx(2 * w0 / (w0 // 4)) and scale["y"] == pytest.approx(
        2 * h0 / (h0 // 4)
    )
    xy = np.asarray(ad.read_h5ad(exported.pred / f"{sid}.h5ad").obsm[keys.OBSM_SPATIAL])
    finest = sdata.images["image"]["scale0"]["image"].values
    _assert_pixels_match(
        finest.astype(np.float64),
        (scale["y"], scale["x"]),
        xy,
        exported.blocks,
        per_pixel=2,
        level_ds=4,
    )
    measured = sdata.tables["measured"]
    st = ad.read_h5ad(cc.st_path(sid))
    assert list(measured.obs_names) == list(st.obs_names[:-1])
    assert (measured.X != st.X[:-1]).nnz == 0
    assert "in_tissue_" in measured.obs and "in tissue?" not in measured.obs


def test_image_plan_bounds_the_finest_level():
    svs = ([(100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (3_125, 2_500)], [1, 4, 16, 32])
    plan = image_plan(*svs, max_image_px=20_000)  # level 1 (25,000 px) averaged 2x
    assert (plan.level, plan.factor, plan.scale) == (1, 2, (8.0, 8.0))
    assert plan.shape[1] >= 12_500 and plan.shape[1] % 2**plan.n_halvings == 0
    assert max(plan.shape) / 2**plan.n_halvings <= export_mod.PYRAMID_MIN_PX
    plan = image_plan(*svs, max_image_px=6_250)  # a level that fits is read as is
    assert (plan.level, plan.factor, plan.scale) == (2, 1, (16.0, 16.0))
    one = image_plan([(100_000, 30_001)], [1.0], max_image_px=20_000)  # single level: averaged
    assert (one.level, one.factor, one.scale) == (0, 5, (5.0, 5.0)) and one.shape[0] >= 6001
    small = image_plan([(900, 700)], [1.0])  # never upsampled
    assert (small.factor, small.scale, small.shape, small.n_halvings) == (
        1,
        (1.0, 1.0),
        (700, 900),
        1,
    )


def test_errors_are_one_line_naming_the_file(exported, tmp_path, monkeypatch):
    def error(*args, **kwargs) -> str:
        with pytest.raises(InputError) as info:
            export_spatialdata(*args, progress=False, **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert str(empty) in error(empty, exported.cohort, out) and "no predictions" in error(
        empty, exported.cohort, out
    )
    assert "not found" in error(tmp_path / "absent", exported.cohort, out)
    msg = error(exported.pred, exported.cohort, out, samples="NOPE")
    assert "NOPE" in msg and "not in metadata" in msg
    msg = error(exported.pred, exported.cohort, out, genes=["NOT_A_GENE"])
    assert "NOT_A_GENE" in msg and f"{exported.sid}.h5ad" in msg
    monkeypatch.setattr(export_mod, "MAX_DENSE_SPOTS", 10)
    msg = error(exported.predf, exported.cohort, out)
    assert "--genes" in msg and f"{exported.sid}.h5ad" in msg
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # not installed
    assert "histoprism[ecosystem]" in error(exported.pred, exported.cohort, out)
    assert not out.exists()  # nothing written by any of these


def test_spatialdata_plot_draws_the_export(exported):
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = sd.read_zarr(exported.written[0])
    gene = exported.genes[0]
    sdata.pl.render_images("image").pl.render_shapes(
        "spots", color=gene, table_name="predicted"
    ).pl.show()
    ax = plt.gcf().axes[0]
    assert len(ax.images) == 1 and len(ax.collections) >= 1
    spots = ax.collections[0]  # coloured by the predicted table's values, not the counts'
    expected = read_prediction(exported.pred / f"{exported.sid}.h5ad", [gene]).X[:, 0]
    assert len(spots.get_facecolor()) == len(expected)
    assert (spots.norm.vmin, spots.norm.vmax) == pytest.approx((expected.min(), expected.max()))
    plt.close("all")


def test_export_command(exported, tmp_path):
    """``histoprism export``: the stores and one summary line; an unknown format is one line."""
    from typer.testing import CliRunner

    from histoprism.cli import app

    args = ["export", "--pred", exported.pred, "--data", exported.cohort, "--out", tmp_path]
    result = CliRunner().invoke(
        app, [str(a) for a in [*args, "--format", "spatialdata", "--genes", exported.genes[0]]]
    )
    assert result.exit_code == 0, result.output
    assert "exported 1 slides" in result.stdout
    table = sd.read_zarr(tmp_path / f"{exported.sid}.zarr").tables["predicted"]
    assert list(table.var_names) == [exported.genes[0]]
    bad = CliRunner().invoke(app, [str(a) for a in [*args, "--format", "zarr"]])
    assert bad.exit_code == 2 and "unknown --format 'zarr'" in bad.output
