"""Validation Pearson during training, and the health check: a per-spot ridge on the same slides.

A slide model that ends below a ridge regression of each spot's own embedding has learned less
than the embeddings plainly show (e.g. collapsed onto the cancer type). The ridge is fitted in
seconds on the training slides; ``check_genes`` are the panel columns both are scored on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..expression.correlation import pearson_from_moments, pool_comoments
from ..models.inputs import SlideTensors

MAX_CHECK_GENES = 2_000  # the most variable training genes: bounds the ridge's (spots, genes) Y
MAX_CHECK_SPOTS = 20_000  # training spots the ridge sees, spread evenly over the slides
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x mean eigenvalue of the Gram matrix


@dataclass
class RunningMoments:
    """Per-gene co-moments of prediction and target, pooled block by block of spots (Chan et
    al.'s update, ``correlation.pool_comoments``) in float64 on the tensors' device. Each block is
    centred on its own means first, so nearly constant columns do not cancel as raw sums would.

    ``sq_err`` (G,) is Σ (p - t)², ``correlation.squared_error``'s sum (the validation MSE's
    numerator).
    """

    moments: dict[str, torch.Tensor] | None = None
    sq_err: torch.Tensor | None = None

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> RunningMoments:
        """Pool one (n, G) block of predictions and targets in; returns self."""
        p, t = pred.detach().double(), target.detach().double()
        n = len(p)
        mean_p, mean_t = p.mean(0), t.mean(0)
        dp, dt = p - mean_p, t - mean_t
        block = {
            "n": torch.full_like(mean_p, float(n)),
            "mean_pred": mean_p,
            "mean_truth": mean_t,
            "m2_pred": dp.square().sum(0),
            "m2_truth": dt.square().sum(0),
            "cross": (dp * dt).sum(0),
        }
        sq = (p - t).square().sum(0)
        if self.moments is None:
            self.moments, self.sq_err = block, sq
        else:
            w = n / (float(self.moments["n"][0]) + n)
            self.moments = pool_comoments(self.moments, block, w)
            self.sq_err = self.sq_err + sq
        return self

    def pearson(self) -> torch.Tensor:
        """(G,) float64 Pearson r on the CPU (``correlation.pearson_from_moments``: evaluation's
        definition); NaN where either column is constant."""
        m = {k: v.cpu().numpy() for k, v in self.moments.items()}
        return torch.from_numpy(pearson_from_moments(m))


def block_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, G) prediction and target -> (G,) float64 Pearson r per gene on the CPU."""
    return RunningMoments().add(pred, target).pearson()


def mean_pearson(r_by_slide: list[torch.Tensor]) -> float:
    """Mean of per-gene Pearson r over every (slide, gene) pair that has one; NaN if none."""
    r = torch.cat([x.flatten() for x in r_by_slide]) if r_by_slide else torch.zeros(0)
    r = r[~r.isnan()]
    return float(r.mean()) if len(r) else float("nan")


def check_genes(slides: list[SlideTensors], n_genes: int, k: int = MAX_CHECK_GENES) -> torch.Tensor:
    """(g,) sorted panel columns of the health check: the ``k`` genes of highest pooled training
    variance among those that at least half of the training slides measure."""
    count = torch.zeros(n_genes, dtype=torch.float64)
    s1, s2, n = (torch.zeros(n_genes, dtype=torch.float64) for _ in range(3))
    for s in slides:
        y = s.target.double()
        count[s.target_cols] += 1
        s1[s.target_cols] += y.sum(0)
        s2[s.target_cols] += (y * y).sum(0)
        n[s.target_cols] += s.n_spots
    var = s2 / n.clamp(min=1) - (s1 / n.clamp(min=1)) ** 2
    var[count < max(1, len(slides) / 2)] = -1.0
    top = torch.argsort(var, descending=True)[: min(k, int((var > 0).sum()))]
    return top.sort().values


@dataclass(frozen=True)
class RidgeReference:
    """Validation Pearson of a per-spot ridge (z-scored embedding + cancer one-hot), the best
    of a few penalties, on the panel columns ``genes``."""

    pearson: float
    alpha: float
    genes: torch.Tensor  # (g,) int64 panel columns


def ridge_reference(
    train: list[SlideTensors],
    val: list[SlideTensors],
    n_genes: int,
    n_conditions: int,
    *,
    seed: int = 0,
) -> RidgeReference:
    """Fit the per-spot ridge on ``train`` (at most MAX_CHECK_SPOTS spots, MAX_CHECK_GENES
    genes) and score it on the whole ``val`` slides; seconds on a CPU."""
    genes = check_genes(train, n_genes)
    rng = np.random.default_rng(seed)
    per_slide = max(1, MAX_CHECK_SPOTS // max(1, len(train)))
    xs, ys, ms = [], [], []
    for s in train:
        rows = np.sort(rng.permutation(s.n_spots)[:per_slide])
        pos = _positions(s.target_cols, genes)  # (g,) column of each check gene, -1 if absent
        y = torch.zeros(len(rows), len(genes), dtype=torch.float64)
        y[:, pos >= 0] = s.target[rows][:, pos[pos >= 0]].double()
        xs.append(_design(s, rows, n_conditions))
        ys.append(y)
        ms.append(torch.as_tensor(pos >= 0).expand(len(rows), -1))
    X, Y, M = torch.cat(xs), torch.cat(ys), torch.cat(ms)  # (n, D+C), (n, g), (n, g) bool
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    X = (X - mean) / std
    best = RidgeReference(pearson=float("nan"), alpha=float("nan"), genes=genes)
    # genes measured by the same slides share one fit; usually one or two such patterns
    patterns, pattern_of = torch.unique(M.T, dim=0, return_inverse=True)
    coefs = {a: torch.zeros(X.shape[1] + 1, len(genes), dtype=torch.float64) for a in RIDGE_ALPHAS}
    for p, rows_mask in enumerate(patterns):
        cols = torch.nonzero(pattern_of == p).flatten()
        Xp, Yp = X[rows_mask], Y[rows_mask][:, cols]
        xm, ym = Xp.mean(0), Yp.mean(0)
        evals, evecs = torch.linalg.eigh((Xp - xm).T @ (Xp - xm))
        xty = evecs.T @ ((Xp - xm).T @ (Yp - ym))  # (D+C, g_p) in the eigenbasis
        for a in RIDGE_ALPHAS:
            w = evecs @ (xty / (evals.clamp(min=0) + a * evals.mean().clamp(min=1e-12))[:, None])
            coefs[a][:-1, cols] = w
            coefs[a][-1, cols] = ym - xm @ w
    # the validation designs, standardised once for every penalty
    val_x = {s.id: (_design(s, np.arange(s.n_spots), n_conditions) - mean) / std for s in val}
    for a, coef in coefs.items():

        def predict(s: SlideTensors, cols: torch.Tensor, coef=coef) -> torch.Tensor:
            return val_x[s.id] @ coef[:-1, cols] + coef[-1, cols]

        r = mean_pearson(pearson_on_genes(predict, val, genes))
        if not r <= best.pearson:  # NaN-safe: the first finite r wins over NaN
            best = RidgeReference(pearson=r, alpha=a, genes=genes)
    return best


def pearson_on_genes(
    predict, slides: list[SlideTensors], genes: torch.Tensor
) -> list[torch.Tensor]:
    """Per-gene Pearson r of ``predict(slide, positions)`` on each slide, over the check genes the
    slide measured. ``predict`` gets positions into ``genes`` and returns (N, len(positions))."""
    out = []
    for s in slides:
        pos = _positions(s.target_cols, genes)
        have = torch.nonzero(torch.as_tensor(pos >= 0)).flatten()
        if len(have) == 0:
            continue
        pred = predict(s, have)
        out.append(block_pearson(pred, s.target[:, pos[have]]))
    return out


def _positions(target_cols: torch.Tensor, genes: torch.Tensor) -> np.ndarray:
    """For each check gene, its column in a slide's target (N, G_m), or -1: (g,) int64."""
    where = {int(c): i for i, c in enumerate(target_cols.tolist())}
    return np.array([where.get(int(g), -1) for g in genes.tolist()], dtype=np.int64)


def _design(s: SlideTensors, rows: np.ndarray, n_conditions: int) -> torch.Tensor:
    """(len(rows), D + C) float64: the spots' embeddings and the slide's cancer one-hot."""
    x = s.centred_features(rows).double()
    onehot = torch.zeros(len(rows), n_conditions, dtype=torch.float64)
    onehot[:, s.condition] = 1.0
    return torch.cat([x, onehot], dim=1)
