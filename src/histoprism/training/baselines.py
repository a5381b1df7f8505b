"""Fitting the baselines (ridge, ridge + kNN, per-spot MLP) into run directories; the fitted
models themselves live in ``histoprism.models.baselines``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..io.rundir import (
    save_run,
)
from ..models.baselines import MLPBaseline, RidgeBaseline
from ..models.registry import FitOptions
from .data import TrainingData

log = logging.getLogger(__name__)


def save_baseline(
    data: TrainingData, out: Path, options: FitOptions, extra: dict, tensors: dict
) -> Path:
    """Write a fitted baseline's run directory: its tensors and the shared run config."""
    run_config = dict(
        model=options.model,
        baseline=extra,
        encoder=data.encoder,
        in_dim=data.in_dim,
        genes=list(data.panel.genes),
        cancers=list(data.vocab.codes),
        seed=options.seed,
        train_slides=[s.id for s in data.train],
        val_slides=[s.id for s in data.val],
    )
    return save_run(out, config=run_config, tensors=tensors)


def fit_ridge(data: TrainingData, out: Path, options: FitOptions, *, knn: int) -> Path:
    """The registry's fit for ``ridge`` (knn 0) and ``ridge-knn`` (knn 8): a run directory."""
    ridge = RidgeBaseline(panel=data.panel, knn=knn, seed=options.seed).fit(data.train)
    return save_baseline(data, out, options, {"knn": knn}, ridge.tensors())


def fit_mlp(data: TrainingData, out: Path, options: FitOptions) -> Path:
    """The registry's fit for ``mlp`` (60 epochs unless ``options.epochs``): a run directory."""
    epochs = 60 if options.epochs is None else options.epochs
    mlp = MLPBaseline(panel=data.panel, vocab=data.vocab, seed=options.seed, epochs=epochs)
    mlp.fit(data.train, data.val)
    return save_baseline(data, out, options, {"hidden": mlp.hidden}, mlp.tensors())
