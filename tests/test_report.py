"""Plots return figures drawn from the EVAL tables; the report is one self-contained HTML page."""

from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt  # only to check that no pyplot figure is left open
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from histoprism import keys
from histoprism.errors import InputError
from histoprism.report import (
    SpatialExample,
    plot_gene_r_hist,
    plot_pathways,
    plot_per_cancer,
    plot_spatial_example,
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
    for table in (
        "overview",
        "headline",
        "per-cancer",
        "per-slide",
        "per-pathway-hallmark",
        "per-pathway-go",
    ):
        assert f'id="{table}"' in page
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
