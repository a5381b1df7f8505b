"""Plots return figures drawn from the EVAL tables; the report is one self-contained HTML page."""

from __future__ import annotations

import json
import re

import anndata as ad
import matplotlib.pyplot as plt  # only to check that no pyplot figure is left open
import numpy as np
import pandas as pd
import pytest
from conftest import assert_report_tables
from matplotlib.figure import Figure

from histoprism import keys
from histoprism.errors import InputError
from histoprism.evaluate import spatial_example
from histoprism.pathways import pathway_scores
from histoprism.report import (
    PathwayMaps,
    SpatialExample,
    plot_gene_r_hist,
    plot_model_bars,
    plot_models_per_cancer,
    plot_pathway_maps,
    plot_pathway_scatter,
    plot_pathways,
    plot_per_cancer,
    plot_spatial_example,
    regenerate,
    write_benchmark_report,
    write_report,
)

PER_CANCER = pd.DataFrame(
    {
        "n_slides": [2, 1],
        "hvg": [0.3, np.nan],
        "all_genes": [0.1, 0.2],
        "gpc_hallmark": [0.2, 0.25],
    },
    index=["IDC", "MESO"],
)
PER_PATHWAY = pd.DataFrame(
    {
        "collection": ["hallmark"] * 3 + ["go"] * 2,
        "gene_set": ["HALLMARK_A", "HALLMARK_B", "HALLMARK_<b>", "GOBP_X", "GOBP_Y"],
        "n_genes_in_panel": [10, 5, 0, 7, 3],
        "s_micro": [0.3, 0.1, np.nan, 0.2, -0.05],
        "s_macro": [0.25, 0.12, np.nan, 0.18, -0.02],
    }
)
PER_GENE = pd.DataFrame(
    {
        "gene": ["A", "B", "NA"],
        "mean_r": [0.5, -0.1, 0.2],
        "n_slides": [3, 3, 1],
        "pooled_r": [0.6, np.nan, 0.1],
    }
)


def _example(n: int = 40) -> SpatialExample:
    rng = np.random.default_rng(0)
    measured = rng.poisson(2.0, size=(n, 2)).astype(float)
    return SpatialExample(
        sample_id="S1",
        cancer="IDC",
        coords=rng.uniform(0, 1000, size=(n, 2)),
        genes=["G1", "G2"],
        measured=np.log1p(measured),
        predicted=np.log1p(measured) * 0.5 + 0.3,
        r=np.array([0.9, 0.4]),
    )


def test_plots_return_labelled_figures_without_pyplot():
    figs = [
        plot_per_cancer(PER_CANCER),
        plot_pathways(PER_PATHWAY, collection="hallmark"),
        plot_gene_r_hist(PER_GENE),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert fig.axes[0].get_title() and fig.axes[0].get_xlabel()
    assert "Pearson r" in figs[0].axes[0].get_ylabel()
    assert "Pearson r" in figs[2].axes[0].get_xlabel()
    assert plt.get_fignums() == []  # nothing registered with pyplot, nothing to leak


def test_plot_pathways_ranks_scored_sets():
    fig = plot_pathways(PER_PATHWAY, collection="hallmark")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["B", "A"]  # ascending from the bottom: best on top, NaN set left out
    assert "1 sets without a scored gene" in ax.get_title()


def test_plots_draw_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_gene_r_hist(PER_GENE, ax=ax) is fig
    assert len(ax.patches) > 0
    fig2 = Figure()
    axes = fig2.subplots(2, 2)
    assert plot_spatial_example(_example(), axes=axes) is fig2


def test_spatial_maps_share_colour_scale_per_gene():
    fig = plot_spatial_example(_example())
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(maps) == 4
    for row in range(2):
        measured, predicted = maps[2 * row], maps[2 * row + 1]
        assert measured.collections[0].get_clim() == predicted.collections[0].get_clim()
        assert measured.yaxis_inverted()
        assert "r = " in predicted.get_title()
    assert maps[0].collections[0].get_clim() != maps[2].collections[0].get_clim()


def _eval_dir(tmp_path):
    metrics = {
        "evaluator_version": "1.0",
        "n_slides": 3,
        "split": "test",
        "hvg_source": "train",
        "hvg_missing": ["MESO"],
        "headline": {
            "hvg_micro": 0.3,
            "hvg_macro": None,
            "gpc_hallmark_micro": 0.2,
            "pooled_pearson": 0.4,
        },
        "per_cancer": {
            "IDC": {"n_slides": 2, "hvg": 0.3, "all_genes": 0.1, "gpc_hallmark": 0.2},
            "MESO": {"n_slides": 1, "hvg": None, "all_genes": 0.2, "gpc_hallmark": 0.25},
        },
        "model": {"model_id": "toy", "encoder": "stain-texture"},
    }
    (tmp_path / keys.EVAL_METRICS).write_text(json.dumps(metrics))
    per_slide = pd.DataFrame(
        {
            keys.SPLIT_ID: ["a", "b", "c"],
            "oncotree_code": ["IDC", "IDC", "MESO"],
            "hvg": [0.2, 0.4, np.nan],
        }
    )
    per_slide.to_csv(tmp_path / keys.EVAL_PER_SLIDE, index=False)
    PER_GENE.to_csv(tmp_path / keys.EVAL_PER_GENE, index=False)
    PER_PATHWAY.to_csv(tmp_path / keys.EVAL_PER_PATHWAY, index=False)
    return tmp_path


def test_write_report_is_self_contained(tmp_path):
    path = write_report(_eval_dir(tmp_path), examples=[_example()])
    assert path == tmp_path / keys.EVAL_REPORT
    page = path.read_text()
    assert_report_tables(page)
    assert page.count("<img ") == 1 + 2 + 1 + 1  # cancers, 2 collections, genes, 1 example
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(v.startswith("data:image/png;base64,") for v in links)
    assert "http" not in re.sub(r'src="data:[^"]*"', "", page)
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_write_report_content(tmp_path):
    page = write_report(_eval_dir(tmp_path)).read_text()
    assert "HALLMARK_&lt;b&gt;" in page and "HALLMARK_<b>" not in page  # names escaped
    assert "—" in page  # missing values shown as a dash, not "nan" / "None"
    assert ">None<" not in page and ">nan<" not in page
    assert "mean over cancer types" in page  # headline rows explain themselves
    assert "stain-texture" in page  # model info
    assert "No spatial maps" in page


def test_write_report_missing_tables(tmp_path):
    with pytest.raises(InputError, match="run evaluate first"):
        write_report(tmp_path)


# --- pathway maps --------------------------------------------------------------------------------
def _z(v):
    v = np.asarray(v, dtype=float)
    return np.zeros_like(v) if v.std() == 0 else (v - v.mean()) / v.std()


def test_pathway_scores_by_hand():
    X = np.array([[0.0, 1.0, 5.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0], [5.0, 1.0, 0.0]])
    sets = {"S1": ["a", "b"], "S2": ["a", "c", "not-in-panel"], "S3": ["zz"]}
    scores, n = pathway_scores(X, ["a", "b", "c"], sets)
    assert n.tolist() == [2, 2, 0]
    np.testing.assert_allclose(scores[:, 0], (_z(X[:, 0]) + 0.0) / 2)  # constant b counts as 0
    np.testing.assert_allclose(scores[:, 1], (_z(X[:, 0]) + _z(X[:, 2])) / 2)
    assert np.isnan(scores[:, 2]).all()


def test_spatial_example_pathway_maps_by_hand():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(12, 4)).astype(float)  # (N, G) raw counts
    genes = ["g1", "g2", "g3", "g4"]
    spots = [f"s{i}" for i in range(12)]
    st = ad.AnnData(counts, obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))
    st.obsm[keys.OBSM_SPATIAL] = rng.uniform(0, 100, size=(12, 2))
    X = np.log1p(counts)[::-1] + rng.normal(0, 0.3, size=(12, 4))  # prediction, spots reversed
    X[:, 2:] = np.log1p(counts[::-1, 2:])  # g3, g4 predicted exactly
    pred = ad.AnnData(X, obs=pd.DataFrame(index=spots[::-1]), var=pd.DataFrame(index=genes))
    r = pd.Series([0.5, 0.4, 0.3, 1.0], index=genes)
    sets = {"A": ["g1", "g2"], "B": ["g4", "g3", "g9"], "C": ["g1"]}  # C: too small to show
    ex = spatial_example(pred, st, r, sample_id="x", cancer="IDC", hvg=None, genesets=sets)
    pw = ex.pathways
    assert pw.names == ["B", "A"]  # B is predicted exactly: r = 1; C has 1 gene of 2
    np.testing.assert_allclose(pw.r[0], 1.0)
    b_hand = (_z(np.log1p(counts[:, 2])) + _z(np.log1p(counts[:, 3]))) / 2  # g9 not in panel
    np.testing.assert_allclose(pw.measured[:, 0], b_hand)
    np.testing.assert_allclose(pw.predicted[:, 0], b_hand)
    a_truth = (_z(np.log1p(counts[:, 0])) + _z(np.log1p(counts[:, 1]))) / 2
    a_pred = (_z(X[::-1, 0]) + _z(X[::-1, 1])) / 2  # back in the measured spot order
    np.testing.assert_allclose(pw.measured[:, 1], a_truth)
    np.testing.assert_allclose(pw.predicted[:, 1], a_pred)
    np.testing.assert_allclose(pw.r[1], np.corrcoef(a_truth, a_pred)[0, 1])
    assert pw.n_genes.tolist() == [2, 2]


def _example_with_pathways() -> SpatialExample:
    ex = _example()
    rng = np.random.default_rng(2)
    m = rng.normal(size=(len(ex.coords), 2))
    ex.pathways = PathwayMaps(
        collection="hallmark",
        names=["HALLMARK_HYPOXIA", "HALLMARK_APOPTOSIS"],
        measured=m,
        predicted=m * 0.5,
        r=np.array([1.0, 1.0]),
        n_genes=np.array([40, 30]),
    )
    return ex


def test_pathway_maps_share_scale_and_show_r():
    fig = plot_pathway_maps(_example_with_pathways())
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(maps) == 4
    assert maps[0].collections[0].get_clim() == maps[1].collections[0].get_clim()
    assert "HYPOXIA" in maps[0].get_title() and "r = 1.00" in maps[1].get_title()
    with pytest.raises(ValueError, match="no pathway"):
        plot_pathway_maps(_example())


def test_report_pathway_maps_section(tmp_path):
    page = write_report(_eval_dir(tmp_path), examples=[_example_with_pathways()]).read_text()
    assert 'id="pathway-maps"' in page
    assert page.count("<img ") == 1 + 2 + 1 + 1 + 1  # ... + gene maps + pathway maps


# --- benchmark report ----------------------------------------------------------------------------
MODELS = ["histoprism", "ridge", "ceiling"]
TABLE = pd.DataFrame(
    {
        "model": MODELS,
        "hvg_micro": [0.7, 0.63, 0.81],
        "gpc_hallmark_micro": [0.42, 0.31, 0.54],
        "gpc_go_micro": [0.43, 0.32, 0.54],
    }
)
BENCH_PER_CANCER = pd.DataFrame(
    [
        {"model": m, "oncotree_code": c, "hvg": 0.5 + 0.1 * i - 0.05 * j, "gpc_hallmark": 0.3}
        for i, m in enumerate(MODELS)
        for j, c in enumerate(["IDC", "MESO", "PAAD", "SKCM"])
    ]
)
TESTS = pd.DataFrame(
    {
        "model": ["ridge", "ceiling"],
        "metric": ["hvg_micro"] * 2,
        "diff": [0.07, -0.11],
        "ci_low": [0.05, -0.13],
        "ci_high": [0.09, -0.09],
        "wins": [9, 0],
        "losses": [1, 10],
        "p": [0.002, 1e-5],
    }
)
BENCH_SECTIONS = (
    "comparison",
    "significance",
    "headline-bars",
    "per-cancer",
    "pathway-scatter",
    "model-reports",
)


def _per_pathway(shift: float) -> pd.DataFrame:
    rows = [("hallmark", f"HALLMARK_{i}", 0.1 * i) for i in range(5)]
    rows += [("go", f"GOBP_{i}", 0.05 * i) for i in range(4)]
    df = pd.DataFrame(rows, columns=["collection", "gene_set", "s_micro"])
    return df.assign(s_micro=df["s_micro"] + shift, s_macro=df["s_micro"])


PER_PATHWAY_BY_MODEL = {"histoprism": _per_pathway(0.0), "ridge": _per_pathway(-0.02)}


def test_pathway_scatter_diagonal_points_and_share():
    a = pd.Series([0.1, 0.2, 0.3, 0.4, np.nan], index=list("ABCDE"))
    b = pd.Series([0.0, 0.1, 0.5, 0.35, 0.2, 0.9], index=list("ABCDEF"))  # F not in A
    fig = plot_pathway_scatter(a, b, name_a="HP", name_b="ridge", collection="hallmark")
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 4  # one point per set scored by both
    line = ax.lines[0]
    assert np.allclose(line.get_xdata(), line.get_ydata())  # the diagonal y = x
    assert ax.get_xlim() == ax.get_ylim()
    assert "HP higher on 75% of sets" in ax.get_title()
    assert "ridge on 25%" in ax.get_title()


def test_models_per_cancer_and_model_bars():
    fig = plot_models_per_cancer(BENCH_PER_CANCER, metric="hvg")
    ax = fig.axes[0]
    assert len(ax.patches) == len(MODELS) * 4
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IDC", "MESO", "PAAD", "SKCM"]
    fig = plot_model_bars(TABLE)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * len(MODELS)
    assert "0.700" in [t.get_text() for t in ax.texts]  # value labels
    assert plt.get_fignums() == []


def _check_bench_page(page: str, bench_dir) -> None:
    for section in BENCH_SECTIONS:
        assert f'id="{section}"' in page
    n_figs = 1 + 2 + 2  # headline, per-cancer hvg + hallmark, scatter hallmark + go (1 pair)
    assert page.count("<img ") == n_figs
    assert len(list((bench_dir / "figures").glob("*.png"))) == n_figs
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert not [v for v in links if "http" in v]
    assert 'href="eval/ridge/report.html"' in page
    assert "<link" not in page and "<script" not in page


def test_write_benchmark_report(tmp_path):
    path = write_benchmark_report(
        tmp_path,
        table=TABLE,
        per_cancer=BENCH_PER_CANCER,
        per_pathway=PER_PATHWAY_BY_MODEL,
        tests=TESTS,
        reference="histoprism",
    )
    assert path == tmp_path / "report.html"
    page = path.read_text()
    _check_bench_page(page, tmp_path)
    assert "0.700" in page and 'id="tests-table"' in page and "1e-05" in page


def test_regenerate_benchmark_dir(tmp_path):
    TABLE.to_csv(tmp_path / "comparison.csv", index=False)
    info = {
        "models": MODELS,
        "per_cancer": BENCH_PER_CANCER.to_dict(orient="records"),
        "tests": TESTS.to_dict(orient="records"),
        "reference": "histoprism",
    }
    (tmp_path / "comparison.json").write_text(json.dumps(info))
    for m, df in PER_PATHWAY_BY_MODEL.items():
        (tmp_path / "eval" / m).mkdir(parents=True)
        df.to_csv(tmp_path / "eval" / m / keys.EVAL_PER_PATHWAY, index=False)
    path = regenerate(tmp_path)
    _check_bench_page(path.read_text(), tmp_path)


def test_regenerate_eval_dir_and_bad_dir(tmp_path):
    (tmp_path / "ev").mkdir()
    eval_dir = _eval_dir(tmp_path / "ev")
    assert regenerate(eval_dir) == eval_dir / keys.EVAL_REPORT
    assert 'id="per-slide"' in (eval_dir / keys.EVAL_REPORT).read_text()
    with pytest.raises(InputError, match="not a report dir"):
        regenerate(tmp_path / "empty")
