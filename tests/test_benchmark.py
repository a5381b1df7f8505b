"""`histoprism benchmark`: every model on one split, timing per child process, reuse, protocols."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.compare import load_eval
from histoprism.models.registry import select_variants
from histoprism.plotting.report import regenerate
from histoprism.workflows.benchmark import benchmark, benchmark_paper

ENCODER = "synthetic"  # embedding folder of the synthetic cohort

MODELS = ["histoprism", "ridge-knn", "ridge"]


@pytest.fixture(scope="module")
def bench(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = benchmark(tiny_cohort, ENCODER, out, models=MODELS, epochs=2, progress=False)
    return out, paths


def test_comparison_files_and_timing(bench):
    out, paths = bench
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert list(table.index) == MODELS  # registry order, reference first
    for col in ("hvg_micro", "gpc_hallmark_micro", "gpc_go_micro", "pooled_pearson"):
        assert table[col].between(-1, 1).all(), col
    assert (table["train_s"] > 0).all() and (table["peak_rss_mb"] > 50).all()
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["reference"] == "histoprism"
    assert {"models", "tests", "win_rate"} <= set(summary)
    assert paths["report"].exists() and "<img" in paths["report"].read_text()


def test_metrics_equal_each_models_own_evaluation(bench):
    out, _ = bench
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    for m in MODELS:
        own = json.loads((out / "eval" / m / keys.EVAL_METRICS).read_text())["headline"]
        assert table.at[m, "hvg_micro"] == pytest.approx(own["hvg_micro"], abs=1e-9)


def test_rerun_reuses_finished_models(bench, tiny_cohort, tmp_path):
    out = shutil.copytree(bench[0], tmp_path / "bench", copy_function=shutil.copy2)
    before = (out / "timing.json").read_text()
    stamp = (out / "runs" / "ridge" / keys.RUN_WEIGHTS).stat().st_mtime_ns
    benchmark(tiny_cohort, ENCODER, out, models=["ridge"], progress=False)
    assert (out / "timing.json").read_text() == before
    assert (out / "runs" / "ridge" / keys.RUN_WEIGHTS).stat().st_mtime_ns == stamp
    assert list(pd.read_csv(out / "comparison.csv", index_col=0).index) == ["ridge"]


def test_unknown_model_is_refused():
    with pytest.raises(InputError, match="unknown model"):
        select_variants(["histoprism", "transformer-xl"])


def test_paper_protocol_over_two_splits(tiny_cohort, tmp_path):
    splits = []
    for k in range(2):  # two splits that swap test and val
        d = tmp_path / f"split{k}"
        shutil.copytree(tiny_cohort / keys.SPLITS_DIR, d)
        if k == 1:
            (d / "val_split.csv").rename(d / "tmp.csv")
            (d / "test_split.csv").rename(d / "val_split.csv")
            (d / "tmp.csv").rename(d / "test_split.csv")
        splits.append(d)
    out = tmp_path / "paper"
    paths = benchmark_paper(
        tiny_cohort, ENCODER, out, models=["ridge"], splits=splits, progress=False
    )
    table = pd.read_csv(paths["csv"], index_col=[0, 1])
    per_split = [load_eval("ridge", out / f"split_{k}" / "eval" / "ridge") for k in range(2)]
    pooled = pd.concat([r.per_slide for r in per_split])
    assert table.loc[("ridge", "all"), "hvg_micro"] == pytest.approx(pooled["hvg"].mean())
    split_means = [r.per_slide.groupby("oncotree_code")["hvg"].mean() for r in per_split]
    code = pooled["oncotree_code"].iloc[0]
    expected = sum(m[code] for m in split_means) / 2
    assert table.loc[("ridge", code), "hvg_macro"] == pytest.approx(expected)


def test_report_regenerates_from_a_benchmark_dir(bench):
    out, paths = bench
    original = paths["report"].read_text()
    regenerated = regenerate(out).read_text()
    for section in ("comparison", "significance", "headline-bars", "per-cancer", "pathway-scatter"):
        assert f'id="{section}"' in regenerated
    assert regenerated.count("<img") == original.count("<img") >= 4
    assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', regenerated))
