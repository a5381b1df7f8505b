"""The LazySlide / wsidata bridge on a real pyramidal TIFF tiled by LazySlide: HistoPrism through
``zs.tl.feature_prediction`` equals our own predict path, tile corners become centres, and a
wsidata feature table round-trips as a ``Slide`` and as an embedding file."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

zs = pytest.importorskip("lazyslide")

from wsidata.io import add_features  # noqa: E402  (after the importorskip)

from histoprism._core import keys  # noqa: E402
from histoprism._core.errors import InputError  # noqa: E402
from histoprism.expression.genes import GeneIdMap  # noqa: E402
from histoprism.integrations.lazyslide import (  # noqa: E402
    LazySlidePredictor,
    _check_field_of_view,
    slide_from_wsidata,
    write_embeddings_from_wsidata,
)
from histoprism.io.cohort import Cohort  # noqa: E402
from histoprism.io.readers import read_embeddings  # noqa: E402
from histoprism.models.run import load  # noqa: E402
from histoprism.synthetic.images import Rendering, write_pyramid_tiff  # noqa: E402

MPP = 0.5  # µm per level-0 pixel of the test slide
TILE = (96, 64)  # tile (width, height) px at 1 µm/px: level-0 boxes of 192 x 128 px
FEATURES = "synthetic"  # the runs' encoder: LazySlide names the table "synthetic_tiles"
DIM = 32  # the tiny runs' embedding dimension


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    """A 2000 x 1500 px slide (0.5 µm/px, two pyramid levels) with an elliptic H&E-coloured
    tissue, tissue-segmented and tiled by LazySlide, with random 32-d tile features."""
    root = tmp_path_factory.mktemp("lazyslide")
    rng = np.random.default_rng(0)
    h, w = 1200, 1600
    y, x = np.mgrid[:h, :w]
    tissue = ((x - w / 2) / 700) ** 2 + ((y - h / 2) / 500) ** 2 < 1
    image = np.full((h, w, 3), 240, dtype=np.uint8)
    pink = np.array([180, 90, 160]) + rng.integers(0, 40, (h, w, 1))
    image[tissue] = pink[tissue].clip(0, 255).astype(np.uint8)
    path = write_pyramid_tiff(
        root / "slide.tif",
        Rendering(image, (200, 100), (240, 240, 240)),
        (2000, 1500),
        um_per_px=MPP,
    )
    wsi = zs.open_wsi(path, store=str(root / "slide.zarr"))
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, TILE, mpp=1.0)
    n = len(wsi["tiles"])
    add_features(
        wsi,
        key=f"{FEATURES}_tiles",
        tile_key="tiles",
        features=rng.normal(size=(n, DIM)).astype(np.float32),
    )
    return wsi


@pytest.fixture(scope="module")
def run_dir(trained_runs):
    return trained_runs["histoprism"]


@pytest.fixture(scope="module")
def reference(run_dir):
    """Our own predict path, on the CPU."""
    return load(run_dir, device="cpu")


def _centroids(wsi) -> np.ndarray:
    """(N, 2) centres of the tile boxes, from the polygons themselves."""
    c = wsi["tiles"].geometry.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()])


def _own_prediction(run, slide) -> np.ndarray:
    prepared = run.predictor.prepare(slide, unknown_cancer=True)
    return np.maximum(run.predictor.predict_genes(prepared, slice(None)), 0)


def test_the_fixture_is_a_real_tiled_slide(wsi):
    tiles = wsi["tiles"]
    spec = wsi.tile_spec("tiles")
    assert len(tiles) >= 20
    assert wsi.properties.mpp == pytest.approx(MPP)
    assert (spec.base_width, spec.base_height) == (192, 128)  # 96 x 64 px at 1 µm/px


def test_feature_prediction_equals_histoprism_predict(wsi, run_dir, reference):
    predictor = LazySlidePredictor.from_wsidata(run_dir, wsi, cancer="IDC", device="cpu")
    assert predictor.mpp == MPP and predictor.tile_px == (192.0, 128.0)
    zs.tl.feature_prediction(wsi, predictor, FEATURES, device="cpu", pbar=False)

    table = wsi["histoprism_tiles"]
    assert list(table.var_names) == list(reference.panel.genes)
    assert table.n_obs == len(wsi["tiles"])
    np.testing.assert_array_equal(table.obs["tile_id"], wsi["tiles"]["tile_id"])
    slide = slide_from_wsidata(wsi, FEATURES, cancer="IDC")
    expected = _own_prediction(reference, slide)
    np.testing.assert_allclose(np.asarray(table.X), expected, atol=1e-5)
    assert np.asarray(table.X).min() >= 0


def test_the_model_sees_tile_centres_in_level0_pixels_and_um(wsi, run_dir):
    predictor = LazySlidePredictor.from_wsidata(run_dir, wsi, cancer="IDC", device="cpu")
    seen = []
    prepare = predictor.model.prepare

    def spy(slide, **kwargs):
        seen.append(slide)
        return prepare(slide, **kwargs)

    predictor.model.prepare = spy
    assert predictor.features_model_name == FEATURES  # the run's encoder: feature_key inferred
    zs.tl.feature_prediction(wsi, predictor, key_added="spy", device="cpu", pbar=False)
    (slide,) = seen  # whole_slide: one call with every tile
    # the polygons' own centres: a corner, or a corner shifted by half a tile, fails
    np.testing.assert_allclose(slide.coords, _centroids(wsi), atol=1e-9)
    assert slide.pixel_size_um == MPP
    np.testing.assert_array_equal(slide.features, np.asarray(wsi[f"{FEATURES}_tiles"].X))
    np.testing.assert_allclose(slide.coords_um, _centroids(wsi) * MPP)


def test_gene_subset_in_the_order_asked_and_by_another_name(wsi, run_dir, reference):
    genes = list(reference.panel.genes)
    ensembl = GeneIdMap.bundled().to_ensembl([genes[0]])[0]
    assert ensembl is not None
    asked = [genes[7], ensembl, genes[3]]
    predictor = LazySlidePredictor.from_wsidata(
        run_dir, wsi, cancer="IDC", genes=asked, device="cpu"
    )
    tiles = wsi["tiles"].bounds[["minx", "miny"]].to_numpy()
    features = np.asarray(wsi[f"{FEATURES}_tiles"].X)
    out = predictor.predict(features, tiles)
    assert list(out) == asked
    full = _own_prediction(reference, slide_from_wsidata(wsi, FEATURES, cancer="IDC"))
    for name, col in zip(asked, (7, 0, 3), strict=True):
        assert out[name].shape == (len(tiles),) and out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], full[:, col], atol=1e-5)


def test_blocks_of_far_apart_genes(wsi, run_dir, reference, monkeypatch):
    import histoprism.integrations.lazyslide as bridge

    monkeypatch.setattr(bridge, "BLOCK_GENES", 4)  # columns 0 .. 299: many blocks, no wide one
    genes = list(reference.panel.genes)
    cols = [299, 0, 150, 2, 151, 3]
    predictor = LazySlidePredictor(
        reference, cancer="COAD", mpp=MPP, tile_px=(192, 128), genes=[genes[c] for c in cols]
    )
    slide = slide_from_wsidata(wsi, FEATURES, cancer="COAD")
    corners = wsi["tiles"].bounds[["minx", "miny"]].to_numpy()
    out = predictor.predict(slide.features, corners)
    full = _own_prediction(reference, slide)
    got = np.column_stack(list(out.values()))
    np.testing.assert_allclose(got, full[:, cols], atol=1e-5)


def test_unknown_cancer_warns_and_predicts_with_unknown(wsi, reference):
    with pytest.warns(UserWarning, match="'XYZ'.*'Unknown' token"):
        predictor = LazySlidePredictor(reference, cancer="XYZ", mpp=MPP, tile_px=(192, 128))
    assert predictor.cancer_used == keys.UNKNOWN_CANCER
    slide = slide_from_wsidata(wsi, FEATURES, cancer=keys.UNKNOWN_CANCER)
    corners = wsi["tiles"].bounds[["minx", "miny"]].to_numpy()
    out = np.column_stack(list(predictor.predict(slide.features, corners).values()))
    np.testing.assert_allclose(out, _own_prediction(reference, slide), atol=1e-5)
    idc = _own_prediction(reference, slide_from_wsidata(wsi, FEATURES, cancer="IDC"))
    assert np.abs(out - idc).max() > 1e-3  # the cancer token matters: Unknown was used


def test_slide_from_wsidata_round_trip(wsi):
    slide = slide_from_wsidata(wsi, FEATURES, cancer="IDC")
    same = slide_from_wsidata(wsi, f"{FEATURES}_tiles", cancer="IDC", sample_id="S1")
    tiles = wsi["tiles"]
    assert slide.id == "slide" and same.id == "S1" and slide.cancer == "IDC"
    np.testing.assert_allclose(slide.coords, _centroids(wsi))
    np.testing.assert_array_equal(slide.barcodes, tiles["tile_id"].astype(str).to_numpy())
    np.testing.assert_array_equal(slide.features, np.asarray(wsi[f"{FEATURES}_tiles"].X))
    np.testing.assert_array_equal(same.features, slide.features)
    assert slide.features.dtype == np.float32 and slide.pixel_size_um == MPP
    assert slide_from_wsidata(wsi, FEATURES, cancer="IDC", mpp=0.25).pixel_size_um == 0.25


def test_write_embeddings_from_wsidata_reads_back(wsi, tmp_path):
    path = write_embeddings_from_wsidata(wsi, FEATURES, tmp_path / "slide.h5")
    emb = read_embeddings(path)
    slide = slide_from_wsidata(wsi, FEATURES, cancer="IDC")
    np.testing.assert_array_equal(emb.features, slide.features)
    np.testing.assert_allclose(emb.coords, _centroids(wsi))
    np.testing.assert_array_equal(emb.barcodes, slide.barcodes)
    with h5py.File(path) as h5:
        attrs = dict(h5.attrs)
    assert attrs[keys.H5_ATTR_ENCODER] == FEATURES and attrs[keys.H5_ATTR_SOURCE] == "lazyslide"
    assert attrs[keys.H5_ATTR_MPP] == 1.0 and attrs[keys.H5_ATTR_PATCH_PX] == TILE[0]


def test_written_embeddings_make_a_cohort_slide(wsi, tmp_path):
    # what a LazySlide user does to predict with `histoprism predict`: embeddings + metadata.csv
    write_embeddings_from_wsidata(wsi, FEATURES, tmp_path / "embeddings" / FEATURES / "S1.h5")
    pd.DataFrame({"id": ["S1"], "oncotree_code": ["IDC"], "pixel_size_um_embedded": [MPP]}).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    got = Cohort(tmp_path).slide("S1", FEATURES, counts=False)
    want = slide_from_wsidata(wsi, FEATURES, cancer="IDC", sample_id="S1")
    assert (got.id, got.cancer, got.pixel_size_um) == (want.id, want.cancer, want.pixel_size_um)
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.coords, want.coords)
    np.testing.assert_array_equal(got.barcodes, want.barcodes)


def test_bad_tables_are_one_line_input_errors(wsi):
    with pytest.raises(InputError, match="no feature table 'uni' or 'uni_tiles'"):
        slide_from_wsidata(wsi, "uni", cancer="IDC")
    n = len(wsi["tiles"])
    nan = np.zeros((n, DIM), dtype=np.float32)
    nan[3, 5] = np.nan
    add_features(wsi, key="nan_tiles", tile_key="tiles", features=nan)
    with pytest.raises(InputError, match="'nan_tiles': 1 of .* tiles contain NaN"):
        slide_from_wsidata(wsi, "nan", cancer="IDC")
    import anndata as ad

    wsi.tables["short_tiles"] = ad.AnnData(np.zeros((n - 1, DIM), dtype=np.float32))
    with pytest.raises(InputError, match=f"has {n - 1} rows but tiles 'tiles' has {n}"):
        write_embeddings_from_wsidata(wsi, "short", "unused.h5")
    with pytest.raises(InputError, match="no tiles 'cells'"):
        slide_from_wsidata(wsi, FEATURES, cancer="IDC", tile_key="cells")


def test_predictor_input_errors(reference):
    with pytest.raises(InputError, match="not in the model's gene panel: NOPE"):
        LazySlidePredictor(reference, cancer="IDC", mpp=MPP, tile_px=64, genes=["NOPE"])
    with pytest.raises(InputError, match="µm per pixel"):
        LazySlidePredictor(reference, cancer="IDC", mpp=None, tile_px=64)
    predictor = LazySlidePredictor(reference, cancer="IDC", mpp=MPP, tile_px=64)
    features = np.zeros((5, DIM), dtype=np.float32)
    with pytest.raises(InputError, match="needs the tiles' coordinates"):
        predictor.predict(features)
    with pytest.raises(InputError, match=r"coords of shape \(4, 2\)"):
        predictor.predict(features, np.zeros((4, 2)))
    with pytest.raises(InputError, match="embeddings have dimension 16"):
        predictor.predict(np.zeros((5, 16), dtype=np.float32), np.zeros((5, 2)))


def test_tiles_of_another_field_of_view_than_the_encoder_warn(wsi):
    spec = wsi.tile_spec("tiles")  # 192 px at 0.5 µm/px: 96 µm, where UNI saw 112 µm
    with pytest.warns(UserWarning, match="96 µm wide.*'uni'.*112 µm"):
        _check_field_of_view("uni", spec, MPP)
    _check_field_of_view("synthetic", spec, MPP)  # no such encoder: nothing to compare


@pytest.mark.parametrize("kind", ["ridge-knn", "mlp"])
def test_baseline_runs_predict_through_lazyslide_too(wsi, trained_runs, kind):
    predictor = LazySlidePredictor.from_wsidata(trained_runs[kind], wsi, cancer="COAD")
    assert predictor.to("cpu") is predictor  # no network to move: the baselines run on the CPU
    zs.tl.feature_prediction(wsi, predictor, FEATURES, key_added=kind, device="cpu", pbar=False)
    run = load(trained_runs[kind], device="cpu")
    expected = _own_prediction(run, slide_from_wsidata(wsi, FEATURES, cancer="COAD"))
    np.testing.assert_allclose(np.asarray(wsi[kind].X), expected, atol=1e-5)
