"""Model comparison: statistics against hand-computed values, tables, and the written files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.compare import (
    COMPARE_JSON,
    COMPARE_MD,
    COMPARE_TABLE,
    HEADLINE,
    EvalResult,
    comparison_table,
    load_eval,
    paired_bootstrap,
    pairwise_tests,
    per_cancer_table,
    sign_test,
    win_rate_matrix,
    write_comparison,
)

N_BOOT = 2000  # enough for stable 95% CIs in these small tests, fast


def _result(name: str, *, shift: float, seed: int = 0, n_slides: int = 40) -> EvalResult:
    """A hand-made evaluation: per-slide scores = a shared base + ``shift`` + small noise."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).normal(0.3, 0.1, size=n_slides)  # shared across models
    ids = [f"S{i:02d}" for i in range(n_slides)]
    cancers = np.where(np.arange(n_slides) % 2, "IDC", "CCRCC")
    noise = lambda: rng.normal(0, 0.01, size=n_slides)  # noqa: E731
    per_slide = pd.DataFrame(
        {
            keys.META_CANCER: cancers,
            "hvg": base + shift + noise(),
            "all_genes": base / 2 + shift + noise(),
            "gpc_hallmark": base + shift + noise(),
            "gpc_go": base + shift + noise(),
        },
        index=pd.Index(ids, name=keys.SPLIT_ID),
    )
    sets = np.random.default_rng(7).normal(0.2, 0.1, size=10)  # shared across models
    per_pathway = pd.DataFrame(
        {
            "collection": ["hallmark"] * 5 + ["go"] * 5,
            "gene_set": [f"H{i}" for i in range(5)] + [f"G{i}" for i in range(5)],
            "n_genes_in_panel": 20,
            "s_micro": sets + shift,
            "s_macro": sets + shift,
        }
    )
    headline = {k: float(per_slide["hvg"].mean()) + i for i, k in enumerate(HEADLINE)}
    headline["gpc_go_macro"] = None  # NaN as stored in metrics.json
    per_cancer = {
        c: {"n_slides": 20, "hvg": 0.1 + shift, "gpc_hallmark": 0.2, "all_genes": 0.05}
        for c in ("CCRCC", "IDC")
    }
    return EvalResult(
        name, {"headline": headline, "per_cancer": per_cancer}, per_slide, per_pathway
    )


# --- paired bootstrap ---------------------------------------------------------------------------
def test_bootstrap_better_model_excludes_zero():
    a, b = _result("a", shift=0.05, seed=1), _result("b", shift=0.0, seed=2)
    out = paired_bootstrap(a.per_slide["hvg"], b.per_slide["hvg"], n_boot=N_BOOT, seed=0)
    assert out["n"] == 40
    assert out["ci_low"] < 0.05 < out["ci_high"]  # contains the true difference
    assert out["ci_low"] > 0  # excludes 0
    assert out["diff"] == pytest.approx((a.per_slide["hvg"] - b.per_slide["hvg"]).mean())


def test_bootstrap_identical_models_include_zero():
    a, b = _result("a", shift=0.0, seed=1), _result("b", shift=0.0, seed=2)
    out = paired_bootstrap(a.per_slide["hvg"], b.per_slide["hvg"], n_boot=N_BOOT, seed=0)
    assert out["ci_low"] < 0 < out["ci_high"]


def test_bootstrap_deterministic_and_seeded():
    a, b = _result("a", shift=0.01, seed=1), _result("b", shift=0.0, seed=2)
    runs = [
        paired_bootstrap(a.per_slide.hvg, b.per_slide.hvg, n_boot=500, seed=s) for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["ci_low"] != runs[2]["ci_low"]


def test_bootstrap_aligns_ids_and_drops_nan():
    a = pd.Series([1.0, 2.0, np.nan, 4.0], index=["s1", "s2", "s3", "s4"])
    b = pd.Series([0.0, 1.0, 1.0], index=["s4", "s2", "s3"])  # s1 only in a, s3 NaN in a
    out = paired_bootstrap(a, b, n_boot=100)
    assert out["n"] == 2
    assert out["diff"] == pytest.approx(((2 - 1) + (4 - 0)) / 2)
    assert 1.0 <= out["ci_low"] <= out["ci_high"] <= 4.0
    empty = paired_bootstrap(a, pd.Series(dtype=float), n_boot=100)
    assert empty["n"] == 0 and math.isnan(empty["diff"])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=30),
    st.integers(0, 2**32 - 1),
)
def test_bootstrap_self_is_zero(values, seed):
    a = pd.Series(values, index=[f"s{i}" for i in range(len(values))])
    out = paired_bootstrap(a, a.copy(), n_boot=200, seed=seed)
    assert (out["diff"], out["ci_low"], out["ci_high"], out["n"]) == (0.0, 0.0, 0.0, len(values))


# --- sign test ----------------------------------------------------------------------------------
def test_sign_test_by_hand():
    a = pd.Series([0.5, 0.4, 0.3, 0.2, 0.1, 0.7, np.nan], index=list("abcdefg"))
    b = pd.Series([0.1, 0.1, 0.1, 0.2, 0.3, 0.7, 0.1, 0.9], index=list("abcdefgh"))
    out = sign_test(a, b)  # wins a, b, c; loss e; ties d, f; g NaN; h only in b
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 2)
    assert out["p"] == pytest.approx(binomtest(3, 4, 0.5).pvalue)
    assert out["p"] == pytest.approx(2 * 5 / 16)  # P(X >= 3) + P(X <= 1), X ~ Bin(4, 1/2)
    assert out["win_rate"] == pytest.approx(3 / 6)


def test_sign_test_multiindex_and_all_ties():
    idx = pd.MultiIndex.from_tuples([("hallmark", "H0"), ("go", "G0")])
    out = sign_test(pd.Series([1.0, 1.0], index=idx), pd.Series([1.0, 1.0], index=idx))
    assert (out["wins"], out["losses"], out["ties"]) == (0, 0, 2)
    assert math.isnan(out["p"]) and out["win_rate"] == 0.0


# --- tables -------------------------------------------------------------------------------------
def test_win_rate_matrix_values_and_complement():
    a, b, c = (_result(n, shift=s) for n, s in (("a", 0.1), ("b", 0.0), ("c", 0.0)))
    c.per_pathway.loc[c.per_pathway.gene_set == "H0", "s_micro"] += 1.0  # c wins H0 vs a and b
    W = win_rate_matrix([a, b, c], collection="hallmark")
    assert list(W.index) == list(W.columns) == ["a", "b", "c"]
    assert np.isnan(np.diag(W.to_numpy())).all()
    assert W.loc["a", "b"] == 1.0 and W.loc["b", "a"] == 0.0
    assert W.loc["a", "c"] == pytest.approx(4 / 5) and W.loc["c", "a"] == pytest.approx(1 / 5)
    assert W.loc["c", "b"] == pytest.approx(1 / 5) and W.loc["b", "c"] == 0.0  # 4 ties
    ties = {("b", "c"): 4 / 5}
    for x in "abc":
        for y in "abc":
            if x < y:
                assert W.loc[x, y] + W.loc[y, x] + ties.get((x, y), 0.0) == pytest.approx(1.0)


def test_comparison_table_columns_and_values():
    a, b = _result("a", shift=0.1), _result("b", shift=0.0)
    table = comparison_table([a, b])
    assert list(table.columns) == list(HEADLINE) and list(table.index) == ["a", "b"]
    assert table.loc["a", "hvg_micro"] == pytest.approx(a.metrics["headline"]["hvg_micro"])
    assert np.isnan(table.loc["b", "gpc_go_macro"])
    timed = comparison_table([a, b], timing={"a": {"train_s": 12.0, "peak_rss_mb": 300}})
    assert list(timed.columns[-3:]) == ["train_s", "predict_s", "peak_rss_mb"]
    assert timed.loc["a", "train_s"] == 12.0 and np.isnan(timed.loc["b", "train_s"])
    with pytest.raises(InputError, match="two models named"):
        comparison_table([a, a])


def test_per_cancer_table_long():
    table = per_cancer_table([_result("a", shift=0.1), _result("b", shift=0.0)])
    assert list(table.columns[:6]) == [
        "model",
        keys.META_CANCER,
        "n_slides",
        "hvg",
        "all_genes",
        "gpc_hallmark",
    ]
    assert len(table) == 4
    row = table[(table.model == "a") & (table[keys.META_CANCER] == "IDC")].iloc[0]
    assert row["hvg"] == pytest.approx(0.2) and row["n_slides"] == 20


def test_pairwise_tests_rows():
    results = [_result("ref", shift=0.05, seed=1), _result("b", shift=0.0, seed=2)]
    tests = pairwise_tests(results, reference="ref", n_boot=N_BOOT)
    assert list(tests.metric) == ["hvg", "gpc_hallmark", "gpc_go", "all_genes"]
    assert (tests.model == "b").all() and (tests.ci_low > 0).all()
    hall = tests.set_index("metric").loc["gpc_hallmark"]
    assert (hall.wins, hall.losses) == (5, 0)
    assert hall.p == pytest.approx(binomtest(5, 5).pvalue)
    assert tests.set_index("metric").loc["hvg", ["wins", "p"]].isna().all()
    with pytest.raises(InputError, match="reference"):
        pairwise_tests(results, reference="nope")


# --- files --------------------------------------------------------------------------------------
def test_write_comparison_files(tmp_path):
    results = [_result(n, shift=s, seed=i) for i, (n, s) in enumerate([("hp", 0.05), ("mlp", 0)])]
    paths = write_comparison(tmp_path / "cmp", results, timing={"hp": {"train_s": 5.0}}, n_boot=200)
    assert {p.name for p in paths.values()} == {COMPARE_TABLE, COMPARE_JSON, COMPARE_MD}
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == sorted(
        [COMPARE_TABLE, COMPARE_JSON, COMPARE_MD]
    )  # no partial files left
    doc = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c))
    assert doc["reference"] == "hp"
    assert [m["model"] for m in doc["models"]] == ["hp", "mlp"]
    assert doc["models"][0]["gpc_go_macro"] is None
    assert set(doc["win_rate"]) == {"hallmark", "go"}
    assert doc["win_rate"]["go"]["hp"]["mlp"] == 1.0
    assert len(doc["tests"]) == 4 and len(doc["per_cancer"]) == 4
    md = paths["md"].read_text()
    assert "hp" in md and "mlp" in md and "95%" in md and "—" in md and "nan" not in md.lower()
    assert pd.read_csv(paths["csv"], index_col="model").shape == (2, len(HEADLINE) + 3)


def test_load_eval_round_trip(tmp_path):
    r = _result("a", shift=0.0)
    (tmp_path / keys.EVAL_METRICS).write_text(json.dumps(r.metrics))
    r.per_slide.to_csv(tmp_path / keys.EVAL_PER_SLIDE)
    r.per_pathway.to_csv(tmp_path / keys.EVAL_PER_PATHWAY, index=False)
    back = load_eval("a", tmp_path)
    pd.testing.assert_frame_equal(back.per_slide, r.per_slide)
    pd.testing.assert_frame_equal(back.per_pathway, r.per_pathway)
    (tmp_path / keys.EVAL_PER_PATHWAY).unlink()
    with pytest.raises(InputError, match=keys.EVAL_PER_PATHWAY) as err:
        load_eval("a", tmp_path)
    assert err.value.path == tmp_path
    with pytest.raises(InputError, match="not found"):
        load_eval("a", tmp_path / "missing")
