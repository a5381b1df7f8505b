"""The HistoPrism training loop: TrainingData -> run directory (weights, config, history, a
resumable ``last`` checkpoint).

Single process, or ``torchrun --nproc-per-node P -m histoprism.cli train ...`` (DDP: slides sharded
by rank, gradients all-reduced, rank 0 writes). One slide per optimiser step, as the paper.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .._core import keys
from .._core.distributed import DistContext
from .._core.errors import InputError, first_line
from .._core.files import (
    atomic_directory,
    complete_directory,
    write_text_atomic,
)
from .._core.progress import progress_bar
from ..io.rundir import (
    load_optimizer,
    load_tensors,
    read_json_object,
    save_optimizer,
    save_run,
    save_tensors,
)
from ..models.inputs import (
    SlideTensors,
    context_vocabularies,
    feature_stats,
    gene_means,
    input_options,
    to_tensors,
)
from ..models.network import HistoPrism, ModelConfig
from ..models.noise import noise_from_model
from ..models.registry import FitOptions
from ..models.run import trunk_output
from .data import TrainingData, random_crop
from .recipes import TrainConfig, resolve_config
from .validation import RidgeReference, RunningMoments, ridge_reference

log = logging.getLogger(__name__)


# --- loss and schedule -----------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, slide: SlideTensors) -> torch.Tensor:
    """MSE over the slide's measured genes only: (1, N, G) prediction vs (N, G_m) target.
    (Training asks the model for the measured columns only, ``genes=target_cols``: the same loss.)"""
    return torch.mean((pred[0][:, slide.target_cols] - slide.target) ** 2)


def train_step(net, opt, inputs: dict, slide: SlideTensors, *, grad_clip: float = 0.0) -> float:
    """One optimiser step on one slide: ``masked_mse`` with the head computing the measured genes
    only (the loss ignores the others anyway), gradient norm clipped at ``grad_clip`` (0: off).
    ``inputs``: the model's keyword arguments. Returns the loss."""
    loss = torch.mean((net(**inputs, genes=slide.target_cols)[0] - slide.target) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return loss.item()


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# --- the loop --------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands; saved in ``last/state.json`` so a run resumes where it stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_val: float = math.inf  # validation loss at the best epoch
    best_score: float = math.inf  # the selection score at the best epoch (lower is better)
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best validation loss
    best_checked: float = math.nan  # validation r on the health check's genes at the best epoch


# The health check speaks after HEALTH_EPOCH (or the last epoch, if sooner) and at the end. Early,
# a healthy model is still below the ridge (58-93 % of its r after epoch 5 over the 8 robustness
# worlds) while a collapsed one is far below (26 %, world 3 with the paper's input site): it warns
# under HEALTH_EARLY_SHARE of the ridge's r. At the end it warns when the model is below the ridge
# by more than HEALTH_MARGIN, the spread of validation r between neighbouring late epochs.
HEALTH_EPOCH = 5


HEALTH_EARLY_SHARE = 0.5


HEALTH_MARGIN = 0.01


def health_message(model_r: float, ridge: RidgeReference, epoch: int, *, final: bool) -> str | None:
    """One line when the model's validation r is below the per-spot ridge's (``final``: by more
    than HEALTH_MARGIN; early: under HEALTH_EARLY_SHARE of it), else None."""
    floor = ridge.pearson - HEALTH_MARGIN if final else HEALTH_EARLY_SHARE * ridge.pearson
    if not model_r < floor:  # NaN (nothing to compare) is no alarm
        return None
    when = f"at the best epoch ({epoch})" if final else f"after epoch {epoch}"
    what = "is below" if final else "is less than half of"
    return (
        f"health check: validation r {model_r:.3f} {when} {what} a per-spot ridge's on the same "
        f"slides ({ridge.pearson:.3f}, {len(ridge.genes)} most variable genes): the model has "
        "learned less than the embeddings show (docs/recipes.md, 'Health check')"
    )


def train_histoprism(
    data: TrainingData,
    out: str | Path,
    *,
    model_overrides: dict | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Fit HistoPrism; write ``model.safetensors`` (best validation epoch), ``config.json``,
    ``history.csv`` and ``last/`` to ``out``. Returns ``out``."""
    out, cfg_t = Path(out), config or TrainConfig()
    ctx = DistContext.from_env()
    torch.manual_seed(cfg_t.seed)
    cfg = ModelConfig(
        in_dim=data.in_dim,
        n_genes=len(data.panel),
        n_conditions=len(data.vocab.codes),
        **(model_overrides or {}),
    )
    cfg = context_vocabularies(cfg, data.train + data.val)
    conv = dict(vocab=data.vocab, panel=data.panel, **input_options(cfg))
    train_t = [to_tensors(s, **conv) for s in data.train]
    val_t = [to_tensors(s, **conv) for s in data.val]
    model = _init_model(cfg, train_t).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg_t.lr, weight_decay=cfg_t.weight_decay)
    state, history = TrainState(), []
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    last = complete_directory(out / keys.RUN_LAST) if resume else None
    if last is not None:
        state, history, best = _load_last(last, model, opt)
        log.info("resuming %s after epoch %d", out, state.epoch)
    ridge = ridge_reference(train_t, val_t, cfg.n_genes, cfg.n_conditions, seed=cfg_t.seed)
    log.info("health check: per-spot ridge validation r %.3f", ridge.pearson)
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    steps_per_epoch = len(ctx.shard(train_t))
    schedule = dict(
        warmup=max(1, int(cfg_t.warmup_epochs * steps_per_epoch)),
        total=cfg_t.epochs * steps_per_epoch,
        floor=cfg_t.min_lr_ratio,
    )
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("training", total=cfg_t.epochs, completed=state.epoch, info="")
        for epoch in range(state.epoch, cfg_t.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(
                cfg_t.seed + epoch
            )  # dropout draws depend on the epoch: resume = rerun
            rng = np.random.default_rng(cfg_t.seed + epoch)
            order = [train_t[i] for i in rng.permutation(len(train_t))]
            train_loss = _train_epoch(
                net, opt, ctx.shard(order), state, cfg_t, schedule, rng, data, ctx
            )
            scores = _validate(model, val_t, ctx, ridge.genes)
            val_loss, val_r = scores.loss, scores.pearson
            state.epoch = epoch + 1
            score = -val_r if cfg_t.select_on == "pearson" else val_loss
            if score < state.best_score or state.best_epoch < 0:
                state.best_score, state.best_val = score, val_loss
                state.best_epoch, state.bad_epochs = epoch + 1, 0
                state.best_checked = scores.pearson_checked
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state.bad_epochs += 1
            if state.epoch == min(HEALTH_EPOCH, cfg_t.epochs) and ctx.main:
                warning = health_message(scores.pearson_checked, ridge, state.epoch, final=False)
                if warning:
                    log.warning(warning)
            history.append(
                dict(
                    epoch=epoch + 1,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    val_pearson=val_r,
                    val_pearson_checked=scores.pearson_checked,
                    ridge_val_pearson=ridge.pearson,
                    lr=opt.param_groups[0]["lr"],
                    seconds=time.perf_counter() - t0,
                )
            )
            if ctx.main:
                _save_last(out / keys.RUN_LAST, model, opt, best, state, history)
            bar.update(
                task, advance=1, info=f"train {train_loss:.4f}  val {val_loss:.4f}  r {val_r:.3f}"
            )
            if state.bad_epochs >= cfg_t.patience:
                break
    if ctx.main:
        warning = health_message(state.best_checked, ridge, state.best_epoch, final=True)
        if warning:
            log.warning(warning)
        model.load_state_dict(best)
        # again: a run resumed from its final checkpoint (killed just after it) trains no epoch
        write_history(out / keys.RUN_HISTORY, history)
        # count noise of the best weights on the validation slides: predict --uncertainty
        noise_from_model(model, val_t, ctx.device).save(out / keys.RUN_NOISE)
        config = _run_config(data, cfg, cfg_t, state)
        config["health"] = dict(
            ridge_val_pearson=ridge.pearson,
            ridge_alpha=ridge.alpha,
            val_pearson_checked=state.best_checked,
            genes_checked=len(ridge.genes),
            below_ridge=warning is not None,
        )
        save_run(out, config=config, tensors=best)
    if ctx.world > 1:
        dist.barrier()
    return out


def _init_model(cfg: ModelConfig, train_t: list[SlideTensors]) -> HistoPrism:
    """A fresh model whose output bias is each gene's training mean (fast, stable start)."""
    model = HistoPrism(cfg)
    with torch.no_grad():
        model.head_out.bias.copy_(gene_means(train_t, cfg.n_genes))
        if cfg.standardize_inputs:
            mean, std = feature_stats(train_t)
            model.feature_mean.copy_(mean)
            model.feature_std.copy_(std)
    return model


def _train_epoch(net, opt, slides, state, cfg_t, schedule, rng, data, ctx) -> float:
    net.train()
    total = 0.0
    # crops draw from their own stream, so that a slide small enough to need none trains exactly
    # as without cropping; seeded by epoch (resume = rerun) and rank (other slides, other crops)
    crop_rng = np.random.default_rng([cfg_t.seed, state.epoch, ctx.rank, 1])
    for s in slides:
        for g in opt.param_groups:
            g["lr"] = cfg_t.lr * lr_factor(state.step, **schedule)
        s = _target_on(random_crop(s, cfg_t.crop_spots, crop_rng), ctx.device)
        inputs = s.model_inputs(ctx.device)
        if rng.random() < cfg_t.condition_dropout:
            inputs["condition"] = torch.full_like(inputs["condition"], data.vocab.unknown)
        total += train_step(net, opt, inputs, s, grad_clip=cfg_t.grad_clip)
        state.step += 1
    loss_sum, n = ctx.all_sum([total, float(len(slides))])
    return loss_sum / max(n, 1)


VAL_CHUNK_BYTES = 64 * 2**20  # one (spots, genes) float32 block of a validation prediction


@dataclass
class Validation:
    loss: float  # mean masked MSE over validation slides
    pearson: float  # mean per-gene Pearson r over (slide, gene) pairs
    pearson_checked: float  # the same over the health check's genes only


@torch.no_grad()
def _validate(
    model: HistoPrism, slides: list[SlideTensors], ctx: DistContext, check: torch.Tensor
) -> Validation:
    """Scores of the model on the validation slides (``check``: the health check's panel columns).

    Whole slides, no crop; the head runs over blocks of spots, so that no (N, G) prediction is
    held at once, and the per-gene co-moments of the Pearson r are pooled in float64.
    """
    model.eval()
    loss, r_sum, r_n, c_sum, c_n = 0.0, 0.0, 0.0, 0.0, 0.0
    mine = slides[ctx.rank :: ctx.world]
    checked = set(check.tolist())
    for s in mine:
        h = trunk_output(model, s, ctx.device)  # (N, H)
        cols, y = s.target_cols.to(ctx.device), s.target.to(ctx.device)
        step = max(1, VAL_CHUNK_BYTES // (4 * len(cols)))
        acc = RunningMoments()
        for i in range(0, s.n_spots, step):
            acc.add(model.head(h[i : i + step], cols), y[i : i + step])
        loss += float(acc.sq_err.sum()) / y.numel()  # the slide's correlation.mse, summed on device
        r = acc.pearson()
        r_sum, r_n = r_sum + float(r.nansum()), r_n + float((~r.isnan()).sum())
        rc = r[[c in checked for c in s.target_cols.tolist()]]
        c_sum, c_n = c_sum + float(rc.nansum()), c_n + float((~rc.isnan()).sum())
    loss, n, r_sum, r_n, c_sum, c_n = ctx.all_sum([loss, float(len(mine)), r_sum, r_n, c_sum, c_n])
    return Validation(loss / max(n, 1), r_sum / max(r_n, 1), c_sum / c_n if c_n else math.nan)


def _target_on(s: SlideTensors, device: torch.device) -> SlideTensors:
    if device.type == "cpu":
        return s
    return replace(s, target=s.target.to(device), target_cols=s.target_cols.to(device))


def _run_config(
    data: TrainingData, cfg: ModelConfig, cfg_t: TrainConfig, state: TrainState
) -> dict:
    return dict(
        model="histoprism",
        model_config=cfg.to_dict(),
        train_config=cfg_t.to_dict(),
        encoder=data.encoder,
        in_dim=cfg.in_dim,
        genes=list(data.panel.genes),
        cancers=list(data.vocab.codes),
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val,
        epochs_run=state.epoch,
        train_slides=[s.id for s in data.train],
        val_slides=[s.id for s in data.val],
    )


# --- resumable checkpoint: ``last/`` (model, best, optimizer, state.json, history so far) --------
# written whole into a fresh sibling and swapped in (files.atomic_directory): a kill leaves the
# complete previous or new checkpoint, never one epoch's weights with another's state. The RNGs
# need no saving: every epoch reseeds torch and numpy from seed + epoch.
LAST_STATE = "state.json"


LAST_TENSORS = ("model.safetensors", "best.safetensors", "optimizer.safetensors")


def _save_last(last: Path, model, opt, best, state: TrainState, history: list[dict]) -> None:
    """Write the resumable checkpoint ``last`` as one unit, then the users' ``history.csv`` next
    to it (resume reads the checkpoint's own copy)."""
    with atomic_directory(last) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_tensors(tmp / "best.safetensors", best)
        groups = save_optimizer(tmp / "optimizer.safetensors", opt)
        write_history(tmp / keys.RUN_HISTORY, history)
        meta = {"state": asdict(state), "param_groups": groups}
        write_text_atomic(tmp / LAST_STATE, json.dumps(meta, indent=1))
    write_history(last.parent / keys.RUN_HISTORY, history)


def _load_last(last: Path, model, opt) -> tuple[TrainState, list[dict], dict[str, torch.Tensor]]:
    """Restore ``model`` and ``opt`` from a checkpoint; return its state, history and best
    weights. A damaged or mismatching checkpoint is an InputError naming it."""
    for name in (LAST_STATE, *LAST_TENSORS):  # never so when written by _save_last
        if not (last / name).is_file():
            raise InputError(f"incomplete checkpoint: no {name} (train without --resume)", last)
    meta = read_json_object(last / LAST_STATE)
    weights = load_tensors(last / "model.safetensors")
    try:
        state = TrainState(**meta["state"])
        model.load_state_dict(weights)
        load_optimizer(last / "optimizer.safetensors", opt, meta["param_groups"])
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # another model, config, format
        # load_state_dict's first line only announces its list of mismatches: quote the first
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[:2]) if lines and lines[0].endswith(":") else first_line(exc)
        raise InputError(f"cannot resume from this checkpoint ({detail})", last) from exc
    best = load_tensors(last / "best.safetensors")
    # checkpoints written before the history moved into last/ kept it next to last/ only
    hist_path = last / keys.RUN_HISTORY
    if not hist_path.exists():
        hist_path = last.parent / keys.RUN_HISTORY
    try:
        history = _read_history(hist_path) if hist_path.exists() else []
    except (KeyError, ValueError) as exc:
        raise InputError(f"damaged training history ({first_line(exc)})", hist_path) from exc
    return state, history[: state.epoch], best


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    lines = [",".join(history[0])] + [",".join(f"{v}" for v in row.values()) for row in history]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _read_history(path: Path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in rows]


def fit_histoprism(data: TrainingData, out: Path, options: FitOptions) -> Path:
    """The registry's fit for ``histoprism``: the recipe ``options.config`` plus the options."""
    m_over, t_over = resolve_config(options.config)
    if not options.conditioning:
        m_over["conditioning"] = False
    if options.positional_encoding:
        m_over["positional_encoding"] = True
    given = dict(attention=options.attention, attention_radius_um=options.attention_radius_um)
    m_over.update({k: v for k, v in given.items() if v is not None})
    try:
        ModelConfig(**m_over)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if options.crop_spots is not None:
        t_over["crop_spots"] = options.crop_spots
    epochs = {} if options.epochs is None else {"epochs": options.epochs}
    t_cfg = TrainConfig(**{**t_over, "seed": options.seed, **epochs})
    return train_histoprism(
        data, out, model_overrides=m_over, config=t_cfg, resume=options.resume,
        progress=options.progress,
    )  # fmt: skip
