"""Validation Pearson and the training health check (per-spot ridge reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histoprism.expression.correlation import mse, pearson_per_gene, squared_error
from histoprism.models.inputs import SlideTensors
from histoprism.training.loop import health_message, masked_mse
from histoprism.training.validation import (
    RidgeReference,
    RunningMoments,
    block_pearson,
    check_genes,
    mean_pearson,
    pearson_on_genes,
    ridge_reference,
)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, (12, 3), elements=st.floats(-1e3, 1e3)),
    arrays(np.float64, (12, 3), elements=st.floats(-1e3, 1e3)),
)
def test_block_pearson_matches_numpy(p: np.ndarray, t: np.ndarray) -> None:
    r = block_pearson(torch.from_numpy(p), torch.from_numpy(t)).numpy()
    for g in range(3):
        if np.ptp(p[:, g]) < 1e-6 * (1 + np.abs(p[:, g]).max()) or np.ptp(t[:, g]) < 1e-6 * (
            1 + np.abs(t[:, g]).max()
        ):
            continue  # (near-)constant columns: NaN by rule, numpy is unstable there
        assert abs(r[g] - np.corrcoef(p[:, g], t[:, g])[0, 1]) < 1e-6


@settings(max_examples=60, deadline=None)
@given(
    # float32 values, as a model predicts: squares of 1e-160 would be float64 subnormals,
    # whose rounding no two summation orders share
    arrays(np.float64, (9, 4), elements=st.floats(-50, 50, width=32)),
    arrays(np.float64, (9, 4), elements=st.floats(-50, 50, width=32)),
    st.floats(-1e3, 1e3),
)
def test_training_and_evaluation_share_one_pearson(p, t, c) -> None:
    """Validation r pooled over blocks equals the evaluator's from whole columns, constant
    columns (here column 0 of the prediction, at any level c) included: NaN in both."""
    p[:, 0] = c
    running = RunningMoments()
    for block in (slice(0, 2), slice(2, 3), slice(3, 9)):  # the loop pools blocks of spots
        running.add(torch.from_numpy(p[block]), torch.from_numpy(t[block]))
    reference = pearson_per_gene(p, t)
    assert math.isnan(float(running.pearson()[0])) and math.isnan(reference[0])
    np.testing.assert_allclose(running.pearson().numpy(), reference, atol=1e-6, equal_nan=True)


def test_nearly_constant_columns_do_not_cancel() -> None:
    """Deviations of 1e-4 around 50 (the raw-sums formula lost them: -1.0 for -0.99994)."""
    t = np.array([50.0, 50.0001, 50.0, 49.9999, 50.0002, 50.0, 49.9998, 50.0001, 50.0])
    p = -t + np.array([0, 0, 0, 0, 0, 0, 0, 0, 1e-5])
    running = RunningMoments().add(torch.from_numpy(p[:4, None]), torch.from_numpy(t[:4, None]))
    running.add(torch.from_numpy(p[4:, None]), torch.from_numpy(t[4:, None]))
    reference = np.corrcoef(p, t)[0, 1]
    assert reference > -0.9999 and float(running.pearson()[0]) == pytest.approx(reference, abs=1e-9)


def test_constant_column_is_nan_and_skipped_by_the_mean() -> None:
    p = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 5.0], [4.0, 1.0]])
    r = block_pearson(p, t)
    assert math.isnan(float(r[1])) and float(r[0]) > 0.95
    assert mean_pearson([r]) == float(r[0])
    assert float(RunningMoments().add(p, t).sq_err[0]) == float(((p[:, 0] - t[:, 0]) ** 2).sum())


def _slide(rng, n, d, w, cancer, cols=None, noise=0.5) -> SlideTensors:
    """Expression linear in the embedding plus a per-cancer shift, measured at ``cols``."""
    x = rng.normal(size=(n, d))
    y = x @ w + 2.0 * cancer + rng.normal(0, noise, (n, w.shape[1]))
    cols = np.arange(w.shape[1]) if cols is None else np.asarray(cols)
    return SlideTensors(
        id=f"S{cancer}{n}",
        cancer=str(cancer),
        condition=cancer,
        features=torch.tensor(x, dtype=torch.float32),
        coords_um=torch.zeros(n, 2),
        neighbours=None,
        target=torch.tensor(y[:, cols], dtype=torch.float32),
        target_cols=torch.tensor(cols),
    )


def test_ridge_reference_recovers_a_linear_world_and_its_targeted_slides() -> None:
    rng = np.random.default_rng(0)
    d, g = 8, 12
    w = rng.normal(size=(d, g))
    train = [_slide(rng, 200, d, w, c % 2) for c in range(4)]
    train.append(_slide(rng, 200, d, w, 1, cols=[0, 3, 5]))  # a targeted panel
    val = [_slide(rng, 150, d, w, c) for c in (0, 1)]
    ref = ridge_reference(train, val, n_genes=g, n_conditions=3)
    # noise sd 0.5 against signal sd ~2.8: r ~ 0.98 for a correct fit
    assert ref.pearson > 0.95 and len(ref.genes) == g
    # a useless "model" scores far below it on the same genes
    zeros = pearson_on_genes(lambda s, pos: torch.randn(s.n_spots, len(pos)), val, ref.genes)
    assert abs(mean_pearson(zeros)) < 0.2


def test_check_genes_prefers_variable_genes_measured_by_most_slides() -> None:
    rng = np.random.default_rng(1)
    slides = []
    for i in range(4):
        y = rng.normal(size=(50, 4)) * np.array([0.1, 3.0, 1.0, 5.0])
        cols = np.array([0, 1, 2, 3]) if i < 1 else np.array([0, 1, 2])  # gene 3: 1 slide of 4
        slides.append(
            SlideTensors(
                id=str(i),
                cancer="A",
                condition=0,
                features=torch.zeros(50, 2),
                coords_um=torch.zeros(50, 2),
                neighbours=None,
                target=torch.tensor(y[:, : len(cols)], dtype=torch.float32),
                target_cols=torch.tensor(cols),
            )
        )
    assert check_genes(slides, 4, k=2).tolist() == [1, 2]  # not 3 (rarely measured), not 0


def test_health_message_only_below_the_ridge() -> None:
    ref = RidgeReference(pearson=0.3, alpha=1.0, genes=torch.arange(5))
    for final in (False, True):
        assert health_message(0.31, ref, 5, final=final) is None
        assert health_message(float("nan"), ref, 5, final=final) is None
        line = health_message(0.01, ref, 5, final=final)
        assert line is not None and "0.010" in line and "0.300" in line and "\n" not in line
    # early, a model still learning (0.2 of 0.3) is no alarm; a collapsed one (0.12) is
    assert health_message(0.2, ref, 5, final=False) is None
    assert health_message(0.12, ref, 5, final=False) is not None
    # at the end, within the margin is no alarm; clearly below is
    assert health_message(0.295, ref, 40, final=True) is None
    assert "best epoch (40)" in health_message(0.28, ref, 40, final=True)


def test_mse_over_measured_genes_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(7, 5)).astype(np.float32)  # (N, G): the whole panel
    cols = np.array([0, 2, 3])  # the genes the slide measured
    truth = rng.normal(size=(7, 3)).astype(np.float32)  # (N, G_m)
    direct = float(np.mean((pred[:, cols].astype(np.float64) - truth) ** 2))
    assert mse(pred, truth, cols) == pytest.approx(direct, rel=1e-12)
    assert mse(pred[:, cols], truth) == pytest.approx(direct, rel=1e-12)
    # unmeasured genes do not count, whatever the prediction there
    wild = pred.copy()
    wild[:, [1, 4]] = 1e6
    assert mse(wild, truth, cols) == pytest.approx(direct, rel=1e-12)
    total, n = squared_error(pred, truth, cols)
    assert n == 21 and total == pytest.approx(direct * 21, rel=1e-12)
    # pooled over slides: sums and counts add
    a, b = squared_error(pred[:3], truth[:3], cols), squared_error(pred[3:], truth[3:], cols)
    assert (a[0] + b[0]) / (a[1] + b[1]) == pytest.approx(direct, rel=1e-12)
    assert math.isnan(mse(np.zeros((0, 5)), np.zeros((0, 0)), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError):
        squared_error(pred, truth)


def test_torch_squared_error_sums_agree_with_correlation_mse() -> None:
    """The validation loss (RunningMoments.sq_err, on device) and the training loss are the same
    definition as correlation.mse."""
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(9, 6))
    cols = np.array([1, 2, 5])
    truth = rng.normal(size=(9, 3))
    sq_err = RunningMoments().add(torch.from_numpy(pred[:, cols]), torch.from_numpy(truth)).sq_err
    assert float(sq_err.sum()) / truth.size == pytest.approx(mse(pred, truth, cols), rel=1e-12)
    slide = SlideTensors(
        id="s",
        cancer="IDC",
        condition=0,
        features=torch.zeros(9, 2),
        coords_um=torch.zeros(9, 2),
        neighbours=None,
        target=torch.from_numpy(truth),
        target_cols=torch.from_numpy(cols),
    )
    loss = float(masked_mse(torch.from_numpy(pred)[None], slide))
    assert loss == pytest.approx(mse(pred, truth, cols), rel=1e-12)
