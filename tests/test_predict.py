"""Whole-slide prediction: the PRED/{id}.h5ad contract (docs/formats.md, "PRED: predictions"),
chunking, pathway scores, refusals, slides without counts, atomic writes, and evaluate on real
predictions."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import pearsonr

from histoprism import __version__
from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.evaluate import evaluate
from histoprism.expression import pathways as pathways_mod
from histoprism.expression.genes import GENESET_COLLECTIONS, gpc_genesets
from histoprism.expression.pathways import panel_membership, pathway_scores
from histoprism.inference import predict as predict_mod
from histoprism.inference import writer as writer_mod
from histoprism.inference.predict import predict, predict_slide
from histoprism.io.cohort import Cohort
from histoprism.io.prediction import is_factorised, read_genes, read_pathways, read_prediction
from histoprism.models import run as run_mod
from histoprism.models.inputs import knn_index, slide_mean
from histoprism.models.run import load

ENCODER = "synthetic"


def _st(cohort, sid) -> ad.AnnData:
    return ad.read_h5ad(cohort / keys.ST_DIR / f"{sid}.h5ad")


@pytest.fixture(scope="module")
def split_test_ids(tiny_cohort) -> list[str]:
    return Cohort(tiny_cohort).ids("test")


@pytest.fixture(scope="module")
def predictions(tiny_cohort, trained_runs, tmp_path_factory):
    """PRED/ of the HistoPrism run on the test split (float32)."""
    out = tmp_path_factory.mktemp("pred")
    paths = predict(trained_runs["histoprism"], tiny_cohort, ENCODER, out, progress=False)
    return out, paths


def _all_gpc_sets() -> dict[str, list[str]]:
    sets = {}
    for collection in GENESET_COLLECTIONS:
        sets.update(gpc_genesets(collection))
    return sets


# --- the file contract ---------------------------------------------------------------------------------
def test_prediction_h5ad_contract(tiny_cohort, trained_runs, predictions, split_test_ids):
    out, paths = predictions
    assert sorted(p.name for p in paths) == sorted(f"{i}.h5ad" for i in split_test_ids)
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # not .lock
    assert written == sorted(f"{i}.h5ad" for i in split_test_ids)
    genes = json.loads((trained_runs["histoprism"] / keys.RUN_CONFIG).read_text())["genes"]
    cohort = Cohort(tiny_cohort)
    sets = _all_gpc_sets()
    for sid in split_test_ids:
        pred, st = ad.read_h5ad(out / f"{sid}.h5ad"), _st(tiny_cohort, sid)
        assert isinstance(pred.X, np.ndarray) and pred.X.dtype == np.float32
        assert pred.X.shape == (st.n_obs, len(genes)) and np.isfinite(pred.X).all()
        assert list(pred.var_names) == genes
        # every spot of the counts file has an embedding here: all of them, in the st order
        assert list(pred.obs_names) == list(st.obs_names)
        np.testing.assert_array_equal(pred.obsm[keys.OBSM_SPATIAL], st.obsm[keys.OBSM_SPATIAL])
        assert (pred.obs[keys.OBS_CANCER] == cohort.cancer(sid)).all()
        pw = pred.obsm[keys.OBSM_PATHWAYS]
        assert isinstance(pw, pd.DataFrame) and list(pw.index) == list(pred.obs_names)
        assert len(pw.columns) > 10 and set(pw.columns) <= set(sets)
        assert np.isfinite(pw.to_numpy()).all()
        info = pred.uns[keys.UNS_HISTOPRISM]
        assert info["version"] == __version__ and info["model"] == "histoprism"
        assert info["encoder"] == ENCODER and info["units"] == "log1p(counts)"
        # log1p scale: never negative (the head's output is clipped at 0), varying across spots
        assert pred.X.min() >= 0 and pred.X.mean() > 0 and pred.X.std(0).max() > 0.05
        # the grid position and gene ids of the counts file, the pathway scores by name
        for col in (keys.OBS_ARRAY_ROW, keys.OBS_ARRAY_COL):
            np.testing.assert_array_equal(pred.obs[col].to_numpy(), st.obs[col].to_numpy())
        assert {keys.VAR_GENE_IDS, keys.VAR_GENE_SYMBOLS} <= set(pred.var.columns)
        np.testing.assert_array_equal(pred.obs[pw.columns].to_numpy(), pw.to_numpy())
        assert info["pathways"]["method"] == predict_mod.PATHWAY_METHOD
        # no image in this cohort: a white canvas that covers every spot, for scanpy to draw on
        library = pred.uns[keys.UNS_SPATIAL][sid]
        canvas, scale = library["images"]["hires"], library["scalefactors"]["tissue_hires_scalef"]
        assert (canvas == 255).all() and library["metadata"]["source_image"] == "none"
        assert (pred.obsm[keys.OBSM_SPATIAL] * scale < np.array(canvas.shape[1::-1])).all()


@pytest.mark.parametrize(
    "kind, tiles",
    [
        ("histoprism", dict(TILE_SPOTS=13, TILE_GENES=7)),  # 300 genes = 42 tiles of 7 and one of 6
        ("histoprism", dict(TILE_SPOTS=1, TILE_GENES=1000)),
        ("ridge", dict(CHUNK_BYTES=1)),  # one gene per block
        ("ridge", dict(CHUNK_BYTES="7 genes")),
    ],
)
def test_tiled_head_equals_single_block(
    tiny_cohort, trained_runs, split_test_ids, tmp_path, monkeypatch, kind, tiles
):
    sid = split_test_ids[0]
    run = load(trained_runs[kind])
    slide = Cohort(tiny_cohort).slide(sid, ENCODER)
    n, g = slide.n_spots, len(run.panel)
    assert writer_mod.tile_shape(n, g, whole_columns=kind != "histoprism") == (n, g)  # one block
    full = ad.read_h5ad(predict_slide(run, slide, tmp_path / "full.h5ad"))
    for name, value in tiles.items():
        monkeypatch.setattr(writer_mod, name, 4 * n * 7 if value == "7 genes" else value)
    assert writer_mod.tile_shape(n, g, whole_columns=kind != "histoprism") != (n, g)
    tiled = ad.read_h5ad(predict_slide(run, slide, tmp_path / "tiled.h5ad"))
    np.testing.assert_allclose(tiled.X, full.X, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        tiled.obsm[keys.OBSM_PATHWAYS].to_numpy(),
        full.obsm[keys.OBSM_PATHWAYS].to_numpy(),
        atol=1e-5,
        rtol=0,
    )


def test_closed_form_pathway_scores_in_spot_blocks(trained_runs, monkeypatch):
    run = load(trained_runs["histoprism"])
    _, M = panel_membership(run.panel, _all_gpc_sets())
    prepared = torch.randn(
        50, run.predictor.model.cfg.hidden, generator=torch.Generator().manual_seed(0)
    )
    whole = run.predictor.pathway_scores(prepared, M)
    monkeypatch.setattr(pathways_mod, "SPOT_BLOCK", 7)
    np.testing.assert_allclose(run.predictor.pathway_scores(prepared, M), whole, atol=1e-10)


def test_head_blocks_stay_within_chunk_bytes_for_any_slide_size(trained_runs, monkeypatch):
    """Each head block is at most CHUNK_BYTES of float32 and the blocks tile X exactly once."""
    run = load(trained_runs["histoprism"])
    g = len(run.panel)
    monkeypatch.setattr(writer_mod, "TILE_SPOTS", 64)
    monkeypatch.setattr(writer_mod, "TILE_GENES", 128)
    for n in (1, 100, 5000):

        class Sink:  # stands in for the h5py dataset: counts the writes of every entry
            shape, dtype = (n, g), np.dtype("float32")
            seen = np.zeros((n, g), dtype=np.int64)

            def __setitem__(self, key, block):
                self.seen[key] += 1
                assert block.nbytes <= writer_mod.CHUNK_BYTES and block.shape[0] <= 64

        prepared = torch.zeros(n, run.predictor.model.cfg.hidden)
        rows, cols = writer_mod.tile_shape(n, g, whole_columns=False)
        writer_mod._write_tiles(run.predictor, prepared, sink := Sink(), rows, cols)
        assert (sink.seen == 1).all()


@pytest.mark.parametrize("kind", ["histoprism", "ridge-knn"])
def test_pathway_score_is_mean_zscore_of_set_genes(
    tiny_cohort, trained_runs, predictions, split_test_ids, tmp_path, kind
):
    """HistoPrism's scores come in closed form from its trunk output, a baseline's from the
    z-scored output blocks: both equal the mean z-score of the set's genes in the model's output,
    of which X is the part >= 0."""
    sid = split_test_ids[0]
    if kind == "histoprism":
        pred = ad.read_h5ad(predictions[0] / f"{sid}.h5ad")
    else:
        predict(trained_runs[kind], tiny_cohort, ENCODER, tmp_path, samples=sid)
        pred = ad.read_h5ad(tmp_path / f"{sid}.h5ad")
    run = load(trained_runs[kind])
    p = run.predictor
    out = p.predict_genes(p.prepare(Cohort(tiny_cohort).slide(sid, ENCODER)), slice(None))
    x = out.astype(np.float64)  # (N, G) before the clip at 0
    assert (x < 0).any()  # the clip matters here: the test could tell the two apart
    np.testing.assert_allclose(pred.X, np.maximum(out, 0), atol=1e-5, rtol=0)
    sd = x.std(0)
    z = pd.DataFrame(
        np.where(sd > 0, (x - x.mean(0)) / np.where(sd > 0, sd, 1.0), 0.0),
        columns=pred.var_names,
    )
    sets = _all_gpc_sets()
    pw = pred.obsm[keys.OBSM_PATHWAYS]
    for name in pw.columns:
        members = [g for g in dict.fromkeys(sets[name]) if g in z.columns]
        assert members, name
        np.testing.assert_allclose(pw[name], z[members].mean(axis=1), atol=1e-4, err_msg=name)
    # every set with a panel gene is there, none without
    have = {n for n, g in sets.items() if set(g) & set(pred.var_names)}
    assert set(pw.columns) == have


def test_float16_output(tiny_cohort, trained_runs, predictions, split_test_ids, tmp_path):
    sid = split_test_ids[0]
    predict(
        trained_runs["histoprism"],
        tiny_cohort,
        ENCODER,
        tmp_path,
        samples=sid,
        dtype="float16",
        progress=False,
    )
    half = ad.read_h5ad(tmp_path / f"{sid}.h5ad")
    full = ad.read_h5ad(predictions[0] / f"{sid}.h5ad")
    assert half.X.dtype == np.float16 and half.X.shape == full.X.shape
    # float16 keeps 11 significant bits: relative rounding error <= 2**-11
    np.testing.assert_allclose(half.X.astype(np.float32), full.X, rtol=2**-11, atol=1e-4)
    assert list(half.obs_names) == list(full.obs_names)


# --- refusals and fallbacks ------------------------------------------------------------------------------
def test_unknown_cancer_code_refused_or_predicted_as_unknown(
    trained_runs, cohort_copy, split_test_ids, tmp_path
):
    sid = split_test_ids[0]
    cc = cohort_copy()
    cc.set_cancer(sid, "MESO")
    run = trained_runs["histoprism"]
    with pytest.raises(InputError, match="MESO"):
        predict(run, cc.root, ENCODER, tmp_path / "refused", samples=sid, progress=False)
    assert not (tmp_path / "refused" / f"{sid}.h5ad").exists()
    out = tmp_path / "fallback"
    predict(run, cc.root, ENCODER, out, samples=sid, unknown_cancer=True, progress=False)
    pred = ad.read_h5ad(out / f"{sid}.h5ad")
    assert (pred.obs[keys.OBS_CANCER] == keys.UNKNOWN_CANCER).all()
    assert pred.uns[keys.UNS_HISTOPRISM]["cancer_requested"] == "MESO"
    assert np.isfinite(pred.X).all()


def test_embedding_dimension_mismatch_refused(trained_runs, cohort_copy, split_test_ids, tmp_path):
    sid = split_test_ids[0]
    cc = cohort_copy()
    cc.edit_embedding(sid, lambda f: f[:, :16])
    with pytest.raises(InputError, match="dimension"):
        predict(trained_runs["histoprism"], cc.root, ENCODER, tmp_path, samples=sid, progress=False)


def test_wrong_encoder_name_refused(tiny_cohort, trained_runs, tmp_path):
    with pytest.raises(InputError, match="uni"):
        predict(trained_runs["histoprism"], tiny_cohort, "uni", tmp_path, progress=False)


def test_slide_without_counts_predicted_from_embeddings(
    tiny_cohort, trained_runs, cohort_copy, split_test_ids, tmp_path
):
    sid = split_test_ids[0]
    cc = cohort_copy()
    cc.st_path(sid).unlink()
    run = trained_runs["histoprism"]
    predict(run, cc.root, ENCODER, tmp_path, samples=sid, progress=False)
    pred = ad.read_h5ad(tmp_path / f"{sid}.h5ad")
    with h5py.File(cc.emb_path(sid), "r") as f:
        barcodes = [b.decode() for b in f[keys.H5_BARCODES][...]]
        coords = f[keys.H5_COORDS][...]
    assert list(pred.obs_names) == barcodes  # the embedding file's spots, in its order
    np.testing.assert_allclose(pred.obsm[keys.OBSM_SPATIAL], coords)
    assert pred.X.dtype == np.float32 and pred.X.shape == (len(barcodes), 300)
    assert np.isfinite(pred.X).all() and pred.X.std(0).max() > 0.05
    assert (pred.obs[keys.OBS_CANCER] == Cohort(tiny_cohort).cancer(sid)).all()


@pytest.mark.parametrize(
    "kind",
    [
        "histoprism",
        "ridge",
        "ridge-knn",
    ],
)
def test_prediction_does_not_depend_on_spot_order(
    tiny_cohort, trained_runs, cohort_copy, split_test_ids, tmp_path, kind
):
    """With counts, spots come in the counts file's order; without, in the (shuffled) embedding
    file's order. The same spots must get the same predictions."""
    sid = split_test_ids[0]
    cc = cohort_copy()
    cc.st_path(sid).unlink()
    predict(trained_runs[kind], cc.root, ENCODER, tmp_path / "emb", samples=sid, progress=False)
    predict(trained_runs[kind], tiny_cohort, ENCODER, tmp_path / "st", samples=sid, progress=False)
    pred = ad.read_h5ad(tmp_path / "emb" / f"{sid}.h5ad")
    ref = ad.read_h5ad(tmp_path / "st" / f"{sid}.h5ad")
    assert list(pred.obs_names) != list(ref.obs_names)  # really another order
    np.testing.assert_allclose(pred.X, ref[pred.obs_names].X, atol=1e-5, rtol=0)


def test_knn_index_is_permutation_equivariant():
    """A hex patch with an edge: neighbour sets must not depend on the order of the spots."""
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    xy = np.stack([2 * cols.ravel() + rows.ravel() % 2, rows.ravel() * np.sqrt(3)], axis=1)
    perm = np.random.default_rng(0).permutation(len(xy))
    a = knn_index(xy, 8)
    b = knn_index(xy[perm], 8)
    b_in_a = perm[b]  # neighbours of spot perm[i], as indices of the original order
    for i, p in enumerate(perm):
        assert set(a[p]) == set(b_in_a[i]), p


# --- attention at prediction time, and ranks ----------------------------------------------------------------
def test_local_attention_override_covering_the_slide_equals_full(
    tiny_cohort, trained_runs, predictions, split_test_ids, tmp_path
):
    sid = split_test_ids[0]
    run = trained_runs["histoprism"]
    kw = dict(samples=sid, progress=False)
    predict(
        run,
        tiny_cohort,
        ENCODER,
        tmp_path / "wide",
        attention="local",
        **kw,
        attention_radius_um=1e9,
    )
    predict(
        run,
        tiny_cohort,
        ENCODER,
        tmp_path / "near",
        attention="local",
        **kw,
        attention_radius_um=150.0,
    )
    predict(run, tiny_cohort, ENCODER, tmp_path / "full", attention="full", **kw)
    full = ad.read_h5ad(tmp_path / "full" / f"{sid}.h5ad").X
    wide = ad.read_h5ad(tmp_path / "wide" / f"{sid}.h5ad").X
    near = ad.read_h5ad(tmp_path / "near" / f"{sid}.h5ad").X
    np.testing.assert_allclose(wide, full, atol=1e-5, rtol=0)
    assert np.isfinite(near).all() and np.abs(near - full).max() > 1e-4  # a real neighbourhood


def test_ranks_predict_disjoint_shares_of_the_slides(
    tiny_cohort, trained_runs, tmp_path, monkeypatch
):
    ids = Cohort(tiny_cohort).ids()
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        paths = predict(
            trained_runs["ridge"], tiny_cohort, ENCODER, tmp_path, samples="all", progress=False
        )
        shares.append({p.stem for p in paths})
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(ids)
    assert abs(len(shares[0]) - len(shares[1])) <= 1


# --- atomic writes -----------------------------------------------------------------------------------------
def test_failure_mid_write_leaves_no_partial_file(
    tiny_cohort, trained_runs, split_test_ids, tmp_path, monkeypatch
):
    sid = split_test_ids[0]
    run = load(trained_runs["histoprism"])
    slide = Cohort(tiny_cohort).slide(sid, ENCODER)
    target = tmp_path / f"{sid}.h5ad"
    target.write_bytes(b"previous complete file")
    calls = []
    real = run_mod.HistoPrismPredictor.predict_genes

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # after two tiles are in the file
            raise RuntimeError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(writer_mod, "TILE_GENES", 50)
    monkeypatch.setattr(run_mod.HistoPrismPredictor, "predict_genes", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        predict_slide(run, slide, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"previous complete file"


# --- evaluate on real predictions ----------------------------------------------------------------------------
def _reference_hvg(cohort: Cohort, root, cancer: str) -> list[str]:
    """Top 50 by variance of log1p counts over the cancer's train slides, genes in all of them."""
    slides = [_st(root, i) for i in cohort.ids("train") if cohort.cancer(i) == cancer]
    common = sorted(set.intersection(*(set(s.var_names) for s in slides)))
    x = np.vstack([np.log1p(s[:, common].X.toarray().astype(np.float64)) for s in slides])
    var = x.var(axis=0)
    order = sorted(range(len(common)), key=lambda j: (-var[j], common[j]))
    return [common[j] for j in order[:50]]


def test_evaluate_headline_matches_independent_hvg_score(tiny_cohort, predictions, tmp_path):
    pred_dir, _ = predictions
    cohort = Cohort(tiny_cohort)
    metrics = evaluate(pred_dir, cohort, tmp_path, progress=False)
    assert json.loads((tmp_path / keys.EVAL_METRICS).read_text()) == metrics
    per_slide = {}
    for sid in cohort.ids("test"):
        pred, st = ad.read_h5ad(pred_dir / f"{sid}.h5ad"), _st(tiny_cohort, sid)
        pred = pred[list(st.obs_names)]  # align by barcode
        rs = []
        for g in _reference_hvg(cohort, tiny_cohort, cohort.cancer(sid)):
            p = pred[:, g].X.ravel().astype(np.float64)
            t = np.log1p(st[:, g].X.toarray().ravel().astype(np.float64))
            if p.std() > 0 and t.std() > 0:
                rs.append(pearsonr(p, t)[0])
        assert len(rs) >= 40
        per_slide[sid] = np.mean(rs)
    head = metrics["headline"]
    assert metrics["n_slides"] == len(per_slide)
    assert head["hvg_micro"] == pytest.approx(np.mean(list(per_slide.values())), abs=1e-4)
    assert head["hvg_micro"] > 0.05  # 3 epochs already learn something on the HVGs


@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 6)),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    arrays(np.float32, 6, elements=st.floats(-1e3, 1e3, width=32)),
)
def test_centred_embeddings_have_zero_mean_and_forget_a_slide_wide_shift(x, shift):
    """What the model sees with ``centre_slides``: each spot minus the slide's mean."""
    centre = slide_mean(x)
    assert centre.dtype == np.float32 and centre.shape == x.shape[1:]
    np.testing.assert_allclose((x - centre).mean(0), 0, atol=1e-3)
    shifted = x + shift[: x.shape[1]]
    np.testing.assert_allclose(shifted - slide_mean(shifted), x - centre, atol=2e-3)


def test_default_model_ignores_a_stain_shift_of_the_whole_slide(
    tiny_cohort, trained_runs, cohort_copy, split_test_ids, tmp_path
):
    """The default recipe centres each slide (``centre_slides``): adding one vector to every
    embedding of a slide, as a stain or scanner shift does, leaves its predictions unchanged."""
    run = trained_runs["histoprism"]
    assert json.loads((run / "config.json").read_text())["model_config"]["centre_slides"]
    sid = split_test_ids[0]
    cc = cohort_copy()
    with h5py.File(cc.emb_path(sid), "r+") as f:
        x = f["features"][:]
        shift = np.random.default_rng(0).normal(0.0, 2.0, x.shape[1]).astype(np.float32)
        f["features"][...] = x + shift
    predict(run, cc.root, ENCODER, tmp_path / "shifted", samples=sid, progress=False)
    predict(run, tiny_cohort, ENCODER, tmp_path / "plain", samples=sid, progress=False)
    shifted = ad.read_h5ad(tmp_path / "shifted" / f"{sid}.h5ad")
    plain = ad.read_h5ad(tmp_path / "plain" / f"{sid}.h5ad")
    np.testing.assert_allclose(shifted.X, plain.X, atol=1e-4, rtol=0)


# --- the spatial ecosystem -------------------------------------------------------------------------------
def _write_slide_image(cc, sid: str) -> tuple[int, int]:
    """A PNG covering the slide's spots as wsis/{id}.png: (width, height) level-0 px."""
    from PIL import Image

    xy = _st(cc.root, sid).obsm[keys.OBSM_SPATIAL]
    w, h = (int(v) + 50 for v in xy.max(0))
    rgb = np.full((h, w, 3), 240, np.uint8)
    rgb[:, : w // 2] = (200, 80, 160)  # a pink half: what the drawn image must show
    (cc.root / "wsis").mkdir(exist_ok=True)
    Image.fromarray(rgb).save(cc.root / "wsis" / f"{sid}.png")
    return w, h


def test_prediction_carries_the_slide_image_at_space_ranger_resolutions(
    trained_runs, cohort_copy, split_test_ids, tmp_path
):
    sid = split_test_ids[0]
    cc = cohort_copy()
    w, h = _write_slide_image(cc, sid)
    predict(trained_runs["histoprism"], cc.root, ENCODER, tmp_path, samples=sid, progress=False)
    library = ad.read_h5ad(tmp_path / f"{sid}.h5ad").uns[keys.UNS_SPATIAL][sid]
    hires, factors = library["images"]["hires"], library["scalefactors"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) == min(2000, max(w, h))
    assert factors["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / w, rel=0.01)
    assert max(library["images"]["lowres"].shape[:2]) == min(600, max(w, h))
    # the left half is pink at either resolution: the image is not flipped or transposed
    assert (
        hires[:, : hires.shape[1] // 4, 1].mean() < 100 < hires[:, -hires.shape[1] // 4 :, 1].mean()
    )
    # Visium-like pitch: spots drawn at 0.55 of the nearest-neighbour distance
    xy = _st(cc.root, sid).obsm[keys.OBSM_SPATIAL]
    d = np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=-1), axis=1)[:, 1]
    assert factors["spot_diameter_fullres"] == pytest.approx(0.55 * np.median(d), rel=1e-6)
    no_image = tmp_path / "no_image"
    predict(
        trained_runs["histoprism"], cc.root, ENCODER, no_image, samples=sid, images=False,
        progress=False,
    )  # fmt: skip
    blank = ad.read_h5ad(no_image / f"{sid}.h5ad").uns[keys.UNS_SPATIAL][sid]
    assert blank["metadata"]["source_image"] == "none" and (blank["images"]["hires"] == 255).all()


@pytest.mark.parametrize("with_image", [True, False])
def test_scanpy_and_squidpy_draw_a_prediction_over_its_tissue(
    trained_runs, cohort_copy, split_test_ids, tmp_path, with_image
):
    sc = pytest.importorskip("scanpy")
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    sid = split_test_ids[0]
    cc = cohort_copy()
    if with_image:
        _write_slide_image(cc, sid)
    predict(trained_runs["histoprism"], cc.root, ENCODER, tmp_path, samples=sid, progress=False)
    pred = sc.read_h5ad(tmp_path / f"{sid}.h5ad")
    gene, pathway = pred.var_names[0], pred.obsm[keys.OBSM_PATHWAYS].columns[0]
    for color in (gene, pathway):  # no spot_size, library_id or image argument
        ax = sc.pl.spatial(pred, color=color, show=False)[0]
        assert len(ax.images) == 1 and len(ax.collections) >= 1  # the tissue, then the spots
    sq.pl.spatial_scatter(pred, color=gene)
    fig = matplotlib.pyplot.gcf()
    assert any(len(a.images) == 1 for a in fig.axes)
    matplotlib.pyplot.close("all")


# --- factorised output (Visium HD scale) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def factorised(tiny_cohort, trained_runs, tmp_path_factory):
    """PRED/ of the HistoPrism run on the test split, factorised."""
    out = tmp_path_factory.mktemp("pred_factorised")
    predict(
        trained_runs["histoprism"], tiny_cohort, ENCODER, out, output="factorised", progress=False
    )
    return out


def test_factorised_prediction_reads_as_the_dense_one(predictions, factorised, split_test_ids):
    for sid in split_test_ids:
        dense_path, fact_path = predictions[0] / f"{sid}.h5ad", factorised / f"{sid}.h5ad"
        assert is_factorised(fact_path) and not is_factorised(dense_path)
        with h5py.File(fact_path) as f:
            assert "X" not in f and f["obsm"][keys.OBSM_HIDDEN].shape[1] < f["var"]["_index"].size
        dense, fact = read_prediction(dense_path), read_prediction(fact_path)
        np.testing.assert_allclose(fact.X, dense.X, atol=1e-5, rtol=0)
        assert fact.X.min() >= 0 and keys.OBSM_HIDDEN not in fact.obsm
        assert fact.uns[keys.UNS_HISTOPRISM]["output"] == "factorised"
        pd.testing.assert_frame_equal(fact.obsm[keys.OBSM_PATHWAYS], dense.obsm[keys.OBSM_PATHWAYS])
        # a few genes, in any order, as the whole file has them
        genes = [dense.var_names[7], dense.var_names[2], dense.var_names[-1]]
        for path in (dense_path, fact_path):
            np.testing.assert_allclose(read_genes(path, genes), dense[:, genes].X, atol=1e-5)
            sub = read_prediction(path, genes)
            assert list(sub.var_names) == genes
            np.testing.assert_allclose(sub.X, dense[:, genes].X, atol=1e-5)
        # any gene set: in closed form from the factors, the scores predict wrote (of the
        # model's output before the clip at 0); from a dense file, those of X as written
        sets = _all_gpc_sets()
        written = dense.obsm[keys.OBSM_PATHWAYS]
        np.testing.assert_allclose(read_pathways(fact_path, sets), written, atol=1e-4)
        from_x = read_pathways(dense_path, sets)
        expected, _ = pathway_scores(dense.X, dense.var_names, {n: sets[n] for n in written})
        np.testing.assert_allclose(from_x[written.columns], expected, atol=1e-5)


def test_evaluate_scores_factorised_and_dense_predictions_alike(
    tiny_cohort, predictions, factorised, tmp_path
):
    dense = evaluate(predictions[0], Cohort(tiny_cohort), tmp_path / "d", progress=False)
    fact = evaluate(factorised, Cohort(tiny_cohort), tmp_path / "f", progress=False)
    for name, value in dense["headline"].items():
        assert fact["headline"][name] == pytest.approx(value, abs=1e-5), name


def test_output_mode_auto_switches_on_size_and_refuses_nonlinear_models(
    tiny_cohort, trained_runs, split_test_ids, tmp_path, monkeypatch
):
    sid = split_test_ids[0]
    run, slide = load(trained_runs["histoprism"]), Cohort(tiny_cohort).slide(sid, ENCODER)
    assert not is_factorised(predict_slide(run, slide, tmp_path / "small.h5ad"))
    monkeypatch.setattr(writer_mod, "DENSE_MAX_BYTES", slide.n_spots * len(run.panel) * 4 - 1)
    assert is_factorised(predict_slide(run, slide, tmp_path / "large.h5ad"))
    ridge = load(trained_runs["ridge"])  # no linear head over a hidden layer: always dense
    assert not is_factorised(predict_slide(ridge, slide, tmp_path / "ridge.h5ad"))
    with pytest.raises(InputError, match="linear head"):
        predict_slide(ridge, slide, tmp_path / "refused.h5ad", output="factorised")
    with pytest.raises(InputError, match="output must be one of"):
        predict_slide(run, slide, tmp_path / "bad.h5ad", output="sparse")
    assert not (tmp_path / "refused.h5ad").exists() and not (tmp_path / "bad.h5ad").exists()


def test_reading_an_unknown_gene_names_it(predictions, split_test_ids):
    path = predictions[0] / f"{split_test_ids[0]}.h5ad"
    with pytest.raises(InputError, match="'NOT_A_GENE'"):
        read_genes(path, ["NOT_A_GENE"])
