"""Small panels: a pretrained HistoPrism run -> a run for a new gene panel (``train --init RUN``).

The trunk (everything up to the last hidden layer, ``HistoPrism.trunk``: (N, D) -> (N, H)) is
frozen; the new head ``Linear(H, G_new)`` is fitted in closed form by ridge regression of each
panel gene's measured log1p(counts) on the hidden features of the training spots of the slides
that measure it. The penalty (relative to the mean eigenvalue of the hidden features' covariance)
and the prior (rows shrunk towards 0, or towards the pretrained head's row for genes of the
pretrained panel) are chosen on the validation slides by mean per-gene Pearson r. ``epochs > 0``
then fine-tunes the head and the LayerNorms with the rest of the trunk frozen, keeping the best
validation epoch (epoch 0 is the closed form).

The result is an ordinary HistoPrism run directory (the pretrained ``model_config`` with
``n_genes`` of the new panel, ``init_from`` and ``adapt`` in ``config.json``): ``predict`` and
``evaluate`` use it unchanged. Sufficient statistics are accumulated per slide (float64
(H, H) Gram matrices and (G, H) cross products), so memory does not grow with the spots.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._core import keys
from .._core.errors import InputError
from ..expression.genes import GeneIdMap, GenePanel, looks_like_ensembl
from ..io.rundir import save_run
from ..models.inputs import SlideTensors, input_options, to_tensors
from ..models.network import HistoPrism
from ..models.noise import noise_from_model
from ..models.run import load_network, trunk_output
from .data import TrainingData
from .loop import train_step, write_history
from .recipes import TrainConfig
from .validation import block_pearson

log = logging.getLogger(__name__)

# x the mean eigenvalue of the hidden features' covariance: from nearly unpenalised to a head
# that is mostly its prior (a single slide of a few hundred spots needs the strong end)
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
PRIORS = ("zero", "pretrained")
FINE_TUNE_LR = 1e-3  # AdamW on the head and LayerNorms: small, they start at a good solution


@dataclass
class HeadStats:
    """Per-gene sufficient statistics of the ridge over the training spots measuring the gene,
    grouped by which slides measure it (genes of one group share a Gram matrix).

    n (G,) spots; sx (G, H) Σh; sy (G,) Σy; sxy (G, H) Σ h·y; groups: list of (genes (g,) int64,
    Gram (H, H) Σ h hᵀ, n spots, Σh (H,)), all float64."""

    n: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    sxy: np.ndarray
    groups: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]


def head_stats(hidden: list[torch.Tensor], slides: list[SlideTensors], n_genes: int) -> HeadStats:
    """Accumulate ``HeadStats`` from each training slide's (N, H) hidden features and targets."""
    H = hidden[0].shape[1]
    n, sy = np.zeros(n_genes), np.zeros(n_genes)
    sx, sxy = np.zeros((n_genes, H)), np.zeros((n_genes, H))
    measured = np.zeros((n_genes, len(slides)), dtype=bool)
    grams, sums = [], []
    for j, (h, s) in enumerate(zip(hidden, slides, strict=True)):
        x, y = h.double().numpy(), s.target.double().numpy()  # (N, H), (N, G_m)
        cols = s.target_cols.numpy()
        measured[cols, j] = True
        grams.append(x.T @ x)
        sums.append(x.sum(0))
        n[cols] += len(x)
        sx[cols] += x.sum(0)
        sy[cols] += y.sum(0)
        sxy[cols] += (x.T @ y).T
    groups = []
    patterns, inverse = np.unique(measured, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        if not pattern.any():
            continue  # genes no training slide measures: no fit
        genes = np.flatnonzero(inverse.reshape(-1) == p)
        idx = np.flatnonzero(pattern)
        gram = sum(grams[i] for i in idx)
        groups.append((genes, gram, float(n[genes[0]]), sum(sums[i] for i in idx)))
    return HeadStats(n=n, sx=sx, sy=sy, sxy=sxy, groups=groups)


def solve_head(
    stats: HeadStats, alpha: float, prior: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge head of every gene that some training slide measures, with an unpenalised bias:
    argmin Σ (y - h·w - b)² + λ ||w - w0||², λ = ``alpha`` x the mean eigenvalue of the centred
    hidden covariance of the gene's spots. ``prior`` (G, H) w0 (zeros when None).

    Returns weight (G, H), bias (G,) float64 and fitted (G,) bool (False: measured nowhere)."""
    G, H = stats.sx.shape
    weight, bias, fitted = np.zeros((G, H)), np.zeros(G), np.zeros(G, dtype=bool)
    for genes, gram, n, sx in stats.groups:
        mean_x = sx / n  # (H,)
        cov = gram - n * np.outer(mean_x, mean_x)  # (H, H) centred Σ (h - h̄)(h - h̄)ᵀ
        lam = alpha * max(np.trace(cov) / H, 1e-12)
        mean_y = stats.sy[genes] / n  # (g,)
        rhs = stats.sxy[genes] - n * mean_y[:, None] * mean_x  # (g, H) centred Σ (h - h̄) y
        if prior is not None:
            rhs = rhs + lam * prior[genes]
        w = np.linalg.solve(cov + lam * np.eye(H), rhs.T).T  # (g, H)
        weight[genes], bias[genes] = w, mean_y - w @ mean_x
        fitted[genes] = True
    return weight, bias, fitted


def val_pearson(
    hidden: list[torch.Tensor],
    slides: list[SlideTensors],
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    genes: np.ndarray | None = None,
) -> float:
    """Mean per-gene Pearson r over every (validation slide, measured gene) pair that has one;
    ``genes`` (G,) bool: only those panel genes."""
    w, b = torch.from_numpy(weight).float(), torch.from_numpy(bias).float()
    total, count = 0.0, 0
    for h, s in zip(hidden, slides, strict=True):
        keep = slice(None) if genes is None else torch.from_numpy(genes[s.target_cols.numpy()])
        cols = s.target_cols[keep]
        pred = h @ w[cols].T + b[cols]  # (N, g)
        r = block_pearson(pred, s.target[:, keep])
        total, count = total + float(r.nansum()), count + int((~r.isnan()).sum())
    return total / count if count else math.nan


def pretrained_rows(init_panel: GenePanel, panel: GenePanel) -> np.ndarray:
    """Row of each new panel gene in the pretrained head, -1 where absent: (G_new,) int64.

    Names are matched in the new panel's id space (a symbol run adapted to an Ensembl panel, or
    the reverse, goes through the bundled id table)."""
    names = np.asarray(init_panel.genes, dtype=object)
    new_ens, old_ens = looks_like_ensembl(panel.genes), looks_like_ensembl(init_panel.genes)
    if new_ens != old_ens:
        idmap = GeneIdMap.bundled()
        names = idmap.to_ensembl(names) if new_ens else idmap.to_symbol(names)
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is not None:
            lookup.setdefault(str(name), i)
    return np.array([lookup.get(g, -1) for g in panel.genes], dtype=np.int64)


def adapt(
    init: str | Path,
    data: TrainingData,
    out: str | Path,
    *,
    epochs: int = 0,
    seed: int = 0,
    alphas: tuple[float, ...] = ALPHAS,
    priors: tuple[str, ...] = PRIORS,
    progress: bool = True,
) -> Path:
    """Fit the head of the pretrained HistoPrism run ``init`` to ``data.panel`` and write the run
    directory ``out``. ``alphas`` x ``priors`` is the grid chosen on ``data.val``; ``epochs``:
    fine-tuning epochs of the head and LayerNorms after the closed form. Returns ``out``."""
    t_start = time.perf_counter()
    out = Path(out)
    init_config, model = load_network(init, data.encoder)
    vocab = type(data.vocab)(tuple(init_config["cancers"]))
    unknown = sorted({s.cancer for s in data.train + data.val} - set(vocab.codes))
    if unknown:  # the conditioning tokens are frozen: a new type can only be 'Unknown'
        log.warning(
            "cancer code(s) %s unknown to %s: their slides use the 'Unknown' token",
            ", ".join(unknown),
            init,
        )
    panel = data.panel
    data = replace(data, train=_measuring(data.train, panel), val=_measuring(data.val, panel))
    if not data.train:
        raise InputError(f"none of the {len(panel)} panel genes is measured in a training slide")
    conv = dict(vocab=vocab, panel=panel, unknown_cancer=True, **input_options(model.cfg))
    train_t = [to_tensors(s, **conv) for s in data.train]
    val_t = [to_tensors(s, **conv) for s in data.val]
    torch.manual_seed(seed)
    hidden_train = [trunk_output(model.eval(), s) for s in train_t]
    hidden_val = [trunk_output(model.eval(), s) for s in val_t]

    rows = pretrained_rows(GenePanel(tuple(init_config["genes"])), panel)
    old_w = model.head_out.weight.detach().double().numpy()  # (G_old, H)
    old_b = model.head_out.bias.detach().double().numpy()
    prior = np.where(rows[:, None] >= 0, old_w[np.maximum(rows, 0)], 0.0)  # (G_new, H)
    if not (rows >= 0).any():
        priors = tuple(p for p in priors if p != "pretrained") or ("zero",)
    stats = head_stats(hidden_train, train_t, len(panel))
    heads = {}
    for p in priors:
        for a in alphas:
            heads[p, a] = solve_head(stats, a, prior if p == "pretrained" else None)
    # prior and penalty are chosen apart for the genes with a pretrained row and the new ones: a
    # pretrained row is worth a strong pull towards it, a new gene has only the trunk to go on
    weight, bias = np.zeros((len(panel), prior.shape[1])), np.zeros(len(panel))
    fitted = np.zeros(len(panel), dtype=bool)
    choices, grid = [], []
    for label, genes in (("with a pretrained row", rows >= 0), ("new", rows < 0)):
        if not genes.any():
            continue
        scored = [
            (val_pearson(hidden_val, val_t, w, b, genes=genes), p, a)
            for (p, a), (w, b, _) in heads.items()
        ]
        grid += [dict(genes=label, prior=p, alpha=a, val_pearson=r) for r, p, a in scored]
        # NaN (no validation pair) ranks last; ties keep the grid order (zero prior, weaker alpha)
        r, p, a = max(scored, key=lambda g: -math.inf if math.isnan(g[0]) else g[0])
        w, b, f = heads[p, a]
        weight[genes], bias[genes], fitted[genes] = w[genes], b[genes], f[genes]
        choices.append(dict(genes=label, n_genes=int(genes.sum()), prior=p, alpha=a, val_pearson=r))
    r_val = val_pearson(hidden_val, val_t, weight, bias)
    prior_name, alpha = choices[0]["prior"], choices[0]["alpha"]
    # genes no training slide measures: the pretrained row where there is one, else refused
    kept_old = ~fitted & (rows >= 0)
    weight[kept_old], bias[kept_old] = old_w[rows[kept_old]], old_b[rows[kept_old]]
    dropped = ~fitted & (rows < 0)
    if dropped.any():
        names = [panel.genes[i] for i in np.flatnonzero(dropped)]
        raise InputError(
            f"{len(names)} panel gene(s) measured in no training slide and absent from the "
            f"pretrained panel, e.g. {', '.join(names[:5])}: cannot fit them (remove them)"
        )
    log.info(
        "closed-form head: %s; validation r %.3f (%d genes, %d new)",
        "; ".join(f"{c['genes']}: {c['prior']} prior, alpha {c['alpha']:g}" for c in choices),
        r_val, len(panel), int((rows < 0).sum()),
    )  # fmt: skip

    cfg = replace(model.cfg, n_genes=len(panel))
    new = HistoPrism(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head_out.")}
    state["head_out.weight"] = torch.from_numpy(weight).float()
    state["head_out.bias"] = torch.from_numpy(bias).float()
    new.load_state_dict(state)
    history = [dict(epoch=0, train_loss=math.nan, val_pearson=r_val, seconds=0.0)]
    best_epoch = 0
    if epochs > 0:
        best_epoch, r_val = _fine_tune(new, train_t, val_t, epochs, seed, history, progress)
    new.eval()
    noise_from_model(new, val_t).save(out / keys.RUN_NOISE)
    write_history(out / keys.RUN_HISTORY, history)
    t_cfg = TrainConfig(epochs=epochs, lr=FINE_TUNE_LR, seed=seed)
    config = dict(
        model="histoprism",
        model_config=cfg.to_dict(),
        train_config=t_cfg.to_dict(),
        encoder=data.encoder,
        in_dim=cfg.in_dim,
        genes=list(panel.genes),
        cancers=list(vocab.codes),
        best_epoch=best_epoch,
        best_val_loss=math.nan,
        epochs_run=epochs,
        train_slides=[s.id for s in data.train],
        val_slides=[s.id for s in data.val],
        init_from=str(Path(init).resolve()),
        adapt=dict(
            method="closed-form ridge head on the frozen trunk"
            + (f", then {epochs} epochs of head + LayerNorm fine-tuning" if epochs else ""),
            alpha=alpha,
            prior=prior_name,
            val_pearson=r_val,
            genes_new=int((rows < 0).sum()),
            genes_kept_pretrained=int(kept_old.sum()),
            choices=choices,
            grid=grid,
            seconds=time.perf_counter() - t_start,
        ),
    )
    return save_run(out, config=config, tensors=new.state_dict())


def _measuring(slides: list, panel: GenePanel) -> list:
    """The slides that measure at least one panel gene (a targeted slide may measure none)."""
    kept = [s for s in slides if (panel.locate(s.genes) >= 0).any()]
    if len(kept) < len(slides):
        skipped = sorted({s.id for s in slides} - {s.id for s in kept})
        log.warning("no panel gene measured in %s: left out", ", ".join(skipped))
    return kept


def _fine_tune(
    model: HistoPrism,
    train_t: list[SlideTensors],
    val_t: list[SlideTensors],
    epochs: int,
    seed: int,
    history: list[dict],
    progress: bool,
) -> tuple[int, float]:
    """AdamW on the head and every LayerNorm (the rest of the trunk frozen), one slide per step,
    masked MSE; keeps the weights of the best validation r (epoch 0: the closed form, the last
    row of ``history``). Returns (best epoch, its validation r); ``model`` holds its weights."""
    trainable = [model.head_out.weight, model.head_out.bias]
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            trainable += list(m.parameters())
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    opt = torch.optim.AdamW(trainable, lr=FINE_TUNE_LR, weight_decay=0.0)
    best_r, best_epoch = history[-1]["val_pearson"], 0
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        torch.manual_seed(seed + epoch)
        model.train()
        total = 0.0
        for i in rng.permutation(len(train_t)):
            total += train_step(model, opt, train_t[i].model_inputs(), train_t[i])
        hidden = [trunk_output(model.eval(), s) for s in val_t]
        w = model.head_out.weight.detach().double().numpy()
        r = val_pearson(hidden, val_t, w, model.head_out.bias.detach().double().numpy())
        history.append(
            dict(
                epoch=epoch,
                train_loss=total / max(len(train_t), 1),
                val_pearson=r,
                seconds=time.perf_counter() - t0,
            )
        )
        if progress:
            log.info("fine-tune epoch %d: validation r %.4f", epoch, r)
        if r > best_r:
            best_r, best_epoch = r, epoch
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(best)
    return best_epoch, best_r
