"""Fitting the prompt head (``train --init RUN --prompt``): the frozen HistoPrism's residuals on
measured spots, carried to the unmeasured ones (the head and predictor: ``histoprism.models.prompt``).

Training masks random spots of the training slides (a fraction drawn log-uniformly in
``FRACTIONS``, as STPath masks spots) and maximises the mean per-gene Pearson r of the spots left
unmeasured (what evaluation scores); the head with the best mean per-gene Pearson r of the
unmeasured validation spots (over ``VAL_FRACTIONS``) is kept.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path
from ..io.rundir import load_run, save_run
from ..models.inputs import SlideTensors, input_options, to_tensors
from ..models.prompt import (
    PromptConfig,
    PromptHead,
    corrected,
    head_state,
    linear_part,
    measured_spots,
    prompt_graph,
)
from ..models.run import load_network, trunk_output
from .validation import block_pearson

log = logging.getLogger(__name__)

FRACTIONS = (0.01, 0.3)  # training: share of measured spots, drawn log-uniformly in this range
VAL_FRACTIONS = (0.01, 0.05, 0.2)  # validation: the head is chosen on these shares


@dataclass
class _PromptSlide:
    hidden: torch.Tensor  # (N, H)
    linear: torch.Tensor  # (N, G_m) image-only linear output of the measured genes
    target: torch.Tensor  # (N, G_m)
    cols: torch.Tensor  # (G_m,) their panel columns
    coords_um: np.ndarray
    id: str


def _prompt_slides(model, slides: list[SlideTensors]) -> list[_PromptSlide]:

    out = []
    for s in slides:
        h = trunk_output(model.eval(), s)
        with torch.no_grad():
            linear = linear_part(model, h, s.target_cols)
        out.append(
            _PromptSlide(
                h, linear, s.target, s.target_cols, s.coords_um.numpy().astype(np.float64), s.id
            )
        )
    return out


def _masked_prediction(head: PromptHead, s: _PromptSlide, measured: np.ndarray) -> torch.Tensor:
    """(U, G_m) prediction of the unmeasured spots given the measured ones."""
    graph = prompt_graph(s.coords_um, measured, head.neighbours)
    rows = torch.from_numpy(np.flatnonzero(measured))
    w = head.weights(s.hidden, rows, graph)
    pred = corrected(head, w, graph, s.linear, rows, s.target[rows], s.cols).clamp(min=0)
    return pred[torch.from_numpy(~measured)]


def _pearson_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean per-gene Pearson r over the rows, differentiable; genes constant in either: left out."""
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    sp, st = p.square().sum(0), t.square().sum(0)
    ok = (sp > 1e-12) & (st > 1e-12)
    return ((p * t).sum(0)[ok] / (sp[ok] * st[ok]).sqrt()).mean()


def unmeasured_pearson(
    head: PromptHead, slides: list[_PromptSlide], seed: int, *, gain: bool = True
) -> float:
    """Mean per-gene Pearson r over the unmeasured spots of ``slides``, averaged over the
    ``VAL_FRACTIONS`` (one draw of measured spots each, fixed by ``seed``); ``gain`` False
    scores the image-only prediction of the same spots."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in VAL_FRACTIONS:
            for s in slides:
                measured = measured_spots(len(s.hidden), f, seed=seed, slide_id=s.id)
                truth = s.target[torch.from_numpy(~measured)]
                pred = (
                    _masked_prediction(head, s, measured)
                    if gain
                    else s.linear[torch.from_numpy(~measured)].clamp(min=0)
                )
                r = block_pearson(pred, truth)
                total, count = total + float(r.nansum()), count + int((~r.isnan()).sum())
    return total / count if count else math.nan


def fit_prompt(
    init: str | Path, data, out: str | Path, *, config: PromptConfig | None = None,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Fit a prompt head to the frozen HistoPrism run ``init`` on ``data`` (``TrainingData`` of
    its panel) and write ``out``: the run's files unchanged plus ``prompt.safetensors`` and a
    ``prompt`` entry in ``config.json``. Returns ``out``."""
    config = config or PromptConfig()

    t_start = time.perf_counter()
    init_config, model = load_network(init, data.encoder)
    if list(init_config["genes"]) != list(data.panel.genes):
        raise InputError("a prompt head corrects the run's own gene panel: give data of that panel")
    vocab = type(data.vocab)(tuple(init_config["cancers"]))
    conv = dict(vocab=vocab, panel=data.panel, unknown_cancer=True, **input_options(model.cfg))
    train = _prompt_slides(model, [to_tensors(s, **conv) for s in data.train])
    val = _prompt_slides(model, [to_tensors(s, **conv) for s in data.val])
    if not val:
        raise InputError("--prompt chooses its head on validation slides: the split has none")
    torch.manual_seed(config.seed)
    head = PromptHead(model.cfg.hidden, model.cfg.n_genes, config.key_dim, config.neighbours)
    opt = torch.optim.Adam(head.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    lo, hi = np.log(FRACTIONS[0]), np.log(FRACTIONS[1])
    image_only = unmeasured_pearson(head, val, config.seed, gain=False)
    best_r = unmeasured_pearson(head, val, config.seed)
    best, best_step, history = head_state(head), 0, [dict(step=0, val_pearson=best_r)]
    for step in range(1, config.steps + 1):
        s = train[rng.integers(len(train))]
        measured = measured_spots(
            len(s.hidden), float(np.exp(rng.uniform(lo, hi))), seed=int(rng.integers(2**31)),
            slide_id=s.id,
        )  # fmt: skip
        if measured.all():
            continue
        pred = _masked_prediction(head, s, measured)
        loss = -_pearson_loss(pred, s.target[torch.from_numpy(~measured)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.val_every == 0 or step == config.steps:
            r = unmeasured_pearson(head, val, config.seed)
            history.append(dict(step=step, val_pearson=r, train_loss=loss.item()))
            if progress:
                log.info("prompt step %d: unmeasured validation r %.4f", step, r)
            if r > best_r:
                best_r, best, best_step = r, head_state(head), step
    out = Path(out)
    config_out, tensors = load_run(init)
    config_out = dict(
        config_out,
        init_from=str(Path(init).resolve()),
        prompt=dict(
            method="residuals of the measured spots, attention over the nearest measured spots",
            config=config.to_dict(),
            best_step=best_step,
            val_pearson_unmeasured=best_r,
            val_pearson_image_only=image_only,
            val_fractions=list(VAL_FRACTIONS),
            history=history,
            seconds=time.perf_counter() - t_start,
        ),
    )
    save_run(out, config=config_out, tensors=tensors)
    with atomic_path(out / keys.RUN_PROMPT) as tmp:
        save_file(best, str(tmp))
    if (Path(init) / keys.RUN_NOISE).exists():  # the image-only model's count noise: unchanged
        with atomic_path(out / keys.RUN_NOISE) as tmp:
            shutil.copyfile(Path(init) / keys.RUN_NOISE, tmp)
    return out
