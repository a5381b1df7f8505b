"""Predictive uncertainty (``predict --uncertainty``) and its calibration in ``evaluate``: the
layers' contract, the noise term against an independent negative-binomial computation, the
mixture of members, mc-dropout without dropout, coverage against an independent count,
refusals."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import nbinom, norm, spearmanr

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.evaluation.calibration import (
    LEVELS,
    CalibrationTally,
    central_interval,
    inside,
)
from histoprism.evaluation.evaluate import evaluate
from histoprism.expression.negbin import nb_log1p_moments
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.models.noise import (
    MAX_FLOOR,
    MIN_MEAN,
    SHAPES,
    Z_LEVELS,
    NoiseFit,
    NoiseModel,
    calibrate_z,
    fit_noise,
    noise_variance,
    slide_offsets,
)
from histoprism.plotting.figures import reliability_diagram
from histoprism.training.api import train

ENCODER = "synthetic"
LAYERS = ("q025", "q10", "sd", "q90", "q975")


def _copy_run(src, dst, *, edit=None, drop=()):
    """A copy of a run directory (weights, config, noise), ``edit``ing its config."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last", *drop))
    if edit is not None:
        path = dst / keys.RUN_CONFIG
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def ensemble_dir(tiny_cohort, trained_runs, tmp_path_factory):
    """A folder of 3 HistoPrism runs: the session's (seed 0) and two more (seeds 1, 2)."""
    root = tmp_path_factory.mktemp("ensemble")
    _copy_run(trained_runs["histoprism"], root / "seed0")
    for seed in (1, 2):
        train(tiny_cohort, ENCODER, root / f"seed{seed}", epochs=2, seed=seed, progress=False)
    return root


@pytest.fixture(scope="module")
def ensemble_pred(tiny_cohort, ensemble_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred_ensemble")
    predict(ensemble_dir, tiny_cohort, ENCODER, out, uncertainty="ensemble", progress=False)
    return out


@pytest.fixture(scope="module")
def noise_only_pred(tiny_cohort, trained_runs, tmp_path_factory):
    """The session run twice as an 'ensemble': no model spread, the count noise alone."""
    out = tmp_path_factory.mktemp("pred_noise_only")
    run = trained_runs["histoprism"]
    predict([run, run], tiny_cohort, ENCODER, out, uncertainty="ensemble", progress=False)
    return out


@pytest.fixture(scope="module")
def plain_pred(tiny_cohort, trained_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred_plain")
    predict(trained_runs["histoprism"], tiny_cohort, ENCODER, out, progress=False)
    return out


def _files(folder):
    return sorted(folder.glob("*.h5ad"))


# --- the prediction file ---------------------------------------------------------------------------
def test_layers_shapes_dtypes_and_order(ensemble_pred, ensemble_dir, tiny_cohort, tmp_path):
    files = _files(ensemble_pred)
    assert [p.stem for p in files] == sorted(Cohort(tiny_cohort).ids("test"))
    for path in files:
        pred = ad.read_h5ad(path)
        assert set(pred.layers) == set(LAYERS)
        for name in LAYERS:
            layer = pred.layers[name]
            assert isinstance(layer, np.ndarray) and layer.dtype == np.float32
            assert layer.shape == pred.X.shape and np.isfinite(layer).all()
        lay = pred.layers
        assert (lay["sd"] > 0).all() and (lay["q025"] >= 0).all()
        assert (lay["q025"] <= lay["q10"]).all() and (lay["q10"] <= pred.X).all()
        assert (pred.X <= lay["q90"]).all() and (lay["q90"] <= lay["q975"]).all()
        # the bounds are X -/+ z sd, clipped at 0, with the calibrated z of their level
        info = pred.uns[keys.UNS_HISTOPRISM]["uncertainty"]
        z = dict(zip(np.round(info["z_levels"], 3), info["z"], strict=True))
        assert 0.5 < z[0.8] < z[0.95] < 4
        for name, zq in (("q025", -z[0.95]), ("q10", -z[0.8]), ("q90", z[0.8]), ("q975", z[0.95])):
            want = np.maximum(pred.X + zq * lay["sd"], 0)
            np.testing.assert_allclose(lay[name], want, rtol=1e-5, atol=1e-5)
        pw, pw_sd = pred.obsm[keys.OBSM_PATHWAYS], pred.obsm[keys.OBSM_PATHWAYS_SD]
        assert isinstance(pw_sd, pd.DataFrame) and pw_sd.dtypes.eq(np.float32).all()
        assert list(pw_sd.columns) == list(pw.columns) and list(pw_sd.index) == list(pw.index)
        assert np.isfinite(pw_sd.to_numpy()).all() and (pw_sd.to_numpy() > 0).all()
        assert info["method"] == "ensemble" and list(info["runs"]) == ["seed0", "seed1", "seed2"]
        assert pred.uns[keys.UNS_HISTOPRISM]["output"] == "dense"
    # X is the members' mean prediction
    singles = []
    for seed in range(3):
        out = tmp_path / f"single{seed}"
        predict(ensemble_dir / f"seed{seed}", tiny_cohort, ENCODER, out, progress=False)
        singles.append(ad.read_h5ad(out / files[0].name).X)
    np.testing.assert_allclose(ad.read_h5ad(files[0]).X, np.mean(singles, 0), atol=1e-5)


def _nb_log1p_var_direct(m: float, r: float) -> float:
    """Var[log1p Y] for Y ~ NB(mu, r) with E[log1p Y] = m, by bisection on mu and pmf sums up
    to where the tail is below 1e-12."""

    def moments(mu):
        p = r / (r + mu)
        y = np.arange(int(nbinom.isf(1e-12, r, p)) + 2)
        pmf, f = nbinom.pmf(y, r, p), np.log1p(y)
        e = pmf @ f
        return e, pmf @ f**2 - e * e

    lo, hi = 1e-6, 1e4
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if moments(mid)[0] < m else (lo, mid)
    return float(moments(np.sqrt(lo * hi))[1])


def test_sd_without_model_spread_is_the_count_noise(noise_only_pred, trained_runs):
    run = trained_runs["histoprism"]
    config = json.loads((run / keys.RUN_CONFIG).read_text())
    noise = NoiseModel.load(run / keys.RUN_NOISE, len(config["genes"]))
    pred = ad.read_h5ad(_files(noise_only_pred)[0])
    X = torch.from_numpy(pred.X)
    v = noise_variance(X, noise.curves(slice(None)), noise.floor).numpy()
    # plus the unknown depth of the slide: slide_var (1 - exp(-y))², y at least the floor
    assert noise.slide_var > 0  # the tiny cohort's slides differ in depth
    depth = noise.slide_var * (1 - np.exp(-np.maximum(pred.X, noise.floor))) ** 2
    np.testing.assert_allclose(pred.layers["sd"], np.sqrt(v + depth), rtol=1e-5)
    # a prediction clipped to 0 gets the noise of the run's floor, not a certain 0
    assert MIN_MEAN <= noise.floor <= MAX_FLOOR
    zero = pred.X == 0
    if zero.any():
        at_floor = (
            noise_variance(
                torch.full((1, pred.n_vars), noise.floor), noise.curves(slice(None))
            ).numpy()
            + noise.slide_var * (1 - np.exp(-noise.floor)) ** 2
        )
        np.testing.assert_allclose(
            pred.layers["sd"][zero],
            np.sqrt(np.broadcast_to(at_floor, X.shape)[zero]),
            rtol=1e-5,
        )
    # ... and that noise is Var[log1p] of the negative binomial with the gene's shape
    # (moderate shapes and means keep the direct sums short)
    ok = (noise.shape[None] >= 0.5) & (pred.X > max(0.05, noise.floor)) & (pred.X < 2.5)
    rows, cols = np.nonzero(ok)
    pick = np.random.default_rng(0).choice(len(rows), size=min(6, len(rows)), replace=False)
    assert len(pick) >= 3
    for n, g in zip(rows[pick], cols[pick], strict=True):
        want = _nb_log1p_var_direct(float(pred.X[n, g]), float(noise.shape[g]))
        got = pred.layers["sd"][n, g] ** 2 - depth[n, g]
        assert got == pytest.approx(want, rel=0.03, abs=1e-4)
    # pathway sd: the noise term alone, smaller than with the ensemble's spread added
    assert (pred.obsm[keys.OBSM_PATHWAYS_SD].to_numpy() > 0).all()


def test_ensemble_sd_adds_the_members_spread(ensemble_pred, noise_only_pred):
    a = ad.read_h5ad(_files(ensemble_pred)[0])
    b = ad.read_h5ad(_files(noise_only_pred)[0])
    # noise of the mean is not the mean noise, but the spread makes sd larger on the whole
    assert float(np.mean(a.layers["sd"] ** 2)) > float(np.mean(b.layers["sd"] ** 2))
    spread = a.obsm[keys.OBSM_PATHWAYS_SD].to_numpy() ** 2
    assert spread.mean() > (b.obsm[keys.OBSM_PATHWAYS_SD].to_numpy() ** 2).mean()


def test_mc_dropout_without_dropout_is_the_prediction_plus_noise(
    tiny_cohort, trained_runs, noise_only_pred, plain_pred, tmp_path
):
    def no_dropout(config):
        config["model_config"]["dropout"] = 0.0
        config["model_config"]["input_dropout"] = 0.0

    run = _copy_run(trained_runs["histoprism"], tmp_path / "run", edit=no_dropout)
    out = tmp_path / "pred"
    predict(run, tiny_cohort, ENCODER, out, uncertainty="mc-dropout", passes=3, progress=False)
    for path in _files(out):
        pred = ad.read_h5ad(path)
        np.testing.assert_allclose(pred.X, ad.read_h5ad(plain_pred / path.name).X, atol=1e-5)
        noise_only = ad.read_h5ad(noise_only_pred / path.name)
        np.testing.assert_allclose(pred.layers["sd"], noise_only.layers["sd"], rtol=1e-4)
        assert pred.uns[keys.UNS_HISTOPRISM]["uncertainty"]["n_members"] == 3


def test_mc_dropout_passes_spread_and_are_seeded(
    tiny_cohort, trained_runs, noise_only_pred, tmp_path
):
    run = trained_runs["histoprism"]
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        predict(run, tiny_cohort, ENCODER, outs[-1], uncertainty="mc-dropout", passes=4,
                samples=Cohort(tiny_cohort).ids("test")[0], progress=False)  # fmt: skip
    a, b = (ad.read_h5ad(_files(o)[0]) for o in outs)
    np.testing.assert_array_equal(a.layers["sd"], b.layers["sd"])  # same seed, same draws
    noise_only = ad.read_h5ad(noise_only_pred / _files(outs[0])[0].name)
    assert float(np.mean(a.layers["sd"] ** 2)) > float(np.mean(noise_only.layers["sd"] ** 2))


def test_run_without_noise_file_fits_it_on_its_validation_slides(
    tiny_cohort, trained_runs, noise_only_pred, tmp_path
):
    run = _copy_run(trained_runs["histoprism"], tmp_path / "old", drop=(keys.RUN_NOISE,))
    out = tmp_path / "pred"
    predict([run, run], tiny_cohort, ENCODER, out, uncertainty="ensemble", progress=False)
    for path in _files(out):
        pred = ad.read_h5ad(path)
        assert list(pred.uns[keys.UNS_HISTOPRISM]["uncertainty"]["noise_source"]) == ["cohort"] * 2
        want = ad.read_h5ad(noise_only_pred / path.name).layers["sd"]
        np.testing.assert_allclose(pred.layers["sd"], want, rtol=1e-4)

    def elsewhere(config):
        config["val_slides"] = ["not-in-this-cohort"]

    gone = _copy_run(run, tmp_path / "gone", edit=elsewhere)
    with pytest.raises(InputError, match=r"noise\.safetensors.*retrain") as err:
        predict(gone, tiny_cohort, ENCODER, tmp_path / "x", uncertainty="mc-dropout", passes=2)
    assert err.value.path == gone


# --- the noise model -------------------------------------------------------------------------------
def test_noise_fit_recovers_the_shape_of_simulated_counts():
    rng = np.random.default_rng(1)
    shapes, n = np.array([0.5, 3.0, 30.0]), 30_000
    fit = NoiseFit(len(shapes))
    mu = np.exp(rng.uniform(-2, 4, size=(n, 1)))  # means over two orders of magnitude
    grid = np.geomspace(mu.min(), mu.max(), 400)
    for g, r in enumerate(shapes):
        counts = rng.negative_binomial(r, r / (r + mu[:, 0]))
        # the exact E[log1p Y] of each spot's mean (interpolated on a fine grid of means)
        expect = np.interp(np.log(mu[:, 0]), np.log(grid), nb_log1p_moments(grid, r)[0])
        fit.add(
            torch.from_numpy(expect[:, None]).float(),
            torch.from_numpy(np.log1p(counts)[:, None]).float(),
            torch.tensor([g]),
        )
    got = fit.fit().shape
    np.testing.assert_allclose(np.log(got), np.log(shapes), atol=np.log(1.25))
    assert SHAPES[0] <= got.min() and got.max() <= SHAPES[-1]


def _nb_slides(rng, n_slides, shapes, *, depth_sd, n_spots=300):
    """Validation-like blocks (prediction, truth, cols, slide): per slide a depth offset
    delta_s ~ N(0, depth_sd²) that the prediction (E[log1p Y] at the spot's mean) cannot know,
    counts NB(mean e^delta_s mu, shape r_g). Returns the blocks and the offsets."""
    grid = np.geomspace(1e-3, 1e4, 600)
    expect = {r: nb_log1p_moments(grid, r)[0] for r in shapes}
    blocks, deltas = [], {}
    for s in range(n_slides):
        deltas[s] = float(rng.normal(0.0, depth_sd))
        mu = np.exp(rng.uniform(-1.5, 3.5, size=(n_spots, len(shapes))))
        truth = np.empty_like(mu)
        pred = np.empty_like(mu)
        for g, r in enumerate(shapes):
            m = mu[:, g] * np.exp(deltas[s])
            truth[:, g] = np.log1p(rng.negative_binomial(r, r / (r + m)))
            pred[:, g] = np.interp(np.log(mu[:, g]), np.log(grid), expect[r])
        cols = torch.arange(len(shapes))
        blocks.append((torch.from_numpy(pred).float(), torch.from_numpy(truth).float(), cols, s))
    return blocks, deltas


def test_slide_offsets_recover_each_slides_depth():
    rng = np.random.default_rng(5)
    blocks, deltas = _nb_slides(rng, 6, [2.0, 20.0], depth_sd=0.4, n_spots=2000)
    got = slide_offsets(blocks)
    for s, d in deltas.items():  # first order in delta: u(y) = d log1p(mu) / d log mu
        assert got[s] == pytest.approx(d, abs=0.06 + 0.15 * abs(d))


def test_intervals_cover_new_slides_whose_depth_is_unknown():
    rng = np.random.default_rng(7)
    shapes = [1.0, 5.0, 50.0]
    val, _ = _nb_slides(rng, 40, shapes, depth_sd=0.5)
    noise = fit_noise(lambda: iter(val), len(shapes), "train")
    assert noise.slide_var == pytest.approx(0.25, rel=0.4)  # 40 draws of N(0, 0.5²)
    # the shapes are those of the counts within a slide, the depth taken out
    np.testing.assert_allclose(np.log(noise.shape), np.log(shapes), atol=np.log(1.6))
    new, _ = _nb_slides(rng, 40, shapes, depth_sd=0.5)
    z = dict(zip(Z_LEVELS, noise.z, strict=True))
    for level in (0.5, 0.8, 0.95):
        hit = n = 0
        for pred, truth, cols, _ in new:
            sd = noise.variance(pred, noise.curves(cols.numpy())).sqrt()
            lo, hi = (pred - z[level] * sd).clamp(min=0), pred + z[level] * sd
            hit += int(((truth >= lo) & (truth <= hi)).sum())
            n += truth.numel()
        assert hit / n == pytest.approx(level, abs=0.04)
    # slide_var is the mean squared offset of the validation slides (a shared bias counts)
    offsets = np.array(list(slide_offsets(val).values()))
    assert noise.slide_var == pytest.approx(float(np.mean(offsets**2)))


@settings(max_examples=25, deadline=None)
@given(
    deltas=st.lists(st.floats(-1.5, 1.5), min_size=1, max_size=4),
    y=st.floats(0.2, 6.0),
)
def test_calibrated_z_gives_every_pair_every_slides_offset(deltas, y):
    """Counts that are their prediction moved by the slide's depth and nothing else: the
    offsets come back exactly, and the multipliers are the quantiles of |delta| u / sd over
    the 2K signed offsets (each pair takes them all: a new slide is like any of them)."""
    noise = NoiseModel(np.array([10.0]), np.array([np.nan]), np.array([0.0]))
    u = 1 - np.exp(-y)
    blocks = [
        (torch.full((50, 1), y), torch.full((50, 1), y + d * u), torch.tensor([0]), k)
        for k, d in enumerate(deltas)
    ]
    offsets = slide_offsets(blocks)
    np.testing.assert_allclose(list(offsets.values()), deltas, atol=2e-5)
    noise.slide_var = float(np.mean(np.square(deltas)))
    sd = float(noise.variance(torch.tensor([[y]]), noise.curves(slice(None)))[0, 0].sqrt())
    z = calibrate_z(noise, blocks, offsets)
    a = np.sort(np.abs(deltas)) * u / sd  # each |delta| twice (both signs), all pairs alike
    for level, zl in zip(Z_LEVELS, z, strict=True):
        inside = np.mean(np.abs(deltas) * u / sd <= zl + 2.5e-3)  # bins of 0.002
        assert inside >= level - 1e-9  # z reaches the level ...
        assert zl <= a.max() + 3e-3  # ... and never needs more than the largest offset


# --- calibration -----------------------------------------------------------------------------------
def _toy(rng, n=60, g=7, *, sd_scale=1.0):
    """A prediction with layers and its counts file: measured = Poisson around the mean."""
    mu = np.exp(rng.normal(1.0, 1.0, size=(n, g)))
    counts = rng.poisson(mu).astype(np.float32)
    X = np.log1p(mu).astype(np.float32)
    sd = (sd_scale * rng.uniform(0.2, 1.0, size=(n, g))).astype(np.float32)
    bounds = {
        name: np.maximum(X + norm.ppf(p) * sd, 0).astype(np.float32)
        for name, p in (("q025", 0.025), ("q10", 0.1), ("q90", 0.9), ("q975", 0.975))
    }
    genes = [f"G{i}" for i in range(g)]
    barcodes = [f"b{i}" for i in range(n)]
    pred = ad.AnnData(
        X, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes),
        layers={"sd": sd, **bounds},
    )  # fmt: skip
    perm = rng.permutation(n)  # the counts file holds the spots in another order
    truth = ad.AnnData(
        sp.csr_matrix(counts[perm]), obs=pd.DataFrame(index=np.array(barcodes)[perm]),
        var=pd.DataFrame(index=genes),
    )  # fmt: skip
    return pred, truth, np.log1p(counts)


def test_coverage_and_spearman_match_an_independent_count():
    rng = np.random.default_rng(3)
    tally = CalibrationTally()
    ys, preds = [], []
    for _ in range(2):
        pred, truth, y = _toy(rng)
        assert tally.add(pred, truth)
        ys.append(y)
        preds.append(pred)
    got = tally.summary()
    y = np.concatenate(ys)
    X = np.concatenate([p.X for p in preds])
    lay = {k: np.concatenate([p.layers[k] for p in preds]) for k in LAYERS}
    assert got["n_values"] == y.size and got["n_slides"] == 2
    assert got["coverage_80"] == pytest.approx(np.mean((y >= lay["q10"]) & (y <= lay["q90"])))
    assert got["coverage_95"] == pytest.approx(np.mean((y >= lay["q025"]) & (y <= lay["q975"])))
    z = norm.ppf(0.75)
    half = np.mean((y >= np.maximum(X - z * lay["sd"], 0)) & (y <= X + z * lay["sd"]))
    assert got["coverage_50"] == pytest.approx(half)
    assert got["mean_squared_z"] == pytest.approx(np.mean(((y - X) / lay["sd"]) ** 2), rel=1e-6)
    # Spearman per gene (over each slide's spots, mean over slides) and per spot (over genes)
    per_gene = np.mean(
        [
            [spearmanr(p.layers["sd"][:, j], np.abs(yy[:, j] - p.X[:, j]))[0] for j in range(7)]
            for p, yy in zip(preds, ys, strict=True)
        ],
        axis=0,
    )
    assert got["spearman_sd_error_per_gene"] == pytest.approx(per_gene.mean())
    err = np.abs(y - X)
    per_spot = [spearmanr(lay["sd"][i], err[i])[0] for i in range(len(y))]
    assert got["spearman_sd_error_per_spot"] == pytest.approx(np.mean(per_spot))
    assert [r["nominal"] for r in got["reliability"]] == list(LEVELS)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 3.0))
def test_gaussian_data_with_the_true_sd_is_covered_at_the_nominal_level(seed, scale):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(6, 10, size=8000) * scale  # far from 0: the clipping does not bite
    sd = rng.uniform(0.1, 1.0, size=mu.size) * scale
    y = mu + sd * rng.standard_normal(mu.size)
    for level in (0.5, 0.8, 0.95):
        hit = np.mean(inside(y, *central_interval(mu, sd, level)))
        assert abs(hit - level) < 0.03  # ~6 binomial sd at 8,000 values


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_coverage_is_monotone_in_the_nominal_level(seed):
    rng = np.random.default_rng(seed)
    pred, truth, _ = _toy(rng, n=30, g=4, sd_scale=float(rng.uniform(0.05, 3)))
    tally = CalibrationTally()
    tally.add(pred, truth)
    cover = tally.reliability()["coverage"].to_numpy()
    assert (np.diff(cover) >= 0).all() and 0 <= cover[0] and cover[-1] <= 1


def test_evaluate_writes_the_calibration_block(ensemble_pred, plain_pred, tiny_cohort, tmp_path):
    cohort = Cohort(tiny_cohort)
    metrics = evaluate(ensemble_pred, cohort, tmp_path / "eval", progress=False)
    cal = metrics["calibration"]
    assert cal["n_slides"] == len(cohort.ids("test")) and cal["n_values"] > 0
    for key in ("coverage_50", "coverage_80", "coverage_95"):
        assert 0 < cal[key] <= 1
    assert cal["coverage_50"] < cal["coverage_80"] < cal["coverage_95"]
    assert -1 <= cal["spearman_sd_error_per_gene"] <= 1
    assert -1 <= cal["spearman_sd_error_per_spot"] <= 1
    written = json.loads((tmp_path / "eval" / keys.EVAL_METRICS).read_text())
    assert written["calibration"] == cal
    table = pd.read_csv(tmp_path / "eval" / keys.EVAL_CALIBRATION)
    assert list(table["nominal"]) == list(LEVELS)
    assert table["coverage"].is_monotonic_increasing
    fig = reliability_diagram(cal)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    page = (tmp_path / "eval" / keys.EVAL_REPORT).read_text()
    assert '<h2 id="calibration">' in page and "coverage_80" in page  # the diagram and numbers
    # predictions without an sd: no block, no file
    metrics = evaluate(plain_pred, cohort, tmp_path / "plain", progress=False)
    assert "calibration" not in metrics
    assert not (tmp_path / "plain" / keys.EVAL_CALIBRATION).exists()
    assert 'id="calibration"' not in (tmp_path / "plain" / keys.EVAL_REPORT).read_text()


# --- refusals --------------------------------------------------------------------------------------
def test_unknown_method_and_bad_members_are_refused(tiny_cohort, trained_runs, tmp_path):
    run = trained_runs["histoprism"]
    out = tmp_path / "pred"
    with pytest.raises(InputError, match="uncertainty must be one of ensemble, mc-dropout"):
        predict(run, tiny_cohort, ENCODER, out, uncertainty="bootstrap")
    with pytest.raises(InputError, match="at least 2 runs"):
        predict(run, tiny_cohort, ENCODER, out, uncertainty="ensemble")
    with pytest.raises(InputError, match="mc-dropout takes one run"):
        predict([run, run], tiny_cohort, ENCODER, out, uncertainty="mc-dropout")

    def other_genes(config):
        config["genes"] = config["genes"][::-1]

    def other_encoder(config):
        config["encoder"] = "uni"

    for name, edit, match in (
        ("genes", other_genes, "other genes"),
        ("encoder", other_encoder, "'uni' embeddings"),
    ):
        bad = _copy_run(run, tmp_path / name, edit=edit)
        with pytest.raises(InputError, match=match) as err:
            predict([run, bad], tiny_cohort, ENCODER, out, uncertainty="ensemble")
        assert err.value.path == bad
    with pytest.raises(InputError, match="needs HistoPrism runs") as err:
        predict([run, trained_runs["mlp"]], tiny_cohort, ENCODER, out, uncertainty="ensemble")
    assert err.value.path == trained_runs["mlp"]
    with pytest.raises(InputError, match="not available with --output factorised"):
        predict([run, run], tiny_cohort, ENCODER, out, uncertainty="ensemble", output="factorised")
    assert not out.exists()  # no lock file, and no folder the failed command made
