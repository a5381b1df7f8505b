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

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.evaluate import spatial_example
from histoprism.expression.pathways import pathway_scores
from histoprism.io.evaldir import PathwayMaps, SpatialExample, load_examples, save_examples
from histoprism.plotting import figures as pl
from histoprism.plotting.report import regenerate, write_benchmark_report, write_report

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
        pl.per_cancer_bars(PER_CANCER),
        pl.pathway_ranking(PER_PATHWAY, collection="hallmark"),
        pl.gene_pcc_hist(PER_GENE),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert fig.axes[0].get_title() and fig.axes[0].get_xlabel()
    assert "Pearson r" in figs[0].axes[0].get_ylabel()
    assert "Pearson r" in figs[2].axes[0].get_xlabel()
    assert plt.get_fignums() == []  # nothing registered with pyplot, nothing to leak


def test_pathway_ranking_ranks_scored_sets():
    fig = pl.pathway_ranking(PER_PATHWAY, collection="hallmark")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["B", "A"]  # ascending from the bottom: best on top, NaN set left out
    assert "1 sets without a scored gene" in ax.get_title()


def test_plots_draw_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert pl.gene_pcc_hist(PER_GENE, ax=ax) is fig
    assert len(ax.patches) > 0
    fig2 = Figure()
    axes = fig2.subplots(2, 2)
    assert pl.spatial_maps(_example(), ax=axes) is fig2


def test_spatial_maps_share_colour_scale_per_gene():
    fig = pl.spatial_maps(_example())
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
    fig = pl.pathway_maps(_example_with_pathways())
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(maps) == 4
    assert maps[0].collections[0].get_clim() == maps[1].collections[0].get_clim()
    assert "HYPOXIA" in maps[0].get_title() and "r = 1.00" in maps[1].get_title()
    with pytest.raises(ValueError, match="no pathway"):
        pl.pathway_maps(_example())


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
    fig = pl.pathway_scatter(a, b, name_a="HP", name_b="ridge", collection="hallmark")
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 4  # one point per set scored by both
    line = ax.lines[0]
    assert np.allclose(line.get_xdata(), line.get_ydata())  # the diagonal y = x
    assert ax.get_xlim() == ax.get_ylim()
    assert "HP higher on 75% of sets" in ax.get_title()
    assert "ridge on 25%" in ax.get_title()


def test_models_per_cancer_and_model_bars():
    fig = pl.per_cancer_model_bars(BENCH_PER_CANCER, metric="hvg")
    ax = fig.axes[0]
    assert len(ax.patches) == len(MODELS) * 4
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IDC", "MESO", "PAAD", "SKCM"]
    fig = pl.headline_bars(TABLE)
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


def test_benchmark_report_of_a_custom_collection_alone(tmp_path):
    """Models evaluated with a user's GMT only: its GPC is in the headline bars, the per-cancer
    charts and the scatter plots instead of Hallmark and GO."""
    table = TABLE[["model", "hvg_micro"]].assign(gpc_mine_micro=[0.4, 0.3, 0.5])
    per_cancer = BENCH_PER_CANCER.drop(columns="gpc_hallmark").assign(gpc_mine=0.2)
    per_pathway = {
        m: pd.DataFrame(
            {"collection": "mine", "gene_set": list("ABCD"), "s_micro": [0.1, 0.2, 0.3, k]}
        ).assign(s_macro=lambda d: d["s_micro"])
        for m, k in (("histoprism", 0.4), ("ridge", 0.0))
    }
    page = write_benchmark_report(
        tmp_path, table=table, per_cancer=per_cancer, per_pathway=per_pathway
    ).read_text()
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == [
        "headline.png",
        "per-cancer-gpc_mine.png",
        "per-cancer-hvg.png",
        "scatter-mine-ridge.png",
    ]
    assert "GPC mine: s_m per gene set, histoprism (x) vs ridge (y)." in page


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


# --- the tissue under the maps -------------------------------------------------------------------
PINK, GREEN, GREY = (200, 80, 160), (60, 170, 60), (235, 235, 235)


def _tissue(scale: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """An image of level-0 [0, 1000) x [0, 600) at ``scale`` image px per level-0 px: left half
    pink above y = 300 and green below, right half grey; and its extent (x0, x1, y0, y1)."""
    w, h = int(1000 * scale), int(600 * scale)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = GREY
    image[: h // 2, : w // 2] = PINK
    image[h // 2 :, : w // 2] = GREEN
    return image, np.array([0.0, 1000.0, 0.0, 600.0])


def _example_on_tissue() -> SpatialExample:
    ex = _example_with_pathways()
    rng = np.random.default_rng(3)
    ex.coords = rng.uniform([50, 50], [950, 550], size=(len(ex.coords), 2))
    ex.coords[:3] = [[200, 100], [200, 500], [800, 300]]  # pink, green, grey
    ex.image, ex.image_extent = _tissue()
    return ex


def _maps(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_tissue_drawn_under_the_spots_at_their_place():
    ex = _example_on_tissue()
    fig = pl.spatial_maps(ex)
    maps = _maps(fig)
    assert len(maps) == 4
    for ax in maps:
        (im,) = ax.images
        assert im.zorder < ax.collections[0].zorder  # spots on top of the tissue
        assert ax.yaxis_inverted()  # y grows downwards, as on the slide
        # the pixel of the axes' image under each known spot is the source colour there
        x0, x1, bottom, top = im.get_extent()
        arr = np.asarray(im.get_array())
        h, w = arr.shape[:2]
        for (x, y), colour in zip(ex.coords[:3], (PINK, GREEN, GREY), strict=True):
            col = int((x - x0) / (x1 - x0) * w)
            row = int((y - top) / (bottom - top) * h)  # origin 'upper': row 0 at ``top``
            assert tuple(arr[row, col]) == colour
    # as rendered: with the spots hidden, the figure shows the source colour where they sit
    for ax in maps:
        ax.collections[0].set_visible(False)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    for ax in maps:
        for (x, y), colour in zip(ex.coords[:3], (PINK, GREEN, GREY), strict=True):
            px, py = ax.transData.transform((x, y))
            pixel = rgba[int(round(rgba.shape[0] - py)), int(round(px)), :3]
            np.testing.assert_allclose(pixel, colour, atol=3)
    pathway_axes = _maps(pl.pathway_maps(ex))
    assert all(len(ax.images) == 1 for ax in pathway_axes)
    assert plt.get_fignums() == []


def test_no_image_no_tissue():
    for fig in (pl.spatial_maps(_example()), pl.pathway_maps(_example_with_pathways())):
        maps = _maps(fig)
        assert maps and all(not ax.images and ax.yaxis_inverted() for ax in maps)


def test_spots_off_the_image_stay_in_view():
    ex = _example_on_tissue()
    ex.coords[3] = [1400, 800]  # beyond the image's right and bottom edges
    ax = _maps(pl.spatial_maps(ex))[0]
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    assert left <= 0 and right >= 1400 and bottom >= 800 and top <= 0


def test_tissue_crop_of_a_prediction_library():
    from histoprism.io.spatial import tissue_crop

    # a 2,000 px hires view of a 10,000 px slide: the spots cover 6,000 level-0 px = 1,200 px
    scale = 0.2
    hires = np.zeros((2000, 2000, 3), np.uint8)
    yy, xx = np.mgrid[0:2000, 0:2000]
    hires[..., 0] = (xx // 40) % 256  # every pixel tells where it is
    hires[..., 1] = (yy // 40) % 256
    library = {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": scale},
        "metadata": {"source_image": "slide.tif"},
    }
    rng = np.random.default_rng(4)
    coords = rng.uniform([2000, 3000], [8000, 6000], size=(300, 2))
    image, extent = tissue_crop(library, coords)
    assert image.dtype == np.uint8 and max(image.shape[:2]) <= 800
    x0, x1, y0, y1 = extent
    assert x0 < coords[:, 0].min() and x1 > coords[:, 0].max()
    assert y0 < coords[:, 1].min() and y1 > coords[:, 1].max()
    h, w = image.shape[:2]
    assert (x1 - x0) / w == pytest.approx((y1 - y0) / h)  # square pixels
    for x, y in coords[:20]:  # the crop shows, under a spot, what the hires view has there
        row, col = int((y - y0) / (y1 - y0) * h), int((x - x0) / (x1 - x0) * w)
        expected = hires[int(y * scale), int(x * scale), :2].astype(int)
        assert np.abs(image[row, col, :2].astype(int) - expected).max() <= 1
    library["metadata"]["source_image"] = "none"  # a white canvas: nothing to draw under
    assert tissue_crop(library, coords) is None
    assert tissue_crop(None, coords) is None


# --- spatial_maps.h5 -----------------------------------------------------------------------------
def _assert_examples_equal(got: list[SpatialExample], want: list[SpatialExample]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.sample_id, a.cancer, a.genes, a.gene_source) == (
            b.sample_id,
            b.cancer,
            b.genes,
            b.gene_source,
        )
        for name in ("coords", "measured", "predicted", "r", "image", "image_extent"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == np.asarray(y).dtype and np.array_equal(x, y), name  # exact
        assert (a.pathways is None) == (b.pathways is None)
        if a.pathways is not None:
            p, q = a.pathways, b.pathways
            assert (p.collection, p.names) == (q.collection, q.names)
            for name in ("measured", "predicted", "r", "n_genes"):
                assert np.array_equal(getattr(p, name), getattr(q, name)), name


def test_save_load_examples_round_trip(tmp_path):
    plain = _example()
    plain.sample_id, plain.cancer, plain.genes = "slide/α 1", "MESO", ["G-1", "Ω"]
    examples = [_example_on_tissue(), plain]
    path = save_examples(tmp_path / keys.EVAL_SPATIAL_MAPS, examples)
    assert path.is_file() and not list(tmp_path.glob(".*partial*"))
    _assert_examples_equal(load_examples(path), examples)
    save_examples(tmp_path / "none.h5", [])
    assert load_examples(tmp_path / "none.h5") == []


def test_load_examples_bad_files(tmp_path):
    bad = tmp_path / keys.EVAL_SPATIAL_MAPS
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match=re.escape(str(bad))):
        load_examples(bad)
    import h5py

    with h5py.File(bad, "w") as f:
        f["x"] = 1
    with pytest.raises(InputError, match="not a spatial maps file"):
        load_examples(bad)
    save_examples(bad, [_example()])
    with h5py.File(bad, "a") as f:
        del f["examples/0/predicted"]
        f["examples/0/predicted"] = np.zeros((3, 2))  # 3 spots where coords has 40
    with pytest.raises(InputError, match="do not agree"):
        load_examples(bad)
    with pytest.raises(InputError, match="not found"):
        load_examples(tmp_path / "nope.h5")


def _spatial_part(page: str) -> str:
    return page[page.index('id="spatial-maps"') :]


def test_write_report_draws_the_kept_maps(tmp_path):
    eval_dir = _eval_dir(tmp_path)
    examples = [_example_on_tissue(), _example()]
    drawn = write_report(eval_dir, examples=examples).read_text()
    save_examples(eval_dir / keys.EVAL_SPATIAL_MAPS, examples)
    (eval_dir / keys.EVAL_REPORT).unlink()
    again = regenerate(eval_dir).read_text()
    assert _spatial_part(again).count("<figure>") == 2 + 1  # 2 gene maps, 1 pathway map
    assert _spatial_part(again) == _spatial_part(drawn)  # the same figures, byte for byte
    (eval_dir / keys.EVAL_SPATIAL_MAPS).write_bytes(b"broken")
    with pytest.raises(InputError, match=keys.EVAL_SPATIAL_MAPS):
        regenerate(eval_dir)
    (eval_dir / keys.EVAL_SPATIAL_MAPS).unlink()  # a directory from before the file: a note
    old = regenerate(eval_dir).read_text()
    assert "No spatial maps" in old and keys.EVAL_SPATIAL_MAPS in old
    assert _spatial_part(old).count("<figure>") == 0


def _overview_table(page: str) -> str:
    m = re.search(r'<table id="overview".*?</table>', page, re.S)
    assert m, "no Run table"
    return m.group(0)


def test_run_table_holds_no_slide_facts(tmp_path):
    eval_dir = _eval_dir(tmp_path)
    metrics = json.loads((eval_dir / keys.EVAL_METRICS).read_text())
    # metrics.json as evaluate wrote it before: the first slide's facts in "model"
    metrics["model"] |= {"cancer_requested": "IDC", "pixel_size_um": 0.2625, "units": "log1p"}
    (eval_dir / keys.EVAL_METRICS).write_text(json.dumps(metrics))
    run = _overview_table(write_report(eval_dir).read_text())
    assert "model: model_id" in run and "model: units" in run  # the run's facts stay
    for key in keys.UNS_SLIDE_FACTS:
        assert key not in run


# --- long gene-set names -------------------------------------------------------------------------
def _go_table() -> pd.DataFrame:
    from histoprism.expression.genes import gpc_genesets

    names = list(gpc_genesets("go"))
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {
            "collection": "go",
            "gene_set": names,
            "n_genes_in_panel": 5,
            "s_micro": rng.uniform(-0.1, 0.5, len(names)),
            "s_macro": rng.uniform(-0.1, 0.5, len(names)),
        }
    )


def _clipped_labels(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for t in fig.axes[0].get_yticklabels():
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 or e.x1 > box.x1 or e.y0 < box.y0 or e.y1 > box.y1:
            out.append(t.get_text())
    return out


def test_go_chart_labels_whole_and_inside_the_figure():
    table = _go_table()
    fig = pl.pathway_ranking(table, collection="go")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 87 and len(set(labels)) == 87
    assert max(map(len, labels)) >= 60 and not any("…" in v for v in labels)  # not cut short
    full = {re.sub(r"^GO(BP|CC|MF)_", "", n) for n in table["gene_set"]}
    assert set(labels) == full
    assert _clipped_labels(fig) == []
    ax = fig.axes[0]  # the figure grew for the labels: the bars keep their room
    assert ax.get_position().width * fig.get_figwidth() >= 5.0


def test_very_long_set_names_stay_apart_and_inside():
    stem = "A_GENE_SET_NAME_FROM_A_CUSTOM_GMT_THAT_GOES_ON_AND_ON_" * 3
    table = pd.DataFrame(
        {
            "collection": "mine",
            "gene_set": [stem + "ONE", stem + "TWO", "GOBP_X", "GOMF_X"],
            "s_micro": [0.1, 0.2, 0.3, 0.4],
            "s_macro": [0.1, 0.2, 0.3, 0.4],
        }
    )
    fig = pl.pathway_ranking(table, collection="mine")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(set(labels)) == 4  # GOBP_X and GOMF_X keep their prefixes: they would read alike
    assert "GOBP_X" in labels and all(len(v) <= 80 for v in labels)
    assert _clipped_labels(fig) == []


def _tables_outside_scroll(page: str) -> int:
    """Tables not inside a sideways-scrolling container (each container holds one table)."""
    tables = len(re.findall(r"<table\b", page))
    wrapped = len(re.findall(r'<div class="table-scroll">\s*<table\b', page))
    return tables - wrapped


def test_every_report_table_scrolls_inside_the_page(tmp_path):
    """A wide per-slide table must not run off the page's right edge."""
    (tmp_path / "eval").mkdir()
    eval_page = write_report(_eval_dir(tmp_path / "eval"), examples=[_example()]).read_text()
    bench_page = write_benchmark_report(
        tmp_path / "bench",
        table=TABLE,
        per_cancer=BENCH_PER_CANCER,
        per_pathway=PER_PATHWAY_BY_MODEL,
        tests=TESTS,
        reference="histoprism",
    ).read_text()
    for page in (eval_page, bench_page):
        assert "<table" in page and _tables_outside_scroll(page) == 0
        assert re.search(r"div\.table-scroll\s*\{[^}]*overflow-x:\s*auto", page)


def test_per_cancer_counts_are_whole_numbers_whatever_the_dtype():
    """metrics.json per_cancer as a DataFrame turns n_slides into floats: labels stay (n=2)."""
    fig = pl.per_cancer_bars(PER_CANCER.astype({"n_slides": float}))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert any("(n=2)" in t for t in labels) and not any(".0)" in t for t in labels)
