"""Attribution (``histoprism explain``): integrated-gradient completeness, the own/neighbourhood
split, the pathway target equal to what predict writes, obsm in a prediction file, the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoprism._core.errors import InputError
from histoprism.cli import app
from histoprism.expression.genes import GenePanel
from histoprism.expression.pathways import default_genesets
from histoprism.inference.explain import (
    COLUMNS,
    explain,
    explain_slide,
    obsm_key,
    resolve_target,
    save_explanation,
    write_explanation,
)
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.models.run import load

ENCODER = "synthetic"


@pytest.fixture(scope="module")
def setup(tiny_cohort, trained_runs, tmp_path_factory):
    """A loaded run, a test slide, a gene set of >= 3 panel genes, and its prediction file."""
    run = load(trained_runs["histoprism"], device="cpu")
    cohort = Cohort(tiny_cohort)
    sid = cohort.ids("test")[0]
    slide = cohort.slide(sid, ENCODER)
    sets = default_genesets(run.panel)
    name = next(k for k, v in sets.items() if len(set(v) & set(run.panel.genes)) >= 3)
    pred = tmp_path_factory.mktemp("explain_pred")
    predict(trained_runs["histoprism"], tiny_cohort, ENCODER, pred, samples=sid, progress=False)
    return run, slide, name, pred / f"{sid}.h5ad"


@pytest.fixture(scope="module")
def gene_ex(setup):
    run, slide, _, _ = setup
    return explain_slide(run, slide, run.panel.genes[0], steps=32)


@pytest.fixture(scope="module")
def set_ex(setup):
    run, slide, name, _ = setup
    return explain_slide(run, slide, name, steps=32)


def test_integrated_gradients_complete(gene_ex, set_ex):
    """Attributions add up to f(x) - f(baseline) (midpoint rule, 32 steps)."""
    for ex in (gene_ex, set_ex):
        n = len(ex.barcodes)
        assert ex.attribution.shape == ex.own.shape == ex.context.shape == (n,)
        assert np.isfinite(ex.attribution).all() and abs(ex.delta) > 0
        assert abs(ex.completeness_error) <= 0.01 * abs(ex.delta) + 1e-3


def test_own_plus_context_is_deviation_from_slide_mean(gene_ex):
    ex = gene_ex
    np.testing.assert_allclose(ex.own + ex.context, ex.prediction - ex.prediction.mean(), atol=1e-9)
    np.testing.assert_allclose(ex.own.mean(), 0, atol=1e-9)
    assert 0.0 <= ex.neighbourhood_share <= 1.0


def test_occluded_is_the_slide_with_that_spot_at_the_mean(setup, gene_ex):
    """The batched occluded predictions equal running the model on the slide with one spot's
    embedding replaced by the slide mean; the other spots are left as they are."""
    run, slide, _, _ = setup
    model = run.predictor.model
    from histoprism.models.inputs import input_options, to_tensors

    t = to_tensors(slide, vocab=run.vocab, **input_options(model.cfg))
    col = run.panel.index[gene_ex.target.genes[0]]
    assert np.isfinite(gene_ex.occluded).all()  # a small slide: every spot is split
    with torch.no_grad():
        for i in (0, 7, t.n_spots - 1):
            x = t.features.clone()
            x[i] = t.features.mean(0)
            inputs = {**t.model_inputs(), "features": x[None]}
            h = model.trunk(**{k: v for k, v in inputs.items() if v is not None})
            value = float(model.head(h)[0, i, col])
            assert value == pytest.approx(gene_ex.occluded[i], abs=1e-4)
            assert value != pytest.approx(gene_ex.prediction[i], abs=1e-6)


def test_split_covers_at_most_split_spots(setup, monkeypatch):
    """Above SPLIT_SPOTS spots, a seeded sample is split and the rest is NaN, not guessed."""
    import histoprism.inference.explain as explain_mod

    run, slide, _, _ = setup
    monkeypatch.setattr(explain_mod, "SPLIT_SPOTS", 10)
    ex = explain_slide(run, slide, run.panel.genes[0], steps=4)
    assert np.isfinite(ex.own).sum() == np.isfinite(ex.context).sum() == 10
    assert np.isfinite(ex.prediction).all() and 0 <= ex.neighbourhood_share <= 1


def test_set_target_is_the_predicted_pathway_score(setup, set_ex):
    """A gene set's per-spot target is obsm['pathways'] of the prediction file."""
    _, _, name, pred_path = setup
    pred = ad.read_h5ad(pred_path)
    assert list(pred.obs_names) == list(set_ex.barcodes)
    np.testing.assert_allclose(set_ex.prediction, pred.obsm["pathways"][name], atol=2e-4)


def test_spot_subset_is_complete(setup):
    run, slide, name, _ = setup
    ex = explain_slide(run, slide, name, spots=np.arange(5), steps=16)
    assert ex.spots.sum() == 5
    assert abs(ex.completeness_error) <= 0.01 * abs(ex.delta) + 1e-3


def test_write_explanation_adds_obsm(setup, set_ex, tmp_path):
    _, _, _, pred_path = setup
    path = tmp_path / "p.h5ad"
    path.write_bytes(pred_path.read_bytes())
    write_explanation(path, set_ex)
    write_explanation(path, set_ex)  # replaces its own entry
    pred = ad.read_h5ad(path)
    frame = pred.obsm[obsm_key(set_ex)]
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(COLUMNS)
    np.testing.assert_allclose(frame["ig"], set_ex.attribution, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame["context"], set_ex.context, rtol=1e-5, atol=1e-6)
    assert pred.X.shape[0] == len(frame) and "pathways" in pred.obsm


def test_write_explanation_refuses_other_spots(setup, set_ex, tmp_path):
    _, _, _, pred_path = setup
    other = ad.read_h5ad(pred_path)[:10].copy()
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(InputError, match="not the"):
        write_explanation(tmp_path / "other.h5ad", set_ex)
    with pytest.raises(InputError, match="no such"):
        write_explanation(tmp_path / "none.h5ad", set_ex)


def test_save_explanation_png_and_csv(gene_ex, tmp_path):
    png, csv = save_explanation(gene_ex, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(csv)
    assert len(table) == len(gene_ex.barcodes)
    assert {"barcode", "x", "y", "prediction", "ig", "own", "context"} <= set(table.columns)


def test_resolve_target():
    panel = GenePanel(("EPCAM", "CD3E", "PTPRC", "VIM"))
    assert resolve_target("EPCAM", panel).kind == "gene"
    t = resolve_target("genes:CD3E, PTPRC", panel)
    assert t.kind == "gene set" and t.genes == ("CD3E", "PTPRC") and t.key == "genes_CD3E_PTPRC"
    assert resolve_target(["VIM", "EPCAM"], panel).genes == ("VIM", "EPCAM")
    for bad in ("NOPE", "genes:EPCAM,NOPE", "genes:"):
        with pytest.raises(InputError):
            resolve_target(bad, panel)


def test_bad_inputs(tiny_cohort, trained_runs):
    sid = Cohort(tiny_cohort).ids("test")[0]
    with pytest.raises(InputError, match="HistoPrism run"):
        explain(trained_runs["ridge"], tiny_cohort, ENCODER, sid, "genes:ABCA1")
    with pytest.raises(InputError):
        explain(trained_runs["histoprism"], tiny_cohort, ENCODER, "NOSUCH", "ABCA1")
    with pytest.raises(InputError, match="steps"):
        explain(trained_runs["histoprism"], tiny_cohort, ENCODER, sid, "ABCA1", steps=0)


def test_cli_explain(setup, tiny_cohort, trained_runs, tmp_path):
    _, slide, name, pred_path = setup
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / pred_path.name).write_bytes(pred_path.read_bytes())
    args = ["explain", "--model", trained_runs["histoprism"], "--data", tiny_cohort]
    args += ["--encoder", ENCODER, "--sample", slide.id, "--target", name]
    args += ["--out", tmp_path / "out", "--pred", pred, "--steps", "8"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 and "neighbourhood share" in result.stdout
    assert (tmp_path / "out" / f"{slide.id}_{name}.png").is_file()
    assert (tmp_path / "out" / f"{slide.id}_{name}.csv").is_file()
    assert f"attribution_{name}" in ad.read_h5ad(pred / pred_path.name).obsm
    bad_args = args[: args.index("--target") + 1] + ["NOPE", "--out", tmp_path / "o"]
    bad = CliRunner().invoke(app, [str(a) for a in bad_args])
    assert bad.exit_code == 2 and "NOPE" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def _spot_patches(n: int) -> np.ndarray:
    """(n, 8, 8, 3) uint8, patch i filled with i (the identity test of which patch was read)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy()


def test_top_patches_from_hest_patch_file_follow_barcodes(setup, cohort_copy):
    from histoprism.inference.explain import top_patches, top_spots
    from histoprism.io.readers.hest import write_hest_patches

    run, slide, _, _ = setup
    ex = explain_slide(run, slide, run.panel.genes[0], steps=4)
    c = cohort_copy()
    n = len(slide.barcodes)
    order = np.random.default_rng(0).permutation(n)  # the patch file in another spot order
    path = c.root / "patches" / f"{slide.id}.h5"
    path.parent.mkdir(exist_ok=True)
    write_hest_patches(path, _spot_patches(n), np.zeros((n, 2)), slide.barcodes[order], 0.5)
    rows, patches = top_patches(ex, Cohort(c.root), k=5)
    assert list(rows) == list(top_spots(ex, 5))
    assert np.all(np.diff(ex.attribution[rows]) <= 0)  # largest first
    position = {b: i for i, b in enumerate(slide.barcodes[order])}
    assert [int(p[0, 0, 0]) for p in patches] == [position[b] for b in slide.barcodes[rows]]


def test_top_patches_cut_from_the_slide_image(setup, cohort_copy, tmp_path):
    """Each top patch is the image square centred on its spot: on an image whose red channel is
    x // 4 and green y // 4 (level-0 px), a patch's centre pixel gives back its spot's centre.
    The slide is rescaled to 5 µm per pixel (a small image for a test)."""
    import tifffile

    from histoprism.inference.explain import save_top_patches, top_patches

    run, slide, _, _ = setup
    ex = explain_slide(run, slide, run.panel.genes[0], steps=4)
    c = cohort_copy()
    meta = c.root / "metadata.csv"
    md = pd.read_csv(meta, dtype=str)
    md["pixel_size_um_embedded"] = "5.0"
    md.to_csv(meta, index=False)
    ex.coords = ex.coords / 10  # the same spots in the rescaled slide's pixels
    w, h = (int(v) + 40 for v in ex.coords.max(0))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx // 4, yy // 4, np.zeros_like(xx)], -1).astype(np.uint8)
    (c.root / "wsis").mkdir(exist_ok=True)
    tifffile.imwrite(c.root / "wsis" / f"{slide.id}.tif", img)
    cohort = Cohort(c.root)
    rows, patches = top_patches(ex, cohort, k=4)
    half = patches.shape[1] // 2
    for i, p in zip(rows, patches, strict=True):
        x, y = ex.coords[i]
        assert abs(int(p[half, half, 0]) - x // 4) <= 1
        assert abs(int(p[half, half, 1]) - y // 4) <= 1
    png = save_top_patches(ex, cohort, tmp_path)
    assert png is not None and png.name.endswith("_top.png") and png.stat().st_size > 1000
    # the maps are drawn over the same image: its crop spans the spots
    from histoprism.inference.explain import save_explanation, slide_tissue

    image, extent = slide_tissue(ex, cohort)
    assert image.ndim == 3 and image.shape[2] == 3
    x0, x1, y0, y1 = extent
    lo, hi = ex.coords.min(0), ex.coords.max(0)
    assert x0 <= lo[0] and hi[0] <= x1 and y0 <= lo[1] and hi[1] <= y1
    maps, _ = save_explanation(ex, tmp_path / "maps", tissue=(image, extent))
    assert maps.stat().st_size > 1000


def test_attention_rollout_rows_are_distributions_and_match_the_layers(setup, gene_ex):
    """Rollout rows sum to 1; with one layer it is 0.5 (mean-head attention) + 0.5 I, the
    attention computed from the layer's input as the fused kernel does."""
    from histoprism.inference.explain import attention_rollout
    from histoprism.models.inputs import input_options, to_tensors

    run, slide, _, _ = setup
    model = run.predictor.model
    t = to_tensors(slide, vocab=run.vocab, **input_options(model.cfg))
    inputs = {k: v for k, v in t.model_inputs().items() if v is not None}
    r = attention_rollout(model, inputs)
    n = t.n_spots
    assert r.shape == (n, n) and np.allclose(r.sum(1), 1, atol=1e-4) and (r >= -1e-7).all()
    np.testing.assert_allclose(gene_ex.attention_context, 1 - np.diag(r), atol=1e-6)
    assert (gene_ex.attention_context > 0).all() and (gene_ex.attention_context < 1).all()
    # the first layer's weights reproduce its fused attention output
    block = model.blocks[0]
    seen = []
    hook = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.trunk(**inputs)
    hook.remove()
    x = seen[0]
    assert model.uses_local_attention(n)  # the default: within 300 µm, so weights are masked
    a = block.attention_weights(x, inputs["coords_um"], model.cfg.attention_radius_um)
    assert (a == 0).float().mean() > 0.5  # (1, h, N, N): most spots lie outside the radius
    y = block.norm1(x) if block.norm_first else x
    v = block.qkv(y).view(1, n, 3, block.n_heads, -1)[:, :, 2].transpose(1, 2)
    plans = model.local_plans(inputs["coords_um"], n, inputs.get("spatial"))
    attended = block._attend(y, plans)  # (1, N, H): the tiled kernel prediction uses
    torch.testing.assert_close(
        (a @ v).transpose(1, 2).reshape(1, n, -1), attended, atol=1e-5, rtol=1e-4
    )
    dense = block.attention_weights(x)  # and without coordinates, the dense layer
    fused = torch.nn.functional.scaled_dot_product_attention(
        *(block.qkv(y).view(1, n, 3, block.n_heads, -1)[:, :, i].transpose(1, 2) for i in range(3))
    )
    torch.testing.assert_close(dense @ v, fused, atol=1e-5, rtol=1e-4)
