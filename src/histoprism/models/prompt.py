"""Measured spots as a prompt: a trained HistoPrism corrected by the residuals of the spots whose
expression is measured (``train --init RUN --prompt``, ``predict --prompt-fraction``): the prompt head
and the prompted predictor; ``histoprism.training.prompt`` fits the head.

The image-only model is kept exactly (frozen, its weights copied unchanged). A small head learns
how far the measured spots' residuals (measured minus predicted log1p) carry to the other spots:
each spot attends to its ``neighbours`` nearest measured spots (never itself) with a score from
their last hidden layers (spots that look alike share residuals) minus a learned decay per spot
pitch of distance, beside a learned "no correction" option, and adds the weighted residuals
scaled by a learned per-gene gain in (0, 1):

    x̂_i = f(i) + sigmoid(γ) ⊙ Σ_j w_ij (y_j - f(j)),    Σ_j w_ij < 1

With no measured spot the prediction is the image-only model's, bit for bit.
Distances are in units of the slide's spot pitch, so a head fitted on Visium applies to other
grids. Memory: (N, K) weights and one (M, genes) block of residuals, never N x G at once.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from scipy.spatial import cKDTree
from torch import nn

from .._core import keys
from .._core.errors import InputError, first_line
from ..expression.genes import GenePanel, panel_counts
from ..io.cohort import Slide
from .spatial import spot_pitch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptConfig:
    neighbours: int = 16  # measured spots each spot attends to
    key_dim: int = 32  # width of the query/key projections of the hidden layer
    steps: int = 600  # optimiser steps, one training slide and one draw of measured spots each
    lr: float = 1e-2
    val_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("neighbours", "key_dim", "steps", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"prompt {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def measured_spots(n: int, fraction: float, *, seed: int, slide_id: str) -> np.ndarray:
    """(N,) bool: ``round(fraction * n)`` spots (at least one when ``fraction`` > 0) drawn at
    random, the same for the same seed and slide whatever else is predicted."""
    if not 0 <= fraction <= 1:
        raise InputError(f"--prompt-fraction must be in [0, 1], got {fraction}")
    k = 0 if fraction == 0 else min(n, max(1, round(fraction * n)))
    rng = np.random.default_rng([seed, zlib.crc32(slide_id.encode())])
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def _distance_unit(coords_um: np.ndarray) -> float:
    """The grid's pitch (µm, ``spatial.spot_pitch``) as the unit of neighbour distances; 1 where
    a slide has no pitch (a single spot, or all spots at one place)."""
    pitch = spot_pitch(coords_um)
    return pitch if 0 < pitch < float("inf") else 1.0


@dataclass
class PromptGraph:
    """Which measured spots each spot attends to.

    keys (N, K) int64 rows into the measured spots; distance (N, K) float32 in spot pitches;
    valid (N, K) bool (False: padding, or the spot itself). K = min(neighbours, M)."""

    keys: torch.Tensor
    distance: torch.Tensor
    valid: torch.Tensor


def prompt_graph(coords_um: np.ndarray, measured: np.ndarray, k: int) -> PromptGraph:
    """The ``k`` nearest measured spots of every spot of a slide, leaving a measured spot's own
    measurement out (its residual is what it would otherwise copy)."""
    n, where = len(coords_um), np.flatnonzero(measured)
    kk = min(k + 1, len(where))  # one more: a measured spot finds itself first
    if kk == 0:
        empty = torch.zeros((n, 0))
        return PromptGraph(empty.long(), empty, empty.bool())
    dist, idx = cKDTree(coords_um[where]).query(coords_um, k=kk)
    dist, idx = dist.reshape(n, kk), idx.reshape(n, kk)
    valid = where[idx] != np.arange(n)[:, None]
    # keep the first k valid neighbours of each spot (the spot itself, if measured, dropped)
    order = np.argsort(~valid, axis=1, kind="stable")[:, : min(k, kk)]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return PromptGraph(
        keys=torch.from_numpy(take(idx).astype(np.int64)),
        distance=torch.from_numpy((take(dist) / _distance_unit(coords_um)).astype(np.float32)),
        valid=torch.from_numpy(take(valid)),
    )


class PromptHead(nn.Module):
    """Weights over the measured neighbours, and the per-gene gain of their residuals."""

    def __init__(self, hidden: int, n_genes: int, key_dim: int, neighbours: int):
        super().__init__()
        self.neighbours = neighbours
        self.query, self.key = nn.Linear(hidden, key_dim), nn.Linear(hidden, key_dim)
        nn.init.zeros_(self.key.weight)  # a fresh head weighs by distance alone
        nn.init.zeros_(self.key.bias)
        self.log_decay = nn.Parameter(torch.zeros(()))  # logit lost per pitch of distance
        self.null_logit = nn.Parameter(torch.zeros(()))  # the "no correction" option
        self.gain_logit = nn.Parameter(torch.zeros(n_genes))

    def weights(self, hidden: torch.Tensor, measured: torch.Tensor, graph: PromptGraph):
        """(N, H) hidden layer, (M,) int64 measured rows -> (N, K) weights, rows summing < 1."""
        if graph.keys.shape[1] == 0:
            return torch.zeros(graph.keys.shape, dtype=hidden.dtype, device=hidden.device)
        q = self.query(hidden)  # (N, d)
        k = self.key(hidden[measured])[graph.keys]  # (N, K, d)
        score = (q[:, None] * k).sum(-1) / math.sqrt(q.shape[-1])
        score = score - self.log_decay.exp() * graph.distance
        score = score.masked_fill(~graph.valid, -math.inf)
        null = self.null_logit.expand(len(score), 1)
        return torch.softmax(torch.cat([score, null], dim=1), dim=1)[:, :-1]

    def correction(self, weights: torch.Tensor, graph: PromptGraph, residual: torch.Tensor, cols):
        """(N, K) weights, (M, g) residuals of panel columns ``cols`` -> (N, g) correction."""
        out = torch.zeros(len(weights), residual.shape[1], dtype=residual.dtype)
        for j in range(weights.shape[1]):
            out += weights[:, j : j + 1] * residual[graph.keys[:, j]]
        return torch.sigmoid(self.gain_logit[cols]) * out


def linear_part(model, hidden: torch.Tensor, cols) -> torch.Tensor:
    """The image-only model's linear output h W' + b of panel columns ``cols`` (its written
    prediction is this clipped at 0)."""
    w, b = model.head_out.weight[cols], model.head_out.bias[cols]
    return torch.addmm(b, hidden, w.T)


def corrected(
    head: PromptHead, weights: torch.Tensor, graph: PromptGraph, linear: torch.Tensor,
    measured_rows: torch.Tensor, truth: torch.Tensor, cols, genes: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The prompted prediction before the clip at 0 that writing applies: the image-only linear
    output (N, g) plus the correction from the residuals of the measured spots, truth (M, g)
    minus their written prediction. ``genes`` (g,) bool: the columns the slide measures (the
    others get no correction; default all). Training and prediction both compute it here."""
    residual = truth - linear[measured_rows].clamp(min=0)
    if genes is not None:
        residual[:, ~genes] = 0
    return linear + head.correction(weights, graph, residual, cols)


def head_state(head: PromptHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}


def load_prompt(run_dir: str | Path, hidden: int, n_genes: int, config: dict) -> PromptHead:
    """The prompt head of a run written by ``fit_prompt``; InputError if the run has none."""
    path = Path(run_dir) / keys.RUN_PROMPT
    if "prompt" not in config or not path.exists():
        raise InputError(
            "the run has no prompt head: fit one with `histoprism train --init RUN --prompt`",
            run_dir,
        )
    cfg = PromptConfig(**config["prompt"]["config"])
    head = PromptHead(hidden, n_genes, cfg.key_dim, cfg.neighbours)
    try:
        head.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise InputError(f"prompt head does not fit the run ({first_line(exc)})", path) from None
    return head.eval()


@dataclass
class PromptedSlide:
    """What ``PromptedPredictor.prepare`` keeps of one slide."""

    hidden: torch.Tensor  # (N, H)
    mask: np.ndarray  # (N,) bool: measured
    rows: torch.Tensor  # (M,) measured spots
    counts: object  # (M, G_m) CSR raw counts of the measured panel genes
    col_of: np.ndarray  # (G,) column of each panel gene in counts, -1 where not measured
    graph: PromptGraph
    weights: torch.Tensor  # (N, K)


@dataclass
class PromptedPredictor:
    """A HistoPrism predictor whose slides come with measured spots (``Predictor`` protocol).

    ``measured(slide)`` -> (N,) bool picks each slide's measured spots. Pathway scores are derived
    from the written genes (the correction is not a linear head)."""

    base: object  # HistoPrismPredictor
    head: PromptHead
    panel: GenePanel
    measured: object
    info: dict  # what uns['histoprism']['prompt'] records
    closed_form_pathways = False

    def spot_columns(self, p: PromptedSlide) -> dict[str, np.ndarray]:
        """obs columns of the prediction: which spots were measured."""
        return {keys.OBS_PROMPT: p.mask}

    def uns_info(self) -> dict:
        return {"prompt": self.info}

    def prepare(self, slide: Slide, *, unknown_cancer: bool = False) -> PromptedSlide:
        hidden = self.base.prepare(slide, unknown_cancer=unknown_cancer)
        if slide.counts is None:  # never sequenced: nothing to prompt with
            log.warning("%s: no counts file, predicted from the image alone", slide.id)
            mask = np.zeros(slide.n_spots, dtype=bool)
            slide = replace(slide, counts=sp.csr_matrix((slide.n_spots, 0)), genes=np.array([]))
        else:
            mask = self.measured(slide)
        rows = np.flatnonzero(mask)
        counts, cols = panel_counts(
            slide.counts[rows], slide.genes, self.panel.genes, gene_ids=slide.gene_ids
        )
        col_of = np.full(len(self.panel), -1, dtype=np.int64)
        col_of[cols] = np.arange(len(cols))
        graph = prompt_graph(slide.coords_um, mask, self.head.neighbours)
        r = torch.from_numpy(rows)
        with torch.no_grad():
            weights = self.head.weights(hidden.cpu(), r, graph)
        return PromptedSlide(hidden, mask, r, counts.tocsc(), col_of, graph, weights)

    def predict_genes(self, p: PromptedSlide, cols: slice, rows: slice = slice(None), **_):
        """(len(rows), len(cols)) float32 predicted log1p of panel columns ``cols``."""
        with torch.no_grad():
            pred = linear_part(self.base.model, p.hidden, cols).cpu()  # (N, g)
            if len(p.rows):
                truth, measured = self.measured_log1p(p, cols)
                pred = corrected(self.head, p.weights, p.graph, pred, p.rows, truth, cols, measured)
        return pred[rows].numpy()

    @staticmethod
    def measured_log1p(p: PromptedSlide, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, g) float32 measured log1p of panel columns ``cols`` at the measured spots, and
        (g,) bool: whether the slide measures each gene."""
        sel = p.col_of[cols]
        out = np.zeros((len(p.rows), len(sel)), dtype=np.float32)
        have = np.flatnonzero(sel >= 0)
        if len(have):
            out[:, have] = np.log1p(p.counts[:, sel[have]].toarray())
        return torch.from_numpy(out), torch.from_numpy(sel >= 0)


def prompted_predictor(run, fraction: float, seed: int = 0) -> PromptedPredictor:
    """The predictor of ``run`` (``predict.Run`` of a run written by ``fit_prompt``) with a
    share ``fraction`` of each slide's spots measured, drawn with ``seed``."""
    if run.kind != "histoprism":
        raise InputError(f"--prompt-fraction needs a HistoPrism run, this one is '{run.kind}'")
    measured_spots(1, fraction, seed=seed, slide_id="")  # the fraction's check, before any slide
    cfg = run.predictor.model.cfg
    head = load_prompt(run.path, cfg.hidden, cfg.n_genes, run.config)

    def measured(slide: Slide) -> np.ndarray:
        return measured_spots(slide.n_spots, fraction, seed=seed, slide_id=slide.id)

    info = dict(fraction=fraction, seed=seed, method=run.config["prompt"]["method"])
    return PromptedPredictor(run.predictor, head, run.panel, measured, info)
