"""Measured spots as a prompt: ``train --init RUN --prompt`` and ``predict --prompt-fraction``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.cli import app
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.io.rundir import load_run
from histoprism.models.prompt import (
    PromptConfig,
    PromptHead,
    measured_spots,
    prompt_graph,
    prompted_predictor,
)
from histoprism.models.run import load
from histoprism.training.api import train
from histoprism.training.data import load_training_data
from histoprism.training.prompt import fit_prompt

ENCODER = "synthetic"


@pytest.fixture(scope="module")
def prompt_run(tiny_cohort, trained_runs, tmp_path_factory) -> Path:
    data = load_training_data(Cohort(tiny_cohort), ENCODER, genes=tuple(
        load_run(trained_runs["histoprism"])[0]["genes"]))  # fmt: skip
    out = tmp_path_factory.mktemp("prompt") / "run"
    return fit_prompt(
        trained_runs["histoprism"], data, out, config=PromptConfig(steps=20, val_every=10),
        progress=False,
    )  # fmt: skip


@given(n=st.integers(1, 500), fraction=st.floats(0, 1), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_measured_spots_count_and_determinism(n, fraction, seed):
    mask = measured_spots(n, fraction, seed=seed, slide_id="S1")
    expected = 0 if fraction == 0 else min(n, max(1, round(fraction * n)))
    assert mask.shape == (n,) and mask.sum() == expected
    assert np.array_equal(mask, measured_spots(n, fraction, seed=seed, slide_id="S1"))


def test_measured_spots_differ_between_slides_and_refuse_bad_fractions():
    a = measured_spots(400, 0.1, seed=0, slide_id="A")
    assert not np.array_equal(a, measured_spots(400, 0.1, seed=0, slide_id="B"))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        measured_spots(10, 1.5, seed=0, slide_id="A")


@given(n=st.integers(2, 60), k=st.integers(1, 20), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_prompt_graph_never_points_a_spot_at_itself(n, k, seed):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1000, size=(n, 2))
    measured = rng.random(n) < 0.4
    measured[rng.integers(n)] = True
    where = np.flatnonzero(measured)
    g = prompt_graph(coords, measured, k)
    assert g.keys.shape == (n, min(k, len(where)))
    keys_ = where[g.keys.numpy()]
    valid = g.valid.numpy()
    assert not (keys_ == np.arange(n)[:, None])[valid].any()
    # every unmeasured spot sees min(k, M) measured spots; a measured one one fewer at most
    counts = valid.sum(1)
    assert (counts[~measured] == min(k, len(where))).all()
    assert (counts[measured] >= min(k, len(where) - 1)).all()
    d = np.where(valid, g.distance.numpy(), np.inf)
    assert (np.diff(d, axis=1)[valid[:, 1:]] >= -1e-6).all()  # nearest first


def test_weights_are_a_partial_distribution():
    rng = np.random.default_rng(0)
    coords, measured = rng.uniform(0, 500, (50, 2)), rng.random(50) < 0.3
    head = PromptHead(8, 5, 4, 6)
    hidden = torch.randn(50, 8)
    g = prompt_graph(coords, measured, 6)
    w = head.weights(hidden, torch.from_numpy(np.flatnonzero(measured)), g)
    assert (w >= 0).all() and (w.sum(1) < 1).all()
    assert (w[~g.valid] == 0).all()


def test_prompt_run_keeps_the_image_model(prompt_run, trained_runs):
    config, tensors = load_run(prompt_run)
    _, original = load_run(trained_runs["histoprism"])
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[k], original[k]) for k in tensors)
    assert config["prompt"]["best_step"] in {h["step"] for h in config["prompt"]["history"]}
    head = load_file(str(prompt_run / keys.RUN_PROMPT))
    assert head["gain_logit"].shape == (len(config["genes"]),)


def test_no_measured_spot_is_the_image_model_exactly(prompt_run, tiny_cohort):
    run = load(prompt_run)
    slide = Cohort(tiny_cohort).slide(Cohort(tiny_cohort).ids("test")[0], ENCODER)
    image = run.predictor.predict_genes(run.predictor.prepare(slide), slice(None))
    p = prompted_predictor(run, 0.0)
    assert np.array_equal(p.predict_genes(p.prepare(slide), slice(None)), image)
    q = prompted_predictor(run, 0.3)
    assert not np.allclose(q.predict_genes(q.prepare(slide), slice(None)), image)


def test_a_slide_without_counts_is_predicted_from_the_image(prompt_run, tiny_cohort):
    run = load(prompt_run)
    slide = Cohort(tiny_cohort).slide(Cohort(tiny_cohort).ids("test")[0], ENCODER)
    image = run.predictor.predict_genes(run.predictor.prepare(slide), slice(None))
    p = prompted_predictor(run, 0.3)
    prepared = p.prepare(replace(slide, counts=None, genes=None))
    assert not prepared.mask.any()
    assert np.array_equal(p.predict_genes(prepared, slice(None)), image)


def test_only_the_measured_spots_counts_are_read(prompt_run, tiny_cohort):
    """Changing an unmeasured spot's counts changes nothing; a measured spot's counts move the
    prediction of the others but not its own (it never sees itself)."""
    run = load(prompt_run)
    slide = Cohort(tiny_cohort).slide(Cohort(tiny_cohort).ids("test")[0], ENCODER)
    p = prompted_predictor(run, 0.2, seed=1)
    mask = p.measured(slide)
    before = p.predict_genes(p.prepare(slide), slice(None))
    for row, changes in ((np.flatnonzero(~mask)[0], False), (np.flatnonzero(mask)[0], True)):
        counts = slide.counts.tolil(copy=True)
        counts[row] = counts[row].toarray() * 5 + 7
        after = p.predict_genes(p.prepare(replace(slide, counts=counts.tocsr())), slice(None))
        assert np.array_equal(np.delete(after, row, 0), np.delete(before, row, 0)) != changes
        assert np.array_equal(after[row], before[row]) or not changes


def test_cli_prompt_end_to_end(prompt_run, tiny_cohort, trained_runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tiny_cohort), "--encoder", ENCODER,
        "--out", str(out), "--init", str(trained_runs["histoprism"]), "--prompt"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "prompt head on" in result.stdout and (out / keys.RUN_PROMPT).exists()
    pred = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--model", str(prompt_run), "--data",
        str(tiny_cohort), "--encoder", ENCODER, "--out", str(pred), "--prompt-fraction", "0.25"])  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(pred.glob("*.h5ad"))
    assert files
    counts = {}
    for f in files:
        a = ad.read_h5ad(f)
        mask = a.obs[keys.OBS_PROMPT].to_numpy(dtype=bool)
        assert mask.sum() == round(0.25 * a.n_obs)
        assert a.uns[keys.UNS_HISTOPRISM]["prompt"]["fraction"] == 0.25
        counts[f.stem] = (a.n_obs, int(mask.sum()))
    ev = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--pred", str(pred), "--data", str(tiny_cohort),
                                 "--out", str(ev)])  # fmt: skip
    assert result.exit_code == 0, result.output
    per_slide = pd.read_csv(ev / "per_slide.csv", index_col="sample_id")
    for sid, (n, m) in counts.items():  # the measured spots are not scored
        assert per_slide.loc[sid, "n_spots_matched"] == n - m


def test_prompt_refusals(tiny_cohort, trained_runs, tmp_path):
    with pytest.raises(InputError, match="--init"):
        train(tiny_cohort, ENCODER, tmp_path / "a", prompt=True, progress=False)
    with pytest.raises(InputError, match="gene panel"):
        train(tiny_cohort, ENCODER, tmp_path / "b", init=trained_runs["histoprism"], prompt=True,
              genes=tmp_path / "g.txt", progress=False)  # fmt: skip
    with pytest.raises(InputError, match="no prompt head"):
        predict(trained_runs["histoprism"], tiny_cohort, ENCODER, tmp_path / "p",
                prompt_fraction=0.1, progress=False)  # fmt: skip
    with pytest.raises(InputError, match="HistoPrism run"):
        predict(trained_runs["ridge"], tiny_cohort, ENCODER, tmp_path / "q",
                prompt_fraction=0.1, progress=False)  # fmt: skip
    with pytest.raises(InputError, match="dense"):
        predict(trained_runs["histoprism"], tiny_cohort, ENCODER, tmp_path / "s",
                prompt_fraction=0.1, output="factorised", progress=False)  # fmt: skip
    with pytest.raises(InputError, match="cannot be combined"):
        predict(trained_runs["histoprism"], tiny_cohort, ENCODER, tmp_path / "r",
                prompt_fraction=0.1, uncertainty="mc-dropout", progress=False)  # fmt: skip
