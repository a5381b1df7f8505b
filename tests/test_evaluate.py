"""Metrics against hand-computed values, property tests, and one end-to-end evaluation."""

from __future__ import annotations

import json
import logging
import re

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import assert_report_tables
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import pearsonr

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.evaluate import EVALUATOR_VERSION, evaluate, read_hvg_file, score_slide
from histoprism.evaluation.scores import (
    all_genes_scores,
    geneset_scores,
    gpc_table,
    hvg_scores,
    macro,
    micro,
    slide_gene_correlations,
    win_rate,
)
from histoprism.expression.correlation import (
    comoments,
    merge_moments,
    pearson_per_gene,
    pooled_pearson,
)
from histoprism.expression.genes import bench_hvg, gpc_genesets, read_gmt
from histoprism.io.cohort import Cohort, align_by_barcode


def _moments(pred, truth, genes):
    return pd.DataFrame(comoments(pred, truth), index=genes).assign(n_slides=1.0)


# --- Pearson ------------------------------------------------------------------------------------
def test_pearson_hand_computed():
    # column 0: means 2 and 7/3; sum dp*dt = 3, sum dp^2 = 2, sum dt^2 = 14/3 -> r = 3/sqrt(28/3)
    pred = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    truth = np.array([[1.0, 6.0], [2.0, 4.0], [4.0, 2.0]])
    r = pearson_per_gene(pred, truth)
    assert r[0] == pytest.approx(3 / np.sqrt(28 / 3), rel=1e-12)
    assert r[1] == pytest.approx(-1.0, rel=1e-12)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(25, 6)), rng.normal(size=(25, 6))
    truth[:, 0] += 2 * pred[:, 0]
    expected = [pearsonr(pred[:, g], truth[:, g])[0] for g in range(6)]
    np.testing.assert_allclose(pearson_per_gene(pred, truth), expected, rtol=1e-10)


def test_pearson_constant_and_too_few_rows_are_nan():
    rng = np.random.default_rng(1)
    pred, truth = rng.normal(size=(10, 5)), rng.normal(size=(10, 5))
    truth[:, 0] = 0.0  # constant truth (a gene never detected)
    pred[:, 1] = 0.1  # constant prediction: 0.1 is not exact in binary, the mean rounds
    pred[:, 2] = np.float32(2.7)  # float32 constant seen as float64
    pred[1:, 3] = np.nan  # only one finite row
    r = pearson_per_gene(pred, truth)
    assert np.isnan(r[:4]).all()
    assert np.isfinite(r[4])


def test_pearson_leaves_out_nonfinite_rows():
    rng = np.random.default_rng(2)
    pred, truth = rng.normal(size=(12, 1)), rng.normal(size=(12, 1))
    pred_nan = pred.copy()
    pred_nan[[0, 5]] = np.nan
    keep = np.setdiff1d(np.arange(12), [0, 5])
    assert pearson_per_gene(pred_nan, truth)[0] == pytest.approx(
        pearsonr(pred[keep, 0], truth[keep, 0])[0], rel=1e-10
    )


finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    data=arrays(np.float64, (8, 3), elements=finite),
    other=arrays(np.float64, (8, 3), elements=finite),
    scale=st.floats(0.01, 100),
    shift=st.floats(-50, 50),
)
def test_pearson_properties(data, other, scale, shift):
    assume((data.std(axis=0) > 1e-3).all() and (other.std(axis=0) > 1e-3).all())
    r = pearson_per_gene(data, other)
    assert np.all((r >= -1) & (r <= 1))
    np.testing.assert_allclose(pearson_per_gene(other, data), r, atol=1e-12)  # symmetric
    np.testing.assert_allclose(pearson_per_gene(scale * data + shift, other), r, atol=1e-9)


# --- alignment ----------------------------------------------------------------------------------
def _slide(rng, n_spots=12, genes=("A", "B", "C", "D")):
    counts = rng.poisson(3.0, size=(n_spots, len(genes))).astype(np.float32)
    st_ = ad.AnnData(X=sp.csr_matrix(counts))
    st_.obs_names = [f"bc{i}" for i in range(n_spots)]
    st_.var_names = list(genes)
    st_.obsm[keys.OBSM_SPATIAL] = rng.uniform(0, 1000, size=(n_spots, 2))
    noise = rng.normal(0, 0.5, size=counts.shape)
    pred = ad.AnnData(X=(np.log1p(counts) + noise).astype(np.float32))
    pred.obs_names = list(st_.obs_names)
    pred.var_names = list(genes)
    return st_, pred


@settings(max_examples=25, deadline=None)
@given(perm=st.permutations(list(range(12))), seed=st.integers(0, 2**16))
def test_spot_order_of_prediction_does_not_matter(perm, seed):
    st_, pred = _slide(np.random.default_rng(seed))
    base = score_slide(pred, st_)
    shuffled = score_slide(pred[perm].copy(), st_)
    np.testing.assert_allclose(shuffled.r.to_numpy(), base.r.to_numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(shuffled.moments.to_numpy(), base.moments.to_numpy(), rtol=1e-10)


def test_alignment_subset_superset_and_gene_order():
    rng = np.random.default_rng(3)
    st_, pred = _slide(rng)
    # the prediction misses two spots, has a foreign one, genes reversed plus an unmeasured one
    rows = list(range(11, 1, -1))
    x = np.vstack([pred.X[rows][:, [3, 2, 1, 0]], np.ones((1, 4))])
    part = ad.AnnData(X=np.c_[x, rng.normal(size=len(x))].astype(np.float32))
    part.obs_names = [*pred.obs_names[rows], "foreign"]
    part.var_names = ["D", "C", "B", "A", "Z"]
    score = score_slide(part, st_)
    assert (score.n_spots, score.n_spots_matched) == (12, 10)
    truth = np.log1p(st_.X.toarray())[2:]
    pred_x = pred.X[2:]
    for g in "ABCD":
        j = list(st_.var_names).index(g)
        assert score.r[g] == pytest.approx(pearsonr(pred_x[:, j], truth[:, j])[0], rel=1e-6)
    assert np.isnan(score.r["Z"])


def test_alignment_errors():
    with pytest.raises(InputError, match="no barcode"):
        align_by_barcode(["x", "y"], ["a", "b"])
    with pytest.raises(InputError, match="duplicate barcode"):
        align_by_barcode(["a", "a"], ["a", "b"])
    pred_rows, st_rows = align_by_barcode(["c", "a", "z"], ["a", "b", "c"])
    assert pred_rows.tolist() == [1, 0] and st_rows.tolist() == [0, 2]


def test_ensembl_predictions_match_gene_ids_of_symbol_counts():
    st_, pred = _slide(np.random.default_rng(4))
    ids = ["ENSG01", "ENSG02", "ENSG03", "ENSG04"]
    st_.var[keys.VAR_GENE_IDS] = ids
    pred.var_names = ids
    score = score_slide(pred, st_)
    assert score.r.notna().all()


# --- scores from R ------------------------------------------------------------------------------
def test_micro_macro_with_unequal_slides_per_cancer():
    R = pd.DataFrame(
        {"g1": [0.2, 0.4, 0.6, 0.8], "g2": [np.nan] * 4}, index=["a1", "a2", "a3", "b1"]
    )
    cancers = pd.Series({"a1": "IDC", "a2": "IDC", "a3": "IDC", "b1": "COAD"})
    s = hvg_scores(R, cancers, {"IDC": ["g1", "g2", "absent"], "COAD": ["g1"]})
    assert s["hvg"].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert s["n_hvg"].tolist() == [1, 1, 1, 1]
    assert micro(s["hvg"]) == pytest.approx(0.5)  # (0.2 + 0.4 + 0.6 + 0.8) / 4
    assert macro(s["hvg"], cancers) == pytest.approx(0.6)  # (0.4 + 0.8) / 2


def test_nan_left_out_of_means_and_missing_lists():
    R = pd.DataFrame({"g1": [0.5, np.nan], "g2": [np.nan, np.nan], "g3": [0.1, 0.3]})
    R.index = ["s1", "s2"]
    genes = all_genes_scores(R)
    assert genes["all_genes"].tolist() == pytest.approx([0.3, 0.3])
    assert genes["n_genes"].tolist() == [2, 1]
    s = hvg_scores(R, pd.Series({"s1": "X", "s2": "Y"}), {"X": ["g2"], "Y": None})
    assert s["hvg"].isna().all()
    assert micro(s["hvg"]) != micro(s["hvg"])  # NaN, no warning, no crash


def test_gpc_hand_made():
    R = pd.DataFrame(
        {"g1": [0.2, 0.4, 0.9], "g2": [0.4, 0.0, 0.1], "g3": [np.nan, 0.6, 0.5], "g4": [0.1] * 3},
        index=["a1", "a2", "b1"],
    )
    cancers = pd.Series({"a1": "IDC", "a2": "IDC", "b1": "COAD"})
    sets = {"S1": ["g1", "g2"], "S2": ["g3", "g4", "missing"], "S3": ["missing"]}
    scores = geneset_scores(R, sets)
    # slide a1: S1 = (0.2 + 0.4) / 2, S2 = 0.1 (g3 NaN left out); a2: 0.2, 0.35; b1: 0.5, 0.3
    np.testing.assert_allclose(scores["S1"], [0.3, 0.2, 0.5])
    np.testing.assert_allclose(scores["S2"], [0.1, 0.35, 0.3])
    assert scores["S3"].isna().all()
    table = gpc_table(scores, cancers, sets, panel=R.columns, collection="toy").set_index(
        "gene_set"
    )
    assert table.loc["S1", "s_micro"] == pytest.approx((0.3 + 0.2 + 0.5) / 3)
    assert table.loc["S1", "s_macro"] == pytest.approx((0.25 + 0.5) / 2)
    assert table.loc["S2", "s_micro"] == pytest.approx(0.75 / 3)
    assert table["n_genes_in_panel"].tolist() == [2, 2, 0]
    assert np.isnan(table.loc["S3", "s_micro"])


def test_slide_gene_correlations_union():
    R = slide_gene_correlations(
        {"s1": pd.Series({"a": 0.1, "b": 0.2}), "s2": pd.Series({"b": 0.3, "c": 0.4})}
    )
    assert list(R.columns) == ["a", "b", "c"] and list(R.index) == ["s1", "s2"]
    assert np.isnan(R.loc["s2", "a"]) and R.loc["s2", "c"] == 0.4


def test_pooled_pearson_equals_pearson_on_concatenated_spots():
    rng = np.random.default_rng(5)
    p1, t1 = rng.normal(size=(15, 3)), rng.normal(size=(15, 3))
    p2, t2 = rng.normal(2, 1, size=(9, 3)), rng.normal(1, 2, size=(9, 3))
    m1 = _moments(p1, t1, ["a", "b", "c"])
    m2 = _moments(p2[:, :2], t2[:, :2], ["a", "b"])  # c not measured on slide 2
    pooled = pooled_pearson(merge_moments(m1, m2), n_slides=2)
    assert list(pooled.index) == ["a", "b"]  # only genes measured in all slides
    expected = pearson_per_gene(np.vstack([p1, p2])[:, :2], np.vstack([t1, t2])[:, :2])
    np.testing.assert_allclose(pooled.to_numpy(), expected, rtol=1e-10)
    # pooling differs from the mean of per-slide r (that is the other protocol)
    per_slide = (pearson_per_gene(p1, t1)[:2] + pearson_per_gene(p2, t2)[:2]) / 2
    assert not np.allclose(per_slide, expected)


def test_win_rate():
    a = pd.Series({"s1": 0.5, "s2": 0.2, "s3": np.nan, "s4": 0.3, "s5": 0.1})
    b = pd.Series({"s4": 0.1, "s3": 0.1, "s2": 0.3, "s1": 0.4, "s5": 0.1})
    assert win_rate(a, b) == pytest.approx(2 / 4)  # s1, s4 win; s2 loses; s5 tie; s3 ignored
    assert win_rate(b, a) == pytest.approx(1 / 4)
    assert np.isnan(win_rate([np.nan], [0.1]))


def test_read_hvg_file_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"genes": ["X", "Y"]}))
    (tmp_path / "b.json").write_text(json.dumps({"IDC": ["X"], "COAD": {"genes": ["Y"]}}))
    (tmp_path / "c.txt").write_text("gene\nX\nY\n")
    (tmp_path / "d.json").write_text(json.dumps({"IDC": 3}))
    assert read_hvg_file(tmp_path / "a.json", ["IDC", "COAD"]) == {
        "IDC": ["X", "Y"],
        "COAD": ["X", "Y"],
    }
    assert read_hvg_file(tmp_path / "b.json", ["IDC", "COAD", "PRAD"]) == {
        "IDC": ["X"],
        "COAD": ["Y"],
        "PRAD": None,
    }
    assert read_hvg_file(tmp_path / "c.txt", ["IDC"]) == {"IDC": ["X", "Y"]}
    with pytest.raises(InputError):
        read_hvg_file(tmp_path / "d.json", ["IDC"])
    with pytest.raises(InputError, match="not found"):
        read_hvg_file(tmp_path / "nope.txt", ["IDC"])


# --- end to end ---------------------------------------------------------------------------------
HALLMARK = gpc_genesets("hallmark")
IDC_BENCH = bench_hvg("IDC")
_hallmark_genes = list(dict.fromkeys(g for s in HALLMARK.values() for g in s))
GENES = IDC_BENCH[:25] + [g for g in _hallmark_genes if g not in IDC_BENCH][:45]
SLIDES = {  # id: (cancer, split)
    "T1": ("IDC", "train"),
    "T2": ("IDC", "train"),
    "T3": ("COAD", "train"),
    "V1": ("IDC", "val"),
    "A1": ("IDC", "test"),
    "A2": ("IDC", "test"),
    "B1": ("COAD", "test"),
    "C1": ("MESO", "test"),
}
TEST_IDS = ["A1", "A2", "B1", "C1"]
MODEL_INFO = {"version": "0.1.0", "model_id": "toy", "encoder": "stain-texture"}


def _slide_genes(sid: str) -> list[str]:
    if sid == "A2":
        return GENES[:-3]  # three panel genes not measured here: out of the pooled Pearson
    if sid == "B1":
        return [*GENES, "NOTINPANEL"]
    return GENES


def _write_slide(root, sid, cancer, rng) -> None:
    genes = _slide_genes(sid)
    n = int(rng.integers(30, 45))
    spot = rng.normal(size=(n, 1))
    rate = np.exp(rng.uniform(-1, 2, size=len(genes)) + rng.uniform(0, 1, len(genes)) * spot)
    counts = rng.poisson(rate).astype(np.float32)
    if sid == "A1":
        counts[:, 0] = 0  # a gene never detected on this slide: constant, r NaN
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"{sid}-bc{i}" for i in range(n)]
    adata.var_names = genes
    adata.obsm[keys.OBSM_SPATIAL] = rng.integers(0, 5000, size=(n, 2)).astype(np.int64)
    adata.write_h5ad(root / keys.ST_DIR / f"{sid}.h5ad")
    with h5py.File(root / keys.EMBEDDINGS_DIR / "toy" / f"{sid}.h5", "w") as h5:
        h5[keys.H5_FEATURES] = rng.normal(size=(n, 8)).astype(np.float32)
        h5[keys.H5_COORDS] = adata.obsm[keys.OBSM_SPATIAL]
        h5[keys.H5_BARCODES] = np.array(adata.obs_names, dtype="S")


def _write_prediction(pred_dir, st_path, cancer, rng, *, info: bool) -> None:
    st_ = ad.read_h5ad(st_path)
    panel = [*GENES, "FAKE1"]
    x = rng.normal(1.0, 1.0, size=(st_.n_obs, len(panel)))
    cols = pd.Index(st_.var_names).get_indexer(panel)
    have = cols >= 0
    x[:, have] = np.log1p(st_.X.toarray()[:, cols[have]]) + rng.normal(
        0, 0.7, (st_.n_obs, have.sum())
    )
    order = rng.permutation(st_.n_obs)[:-2]  # shuffled, two spots not predicted
    barcodes = [*st_.obs_names[order], "foreign-spot"]
    pred = ad.AnnData(X=np.vstack([x[order], np.ones((1, len(panel)))]).astype(np.float32))
    pred.obs_names, pred.var_names = barcodes, panel
    pred.obs[keys.OBS_CANCER] = cancer
    pred.obsm[keys.OBSM_SPATIAL] = np.zeros((pred.n_obs, 2))
    if info:
        pred.uns[keys.UNS_HISTOPRISM] = {**MODEL_INFO, "units": keys.UNITS_LOG1P}
    pred.write_h5ad(pred_dir / f"{st_path.stem}.h5ad")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny cohort (layout: docs/formats.md), predictions for its test split and a user GMT."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(7)
    for d in (keys.ST_DIR, f"{keys.EMBEDDINGS_DIR}/toy", keys.SPLITS_DIR):
        (root / d).mkdir(parents=True)
    meta = pd.DataFrame({"id": list(SLIDES), "oncotree_code": [c for c, _ in SLIDES.values()]})
    meta.to_csv(root / "metadata.csv", index=False)
    for split in keys.SPLIT_NAMES:
        ids = [i for i, (_, s) in SLIDES.items() if s == split]
        pd.DataFrame({keys.SPLIT_ID: ids}).to_csv(
            root / keys.SPLITS_DIR / f"{split}_split.csv", index=False
        )
    for sid, (cancer, _) in SLIDES.items():
        _write_slide(root, sid, cancer, rng)
    pred_dir = tmp_path_factory.mktemp("pred")
    for k, sid in enumerate(TEST_IDS):
        _write_prediction(
            pred_dir, root / keys.ST_DIR / f"{sid}.h5ad", SLIDES[sid][0], rng, info=k == 0
        )
    gmt = root / "mine.gmt"
    gmt.write_text(
        f"SET_A\tdesc\t{GENES[0]}\t{GENES[30]}\t{GENES[40]}\nSET_B\tdesc\t{GENES[50]}\tZZZ\n"
    )
    return root, pred_dir, gmt


def _reference_r(root, pred_dir) -> pd.DataFrame:
    """r(i, g) by loops and scipy: the independent computation the evaluator must match."""
    rows = {}
    for sid in TEST_IDS:
        st_ = ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad")
        pred = ad.read_h5ad(pred_dir / f"{sid}.h5ad")
        where = {b: i for i, b in enumerate(pred.obs_names)}
        st_rows = [i for i, b in enumerate(st_.obs_names) if b in where]
        pred_rows = [where[st_.obs_names[i]] for i in st_rows]
        truth = np.log1p(st_.X.toarray().astype(np.float64))[st_rows]
        r = {}
        for j, g in enumerate(pred.var_names):
            if g in st_.var_names:
                t = truth[:, list(st_.var_names).index(g)]
                p = pred.X[pred_rows, j].astype(np.float64)
                r[g] = np.nan if t.std() == 0 or p.std() == 0 else pearsonr(p, t)[0]
            else:
                r[g] = np.nan
        rows[sid] = r
    return pd.DataFrame(rows).T


def _reference_train_hvg(root, cancer) -> list[str]:
    ids = [i for i, (c, s) in SLIDES.items() if c == cancer and s == "train"]
    slides = [ad.read_h5ad(root / keys.ST_DIR / f"{i}.h5ad") for i in ids]
    common = [g for g in slides[0].var_names if all(g in s.var_names for s in slides)]
    x = np.vstack([np.log1p(s[:, common].X.toarray().astype(np.float64)) for s in slides])
    var = x.var(axis=0)
    order = sorted(range(len(common)), key=lambda j: (-var[j], common[j]))
    return [common[j] for j in order[:50]]


@pytest.fixture(scope="module")
def evaluated(toy, tmp_path_factory):
    root, pred_dir, gmt = toy
    out = tmp_path_factory.mktemp("eval")
    metrics = evaluate(
        pred_dir, Cohort(root), out, hvg="train", genesets=["gpc", str(gmt)], progress=False
    )
    return metrics, out


def test_evaluate_matches_independent_computation(toy, evaluated):
    root, pred_dir, gmt = toy
    metrics, _ = evaluated
    R = _reference_r(root, pred_dir)
    cancers = pd.Series({i: SLIDES[i][0] for i in TEST_IDS})
    hvg = {c: _reference_train_hvg(root, c) for c in ("IDC", "COAD")}
    slide_hvg = pd.Series(
        {i: np.nanmean(R.loc[i, hvg[c]]) if c in hvg else np.nan for i, c in cancers.items()}
    )
    head = metrics["headline"]
    # names defined once; a user's own GMT adds its gpc_<name>_macro/micro pair
    extra = {"n_genes_pooled", "gpc_mine_macro", "gpc_mine_micro"}
    assert set(head) == set(keys.HEADLINE_METRICS) | extra
    assert metrics["evaluator_version"] == EVALUATOR_VERSION and metrics["n_slides"] == 4
    assert metrics["hvg_genes"]["IDC"] == hvg["IDC"] and metrics["hvg_missing"] == ["MESO"]
    assert head["hvg_micro"] == pytest.approx(slide_hvg.mean(), rel=1e-9)
    idc = slide_hvg[["A1", "A2"]].mean()
    assert head["hvg_macro"] == pytest.approx((idc + slide_hvg["B1"]) / 2, rel=1e-9)
    all_genes = R.mean(axis=1)
    assert head["all_genes_micro"] == pytest.approx(all_genes.mean(), rel=1e-9)
    per_type = [all_genes[["A1", "A2"]].mean(), all_genes["B1"], all_genes["C1"]]
    assert head["all_genes_macro"] == pytest.approx(np.mean(per_type), rel=1e-9)
    assert metrics["per_cancer"]["IDC"]["n_slides"] == 2
    assert metrics["per_cancer"]["MESO"]["hvg"] is None
    for name, sets in (("hallmark", HALLMARK), ("mine", read_gmt(gmt))):
        s_m = [
            np.nanmean(
                [np.nanmean(R.loc[i, [g for g in genes if g in R.columns]]) for i in TEST_IDS]
            )
            for genes in sets.values()
            if any(g in R.columns for g in genes)
        ]
        assert head[f"gpc_{name}_micro"] == pytest.approx(np.mean(s_m), rel=1e-9)
    assert "gpc_go_micro" in head and "gpc_go_macro" in head


def test_evaluate_pooled_pearson(toy, evaluated):
    root, pred_dir, _ = toy
    metrics, out = evaluated
    pooled_genes = GENES[:-3]  # measured in all four test slides
    preds, truths = [], []
    for sid in TEST_IDS:
        st_ = ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad")
        pred = ad.read_h5ad(pred_dir / f"{sid}.h5ad")
        common = [b for b in st_.obs_names if b in set(pred.obs_names)]
        truths.append(np.log1p(st_[common, pooled_genes].X.toarray().astype(np.float64)))
        preds.append(pred[common, pooled_genes].X.astype(np.float64))
    P, T = np.vstack(preds), np.vstack(truths)
    expected = [pearsonr(P[:, j], T[:, j])[0] for j in range(len(pooled_genes))]
    assert metrics["headline"]["pooled_pearson"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert metrics["headline"]["n_genes_pooled"] == len(pooled_genes)
    per_gene = pd.read_csv(out / keys.EVAL_PER_GENE).set_index("gene")
    np.testing.assert_allclose(per_gene.loc[pooled_genes, "pooled_r"], expected, rtol=1e-9)
    assert per_gene.loc[GENES[-1], "pooled_r"] != per_gene.loc[GENES[-1], "pooled_r"]  # NaN


def test_evaluate_files(toy, evaluated):
    root = toy[0]
    metrics, out = evaluated
    assert json.loads((out / keys.EVAL_METRICS).read_text()) == metrics
    assert metrics["model"] == {**MODEL_INFO, "units": keys.UNITS_LOG1P}
    per_slide = pd.read_csv(out / keys.EVAL_PER_SLIDE, dtype={keys.SPLIT_ID: str})
    assert per_slide[keys.SPLIT_ID].tolist() == TEST_IDS
    n = {sid: ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad").n_obs for sid in TEST_IDS}
    assert per_slide["n_spots"].tolist() == [n[s] for s in TEST_IDS]
    assert per_slide["n_spots_matched"].tolist() == [n[s] - 2 for s in TEST_IDS]
    assert {"hvg", "all_genes", "n_genes", "gpc_hallmark", "gpc_go", "gpc_mine"} <= set(per_slide)
    pathways = pd.read_csv(out / keys.EVAL_PER_PATHWAY)
    assert pathways.groupby("collection").size().to_dict() == {"go": 87, "hallmark": 50, "mine": 2}
    mine = pathways[pathways["collection"] == "mine"].set_index("gene_set")
    assert mine["n_genes_in_panel"].to_dict() == {"SET_A": 3, "SET_B": 1}
    assert not list(out.glob(".*partial*"))  # atomic writes left nothing behind


def test_evaluate_report(evaluated):
    metrics, out = evaluated
    page = (out / keys.EVAL_REPORT).read_text()
    assert_report_tables(page, collections=("hallmark", "go", "mine"))
    # per-cancer bars, 3 collections, per-gene histogram, 3 spatial examples (genes, pathways)
    assert page.count("<img ") == 1 + 3 + 1 + 3 + 3
    assert 'id="pathway-maps"' in page and "HALLMARK_" in page
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(v.startswith("data:image/png;base64,") for v in links)
    assert "http" not in re.sub(r'src="data:[^"]*"', "", page)


def test_evaluate_bench_hvg_and_samples(toy, tmp_path):
    root, pred_dir, _ = toy
    metrics = evaluate(
        pred_dir, Cohort(root), tmp_path, hvg="bench", samples=["A1", "C1"], progress=False
    )
    assert metrics["n_slides"] == 2 and metrics["hvg_missing"] == ["MESO"]
    R = _reference_r(root, pred_dir)
    expected = np.nanmean(R.loc["A1", [g for g in IDC_BENCH if g in R.columns]])
    per_slide = pd.read_csv(tmp_path / keys.EVAL_PER_SLIDE, index_col=0)
    assert per_slide.loc["A1", "hvg"] == pytest.approx(expected, rel=1e-9)
    assert per_slide.loc["A1", "n_hvg"] == 24  # 25 bench genes in the panel, one constant on A1
    assert metrics["headline"]["hvg_micro"] == pytest.approx(expected, rel=1e-9)


def test_evaluate_samples_follow_the_rule_of_predict(toy, tmp_path):
    """hp.evaluate(samples=...): all = every predicted slide, a split name, or listed ids."""
    from histoprism import verbs

    root, pred_dir, _ = toy
    every = verbs.evaluate(pred_dir, root, tmp_path / "all", hvg="bench", samples="all")
    assert every["n_slides"] == len(TEST_IDS)
    test = verbs.evaluate(pred_dir, root, tmp_path / "test", hvg="bench", samples="test")
    assert test["headline"] == every["headline"]  # the predictions are the test split's
    one = verbs.evaluate(pred_dir, root, tmp_path / "one", hvg="bench", samples=TEST_IDS[0])
    assert one["n_slides"] == 1
    with pytest.raises(InputError, match="not in metadata: NOPE"):
        verbs.evaluate(pred_dir, root, tmp_path / "x", hvg="bench", samples="NOPE")


def test_evaluate_bad_input(toy, tmp_path):
    root, pred_dir, _ = toy
    with pytest.raises(InputError, match=r"V1\.h5ad"):
        evaluate(pred_dir, Cohort(root), tmp_path, split="val")
    with pytest.raises(InputError, match="HVG list not found"):
        evaluate(pred_dir, Cohort(root), tmp_path, hvg=str(tmp_path / "nope.json"))
    assert not (tmp_path / keys.EVAL_METRICS).exists()


# --- a user's GMT alone: CLI summary, metrics, report, compare ------------------------------------
def test_custom_gmt_alone_end_to_end(toy, tmp_path, caplog):
    """``evaluate --genesets mine.gmt`` without the bundled sets: the summary names the
    collection, metrics.json and the report carry it, and compare/report read the directory
    that has neither gpc_hallmark nor gpc_go."""
    from typer.testing import CliRunner

    from histoprism.cli import app
    from histoprism.evaluation.compare import load_eval, write_comparison

    root, pred_dir, _ = toy
    gmt = tmp_path / "my_sets.gmt"  # a repeated gene counts once; ZZZ is no panel gene
    gmt.write_text(
        f"UP\td\t{GENES[0]}\t{GENES[30]}\t{GENES[40]}\t{GENES[30]}\n"
        f"DOWN\td\t{GENES[50]}\t{GENES[60]}\nNONE\td\tZZZ\n"
    )
    out = tmp_path / "eval"
    args = ["evaluate", "--pred", pred_dir, "--data", root, "--out", out, "--genesets", gmt]
    args += ["--hvg", "bench", "--samples", "A1"]  # one slide, no training slide read: fast
    with caplog.at_level(logging.WARNING, logger="histoprism.evaluation.evaluate"):
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1, summary
    assert re.search(r"\), GPC my_sets -?\d\.\d{3}, all genes ", summary[0]), summary
    assert "Hallmark" not in summary[0] and "GO " not in summary[0]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "my_sets.gmt: 1 of 3 gene sets have no predicted gene" in warned[0]

    metrics = json.loads((out / keys.EVAL_METRICS).read_text())
    assert metrics["gene_sets"] == {"my_sets": 3}
    head = metrics["headline"]
    assert np.isfinite(head["gpc_my_sets_micro"]) and np.isfinite(head["gpc_my_sets_macro"])
    assert not [k for k in head if k.startswith(("gpc_hallmark", "gpc_go"))]
    pathways = pd.read_csv(out / keys.EVAL_PER_PATHWAY).set_index("gene_set")
    assert pathways["n_genes_in_panel"].to_dict() == {"UP": 3, "DOWN": 2, "NONE": 0}
    page = (out / keys.EVAL_REPORT).read_text()
    assert_report_tables(page, collections=("my_sets",))
    assert "my_sets pathway scores" in page  # the examples' maps use the only collection

    # another model's directory: the same files
    other = tmp_path / "eval_b"
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    results = [load_eval("a", out), load_eval("b", other)]
    paths = write_comparison(tmp_path / "cmp", results, n_boot=100)
    doc = json.loads(paths["json"].read_text())
    assert [t["metric"] for t in doc["tests"]] == ["hvg", "gpc_my_sets", "all_genes"]
    assert set(doc["win_rate"]) == {"my_sets"}
    assert doc["models"][0]["gpc_my_sets_micro"] == pytest.approx(head["gpc_my_sets_micro"])


def test_gmt_without_predicted_genes_is_refused_before_any_output(toy, tmp_path):
    root, pred_dir, _ = toy
    gmt = tmp_path / "elsewhere.gmt"
    gmt.write_text("A\td\tX1\tX2\nB\td\tX3\n")
    with pytest.raises(InputError, match=r"elsewhere\.gmt: no gene set has a gene among the 71"):
        evaluate(pred_dir, Cohort(root), tmp_path / "ev", genesets=[str(gmt)], progress=False)
    assert not (tmp_path / "ev").exists()


# --- the report of real predictions: tissue under the maps, maps kept, slide facts per slide ------
def _write_coded_image(root, sid: str) -> np.ndarray:
    """wsis/{id}.png covering the slide's spots, each pixel telling where it lies: red 200 left
    of the spots' median x (60 right of it), green 80 above their median y (220 below). Returns
    the medians (x, y), level-0 px."""
    from PIL import Image

    xy = ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad").obsm[keys.OBSM_SPATIAL]
    mx, my = (int(v) for v in np.median(xy, axis=0))
    w, h = (int(v) + 50 for v in xy.max(0))
    rgb = np.full((h, w, 3), 160, np.uint8)
    rgb[:, :mx, 0], rgb[:, mx:, 0] = 200, 60
    rgb[:my, :, 1], rgb[my:, :, 1] = 80, 220
    (root / keys.WSI_DIR).mkdir(exist_ok=True)
    Image.fromarray(rgb).save(root / keys.WSI_DIR / f"{sid}.png")
    return np.array([mx, my], dtype=np.float64)


def _spatial_figures(page: str) -> int:
    return page[page.index('id="spatial-maps"') :].count("<figure>")


def test_report_of_predictions_tissue_kept_maps_and_slide_facts(
    trained_runs, cohort_copy, tmp_path
):
    from histoprism import __version__
    from histoprism.inference.predict import predict
    from histoprism.io.evaldir import load_examples
    from histoprism.plotting.figures import spatial_maps
    from histoprism.plotting.report import regenerate

    cc = cohort_copy()
    cohort = Cohort(cc.root)
    ids = cohort.ids("test")
    assert len(ids) >= 2
    areas = {i: np.prod(ad.read_h5ad(cc.st_path(i)).obsm[keys.OBSM_SPATIAL].max(0)) for i in ids}
    sid = min(areas, key=areas.get)  # the smallest image to write
    other = next(i for i in ids if i != sid)
    medians = _write_coded_image(cc.root, sid)
    pred_dir, out = tmp_path / "pred", tmp_path / "eval"
    predict(trained_runs["histoprism"], cc.root, "synthetic", pred_dir, progress=False)
    changed = ad.read_h5ad(pred_dir / f"{other}.h5ad")  # as if predicted by another version
    changed.uns[keys.UNS_HISTOPRISM]["version"] = "0.0.0+other"
    changed.write_h5ad(pred_dir / f"{other}.h5ad")
    metrics = evaluate(pred_dir, cohort, out, progress=False)

    # the run's facts in "model", the slides' in per_slide.csv
    model = metrics["model"]
    assert not set(keys.UNS_SLIDE_FACTS) & set(model)
    assert model["model_id"] == trained_runs["histoprism"].name and model["output"] == "dense"
    assert model["model"] == "histoprism" and model["units"] == keys.UNITS_LOG1P
    assert sorted(model["version"]) == sorted([__version__, "0.0.0+other"])  # differs: both
    per_slide = pd.read_csv(out / keys.EVAL_PER_SLIDE, index_col=0, keep_default_na=False)
    for i in ids:
        assert per_slide.loc[i, "cancer_requested"] == cohort.cancer(i)
        assert per_slide.loc[i, "cancer_used"] == cohort.cancer(i)  # a code the model knows
        size = cohort.pixel_size_um(i)
        assert per_slide.loc[i, "pixel_size_um"] == (pytest.approx(size) if size else "")
    page = (out / keys.EVAL_REPORT).read_text()
    run_table = re.search(r'<table id="overview".*?</table>', page, re.S).group(0)
    assert "model: model_id" in run_table
    assert not [k for k in (*keys.UNS_SLIDE_FACTS, "cancer_used") if k in run_table]
    per_slide_table = re.search(r'<table[^>]*id="per-slide".*?</table>', page, re.S).group(0)
    assert all(k in per_slide_table for k in ("cancer_requested", "cancer_used", "pixel_size_um"))

    # the maps are kept; the slide with an image has the tissue under its spots, the other none
    examples = {ex.sample_id: ex for ex in load_examples(out / keys.EVAL_SPATIAL_MAPS)}
    assert set(examples) == {sid, other}
    assert examples[other].image is None
    ex = examples[sid]
    x0, x1, y0, y1 = ex.image_extent
    h, w = ex.image.shape[:2]
    checked = 0
    for x, y in ex.coords:
        if np.abs(np.array([x, y]) - medians).min() < 60:  # too near a colour edge
            continue
        row, col = int((y - y0) / (y1 - y0) * h), int((x - x0) / (x1 - x0) * w)
        expected = (200 if x < medians[0] else 60, 80 if y < medians[1] else 220, 160)
        np.testing.assert_allclose(ex.image[row, col], expected, atol=2)
        checked += 1
    assert checked > len(ex.coords) // 2
    maps = [a for a in spatial_maps(ex).axes if a.get_label() != "<colorbar>"]
    assert maps and all(len(a.images) == 1 for a in maps)

    # `histoprism report EVAL` draws every map evaluate drew
    n_maps = _spatial_figures(page)
    assert n_maps == 2 * len(examples)  # gene maps and pathway maps of each slide
    (out / keys.EVAL_REPORT).unlink()
    again = regenerate(out).read_text()
    assert _spatial_figures(again) == n_maps
    assert abs(len(again) - len(page)) <= 0.01 * len(page)
