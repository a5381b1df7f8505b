"""Training: cohort -> run directory (weights, config, history, resumable ``last`` checkpoint).

Single process, or ``torchrun --nproc-per-node P -m histoprism.cli train ...`` (DDP: slides sharded
by rank, gradients all-reduced, rank 0 writes). One slide per optimiser step, as the paper.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .._core import keys
from .._core.distributed import DistContext, torchrun_env
from .._core.errors import InputError, first_line
from .._core.files import (
    atomic_directory,
    complete_directory,
    directory_lock,
    remove_partials,
    settle_directory,
    write_text_atomic,
)
from .._core.progress import progress_bar
from ..expression.genes import GenePanel, looks_like_ensembl, read_gene_list
from ..inference.uncertainty import noise_from_model
from ..io.cohort import Cohort, Slide
from ..io.rundir import (
    load_optimizer,
    load_tensors,
    read_json_object,
    save_optimizer,
    save_run,
    save_tensors,
)
from ..models.cancer_type import CLASSIFIER_FILE, fit_cancer_classifier
from ..models.inputs import (
    CancerVocabulary,
    SlideTensors,
    context_vocabularies,
    feature_stats,
    gene_means,
    input_options,
    knn_index,
    to_tensors,
)
from ..models.network import HistoPrism, ModelConfig
from ..models.registry import FitOptions, model_kind
from .validation import RidgeReference, moment_sums, pearson_from_sums, ridge_reference

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 80  # cosine schedule length; early stopping may end sooner
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_epochs: float = 2.0  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05  # floor of the cosine schedule
    grad_clip: float = 1.0  # max global gradient norm
    patience: int = 15  # epochs without a better validation score before stopping
    select_on: str = "pearson"  # "loss" (validation MSE) or "pearson" (mean per-gene validation r):
    # the score that picks the best epoch and drives early stopping
    condition_dropout: float = 0.1  # share of steps trained with the 'Unknown' token instead
    crop_spots: int = 5_000  # > 0: a step sees at most this many spots, a random disc of tissue
    seed: int = 0  # weights, slide order, dropout, crops

    def __post_init__(self):
        if self.select_on not in ("loss", "pearson"):
            raise ValueError(f"select_on must be 'loss' or 'pearson', got '{self.select_on}'")

    def to_dict(self) -> dict:
        return asdict(self)


# crop_spots: every Visium (<= 4,992 spots) and ST slide trains whole, as in the paper; a Visium
# HD-size slide trains on 5,000-spot discs (1.1 mm across at 16 µm bins). Bounds CPU memory: with
# attention dropout, SDPA falls back to materialising N x N weights (22 GB peak at 8,192 spots).

# Named recipes, side by side:
#
# "paper" builds the authors' network exactly (susuhu/HistoPrism, models/HistoPrIsm.py with its
# released config: ``authors.import_checkpoint`` loads their checkpoints into it): the cancer type
# by cross-attention (4 heads) on the raw patch embedding + Add & LayerNorm, post-norm blocks (2
# layers, 8 heads, ReLU feed-forward of width 2,048 = 8 x 256), a head Linear -> LayerNorm -> ReLU
# -> Dropout -> Linear, dropout 0.1 everywhere and none on the cross-attention output, dense
# attention over every spot; 17,210,438 parameters as they count them at UNI size and 38,982
# genes (``authors.authors_parameter_count``; 16,157,766 trainable here, see CancerConditioning).
# It trains with lr 5e-5, patience 30 on the validation loss and no input scaling; its 250-epoch
# warm-up is not kept because it outlasts its own early stopping.
# "default" moves the cancer type after the projection as a zero-initialised residual branch and
# uses pre-norm blocks with GELU and a plain head: the input site collapsed onto the cancer type on
# cohorts it was not tuned on (drawn world 3: HVG-50 0.372 against 0.741, validation r 0.12 against
# a per-spot ridge's 0.456; README, "Model recipes"). It also z-scores inputs, trains lr 2e-3 with a
# 2-epoch warm-up, cosine decay and clipping, keeps the epoch of the best validation Pearson (the
# loss is dominated by per-slide depth on few validation slides: world 1, HVG-50 0.480 -> 0.507),
# and drops no attention weights (same accuracy; a 4,992-spot step takes 7.1 s / 6.4 GB instead of
# 13.2 s / 10.8 GB). It centres each slide's embeddings on their mean: a per-slide stain shift the
# size of the signal (drawn world 4) otherwise leaves the slide model below the per-spot MLP
# (HVG-50 0.670 against 0.686; centred 0.742), at <= 0.008 on worlds with small shifts. Measured
# over 8 drawn worlds by benchmarks/robustness.py (before "paper" had the authors' ReLU, head
# LayerNorm and feed-forward width). It adds the mean embedding of each spot's 6 nearest spots
# as a second projected input: without it the default drew 0.4 % of its prediction from other
# spots (attention without positions cannot find a spot's neighbours) and missed the programmes
# of a spot's surroundings; with it, HVG-50 +0.052 on held-out world 1001, +0.026 on world 4,
# -0.002 to +0.011 elsewhere (README, "Model recipes").
PRESETS: dict[str, tuple[dict, dict]] = {
    "default": (
        dict(
            neighbours=6,
            standardize_inputs=True,
            centre_slides=True,
            attn_dropout=0.0,
            conditioning_site="hidden",
            norm_first=True,
        ),
        {},
    ),
    "paper": (
        dict(
            neighbours=0,
            standardize_inputs=False,
            centre_slides=False,
            conditioning_site="input",
            norm_first=False,
            activation="relu",
            ff_mult=8,
            head_norm=True,
            cross_output_dropout=False,
            attention="full",
        ),
        dict(
            lr=5e-5,
            patience=30,
            epochs=500,
            warmup_epochs=10,
            condition_dropout=0.0,
            grad_clip=0.0,
            select_on="loss",
        ),
    ),
}


def resolve_config(config: str | Path | dict | None = "default") -> tuple[dict, dict]:
    """A preset name, a YAML/JSON file or its content as a dict -> (model overrides, training
    overrides).

    A file may name a ``preset`` to start from, then ``model:`` and ``train:`` sections.
    """
    config = config or "default"
    path = None
    if isinstance(config, dict):
        spec = config
    elif str(config) in PRESETS:
        return tuple(dict(d) for d in PRESETS[str(config)])  # type: ignore[return-value]
    else:
        path = Path(config)
        if not path.exists():
            raise InputError(f"'{config}' is neither a preset ({', '.join(PRESETS)}) nor a file")
        spec = yaml.safe_load(path.read_text()) or {}
    model, train = resolve_config(spec.get("preset", "default"))
    model.update(spec.get("model", {}))
    train.update(spec.get("train", {}))
    for name, section, cls in (("model", model, ModelConfig), ("train", train, TrainConfig)):
        unknown = set(section) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown {name} setting(s): {', '.join(sorted(unknown))}", path)
    try:
        ModelConfig(**model)  # values checked here (e.g. the attention mode), not mid-run
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc), path) from None
    return model, train


# --- data ------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything a model is fitted on: aligned slides plus the panel and vocabulary they define."""

    train: list[Slide]
    val: list[Slide]
    panel: GenePanel
    vocab: CancerVocabulary
    encoder: str

    @property
    def in_dim(self) -> int:
        return self.train[0].features.shape[1]


def load_training_data(
    cohort: Cohort,
    encoder: str,
    *,
    genes: str | Path | tuple[str, ...] | None = None,
    seed: int = 0,
) -> TrainingData:
    """Load train and val slides; the panel is ``genes`` (a gene list file, or the genes
    themselves as a tuple) or every gene measured in a training slide."""
    train_ids, val_ids = cohort.ids("train"), cohort.ids("val") if "val" in cohort.splits else []
    if not train_ids:
        raise InputError("no training slides in the split", cohort.root)
    if not val_ids:  # early stopping needs held-out slides: take a tenth of training
        rng = np.random.default_rng(seed)
        val_ids = sorted(rng.choice(train_ids, max(1, len(train_ids) // 10), replace=False))
        train_ids = [i for i in train_ids if i not in set(val_ids)]
        log.warning("no validation split: holding out %s from training", ", ".join(val_ids))
    with progress_bar() as bar:
        load = bar.add_task("loading slides", total=len(train_ids) + len(val_ids))
        train = [_load(cohort, i, encoder, bar, load) for i in train_ids]
        val = [_load(cohort, i, encoder, bar, load) for i in val_ids]
    dims = {s.features.shape[1] for s in train + val}
    if len(dims) > 1:
        raise InputError(f"embedding dimensions differ between slides: {sorted(dims)}")
    # counts move to the panel's id space (an Ensembl panel with symbol slides, as HEST-1k's),
    # by the rule evaluation uses: raw counts of several names for one id summed before log1p
    if isinstance(genes, tuple):
        panel = GenePanel(genes)
    else:
        panel = GenePanel(tuple(read_gene_list(genes))) if genes is not None else None
    ensembl = (
        looks_like_ensembl(panel.genes)
        if panel
        else all(looks_like_ensembl(s.genes) for s in train)
    )
    space = "ensembl" if ensembl else "symbol"
    train = [s.in_gene_space(space) for s in train]
    val = [s.in_gene_space(space) for s in val]
    if panel is None:
        panel = GenePanel(tuple(sorted(set().union(*(s.genes for s in train)))))
    vocab = CancerVocabulary.from_codes(s.cancer for s in train + val)
    return TrainingData(train=train, val=val, panel=panel, vocab=vocab, encoder=encoder)


def _load(cohort: Cohort, sample_id: str, encoder: str, bar, task) -> Slide:
    slide = cohort.slide(sample_id, encoder)
    bar.advance(task)
    return slide


def random_crop(slide: SlideTensors, k: int, rng: np.random.Generator) -> SlideTensors:
    """The ``k`` spots nearest to a random spot of the slide (a disc of tissue, in the slide's
    spot order), or the slide itself when it has at most ``k`` spots (``k`` <= 0: no crop).

    Bounds the memory of a training step on a Visium HD-size slide; kNN neighbours are recomputed
    inside the crop, as if its edge were the tissue's.
    """
    if k <= 0 or slide.n_spots <= k:
        return slide
    c = slide.coords_um
    d2 = ((c - c[rng.integers(slide.n_spots)]) ** 2).sum(1)  # (N,) squared µm to the centre
    keep = torch.topk(d2, k, largest=False).indices.sort().values  # (k,)
    nb = slide.neighbours
    if nb is not None:
        nb = torch.from_numpy(knn_index(c[keep].double().numpy(), nb.shape[1]))
    target = slide.target[keep] if slide.target is not None else None
    return replace(
        slide, features=slide.features[keep], coords_um=c[keep], neighbours=nb, target=target
    )


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
        "learned less than the embeddings show (see README, 'Model recipes')"
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
        inputs = _to_device(s.model_inputs(), ctx.device)
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
    held at once, and the per-gene sums of the Pearson r are accumulated in float64.
    """
    model.eval()
    loss, r_sum, r_n, c_sum, c_n = 0.0, 0.0, 0.0, 0.0, 0.0
    mine = slides[ctx.rank :: ctx.world]
    checked = set(check.tolist())
    for s in mine:
        h = model.trunk(**_to_device(s.model_inputs(), ctx.device))[0]  # (N, H)
        cols, y = s.target_cols.to(ctx.device), s.target.to(ctx.device)
        step = max(1, VAL_CHUNK_BYTES // (4 * len(cols)))
        sums = torch.zeros(6, len(cols), dtype=torch.float64, device=ctx.device)
        for i in range(0, s.n_spots, step):
            sums += moment_sums(model.head(h[i : i + step], cols), y[i : i + step])  # (6, G_m)
        loss += float(sums[5].sum()) / y.numel()  # the slide's correlation.mse, summed on device
        r = pearson_from_sums(sums[:5], s.n_spots).cpu()
        r_sum, r_n = r_sum + float(r.nansum()), r_n + float((~r.isnan()).sum())
        rc = r[[c in checked for c in s.target_cols.tolist()]]
        c_sum, c_n = c_sum + float(rc.nansum()), c_n + float((~rc.isnan()).sum())
    loss, n, r_sum, r_n, c_sum, c_n = ctx.all_sum([loss, float(len(mine)), r_sum, r_n, c_sum, c_n])
    return Validation(loss / max(n, 1), r_sum / max(r_n, 1), c_sum / c_n if c_n else math.nan)


def _to_device(inputs: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


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


# --- resumable checkpoint ----------------------------------------------------------------------
# ``last/`` holds everything a resumed run needs: model, best and optimizer tensors, state.json
# (TrainState and the optimiser's param groups) and the history rows up to that state. It is
# written whole into a fresh sibling and swapped in (io.atomic_directory), so that a kill at any
# instant leaves the complete previous or the complete new checkpoint, never weights of one epoch
# with the state of another. The RNGs need no saving: every epoch reseeds torch and numpy from
# seed + epoch, so TrainState.epoch is all of them.
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


# --- one entry point for every model kind --------------------------------------------------------
def train(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    split: str | Path | None = None,
    model: str = "histoprism",
    epochs: int | None = None,
    conditioning: bool = True,
    positional_encoding: bool = False,
    attention: str | None = None,
    attention_radius_um: float | None = None,
    crop_spots: int | None = None,
    genes: str | Path | None = None,
    seed: int = 0,
    config: str | Path | dict | None = "default",
    resume: bool = False,
    progress: bool = True,
    init: str | Path | None = None,
    prompt: bool = False,
) -> Path:
    """Train ``model`` (a ``registry.MODEL_KINDS`` name) on the cohort at ``data`` and write the
    run directory ``out``.

    Parameters mirror ``histoprism train``; ``attention``, ``attention_radius_um`` (ModelConfig)
    and ``crop_spots`` (TrainConfig) override the recipe when given. ``init``: a pretrained
    HistoPrism run whose trunk is kept and whose head is refitted to the panel ``genes``
    (``histoprism.training.adapt``; ``epochs``: fine-tuning epochs of the head, default 0). ``prompt``
    with ``init``: keep the run and fit a head that corrects it with measured spots
    (``histoprism.training.prompt``). Returns ``out``.
    """
    kind = model_kind(model)
    if prompt and init is None:
        raise InputError("--prompt fits a head on a trained run: give it with --init RUN")
    if init is not None:
        _check_init_options(model, epochs, resume)
    elif epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    options = FitOptions(
        model=model,
        encoder=encoder,
        seed=seed,
        epochs=epochs,
        conditioning=conditioning,
        positional_encoding=positional_encoding,
        attention=attention,
        attention_radius_um=attention_radius_um,
        crop_spots=crop_spots,
        config=config,
        resume=resume,
        progress=progress,
    )
    out = Path(out)
    # one process writes a run directory: a second `train` into it fails instead of silently
    # replacing its files. Under torchrun rank 0 writes, and holds the lock, for all ranks.
    writer = torchrun_env()[0] == 0
    with directory_lock(out, "training") if writer else contextlib.nullcontext():
        if writer:  # leftovers of a killed run (the lock rules out a live one)
            remove_partials(out)
            settle_directory(out / keys.RUN_LAST)
        # the automatic split (no split files) is the cohort's, not the run's: predict and
        # evaluate must see the same test slides whatever --seed a model was trained with
        cohort = Cohort(data, split_dir=split)
        if init is not None:  # refused before the slides are read
            from .adapt import adapt, load_init

            init_config, _ = load_init(init, encoder)
            if prompt:  # the prompt head corrects the run's own genes
                if genes is not None:
                    raise InputError("--prompt keeps the run's gene panel: leave --genes out")
                genes = tuple(init_config["genes"])
        td = load_training_data(cohort, encoder, genes=genes, seed=seed)
        if prompt:
            from .prompt import PromptConfig, fit_prompt

            run = fit_prompt(init, td, out, config=PromptConfig(seed=seed), progress=progress)
        elif init is not None:
            run = adapt(init, td, out, epochs=epochs or 0, seed=seed, progress=progress)
        else:
            run = kind.fit_function()(td, out, options, **kind.params)
        # for --cancer auto: which known type an uncoded slide looks like (rank 0 writes)
        if writer:
            _save_cancer_classifier(Path(run), td.train + td.val)
    return run


def _save_cancer_classifier(run: Path, slides: list[Slide]) -> None:
    """Fit ``predict --cancer auto``'s classifier on the slides of the codes the run knows (a run
    adapted from another keeps that run's vocabulary: a code it never saw could not be used)."""
    known = set(read_json_object(run / keys.RUN_CONFIG)["cancers"]) - {keys.UNKNOWN_CANCER}
    slides = [s for s in slides if s.cancer in known]
    if not slides:
        log.warning("no slide of a cancer code the run knows: no classifier for --cancer auto")
        return
    clf = fit_cancer_classifier([s.features for s in slides], [s.cancer for s in slides])
    clf.save(run / CLASSIFIER_FILE)


def _check_init_options(model: str, epochs: int | None, resume: bool) -> None:
    """InputError for options that ``--init`` (adapting a pretrained run's head) cannot honour."""
    if model != "histoprism":
        raise InputError(f"--init adapts a HistoPrism run: --model must be histoprism, not {model}")
    if epochs is not None and epochs < 0:
        raise InputError(f"--epochs must be at least 0 with --init, got {epochs}")
    if resume:
        raise InputError("--resume does not apply to --init (adapting takes minutes: rerun it)")


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
