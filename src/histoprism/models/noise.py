"""The count-noise model of a run: how far a spot's MEASURED log1p(counts) falls from a prediction.

Fitted at train time on the validation slides (``noise.safetensors`` in the run directory), read at
predict time by ``histoprism.inference.uncertainty`` (docs/formats.md, "Uncertainty layers").

count noise: the measured count of a spot is a draw around what the image shows. It is taken
as Y ~ NB(mean mu, shape r_g) (gamma-Poisson: var = mu + mu² / r_g), mu being the mean whose
E[log1p Y] is the member's prediction, and noise(y, g) = Var[log1p Y], exactly (``nb_log1p_
variance``). The per-gene shape r_g is fitted at train time on the run's validation slides, so
that the summed noise variance of each gene matches its summed squared residual there
(``noise.safetensors`` in the run directory); runs trained before that file existed get it from
their validation slides in the cohort at predict time (``noise_from_cohort``). A prediction
clipped to (near) 0 is not a certain 0: predictions below the run's ``floor`` (the mean
measured log1p of the validation pairs predicted below 0.01) get the noise of the floor.

slide depth: a slide's sequencing depth (and capture efficiency) shifts all its counts, and
no image shows it, so a new slide's measured log1p sits off the prediction by delta_s * u(y)
with u(y) = 1 - exp(-y) (d log1p(mu) / d log mu). delta_s is fitted per validation slide by
least squares; its variance for a new slide is ``slide_var`` = mean_s delta_s² (a bias shared
by the validation slides counts as error too), and the NB shapes are fitted on the residuals
with each slide's offset removed: within a slide the count noise, between slides the depth.
Pathway scores z-score each gene over the slide's spots, which removes a slide-wide shift:
their sd has no depth term.

sd = sqrt(var_k y_k + mean_k [noise(y_k, g) + slide_var u(y_k)²]), and the interval of central
level p is [max(X - z_p sd, 0), X + z_p sd], clipped at 0 as X is. z_p is calibrated on the
validation slides (``calibrate_z``): the level-p quantile of |within-slide residual + a slide
offset| / sd over the validation pairs, each pair taking the offset of every validation slide with
either sign (a new slide's depth is like any of theirs), so that the intervals cover the spots of
a new slide at their level (1.28 and 1.96 for a Gaussian; measured counts are discrete and
skewed, so they differ).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from .._core.errors import InputError
from ..expression.negbin import nb_log1p_moments
from ..io.rundir import load_tensors, save_tensors
from .inputs import SlideTensors
from .run import trunk_output

log = logging.getLogger(__name__)


# --- log1p of a negative binomial --------------------------------------------------------------
# shape r = 1/dispersion: 0.2 (very overdispersed) .. 1e4 (Poisson); 48 steps of ~1.29x
SHAPES = np.geomspace(0.2, 1e4, 48)


M_STEP, M_MAX = 0.01, 12.0  # grid of E[log1p Y] (12: a mean of ~160,000 counts)


M_N = int(round(M_MAX / M_STEP)) + 1


MIN_MEAN = 1e-3  # the least mean the noise is ever evaluated at


# A prediction clipped to (near) 0 does not mean the count is surely 0: predictions below the
# run's floor get the noise of the floor, the mean measured log1p over the validation pairs
# predicted below LOW (at most MAX_FLOOR)
LOW, MAX_FLOOR = 0.01, 0.5


FIT_EVERY = 5  # the fit bins predictions on every 5th node of the grid (0.05 in log1p)


MIN_FIT_SPOTS = 20  # genes measured on fewer validation spots get the pooled shape


@cache
def nb_log1p_variance() -> np.ndarray:
    """(len(SHAPES), M_N) float32: Var[log1p Y] where E[log1p Y] = m, m = 0, M_STEP, ..., M_MAX,
    Y ~ NB(mu, r) for each shape r of ``SHAPES`` (mu solved from m; 0 at m = 0). ~2 s once."""
    mu = np.geomspace(1e-4, 1e9, 320)
    m = np.arange(M_N) * M_STEP
    out = np.empty((len(SHAPES), M_N), dtype=np.float32)
    for i, r in enumerate(SHAPES):
        e1, var = nb_log1p_moments(mu, float(r))  # E increases with mu
        out[i] = np.interp(m, np.r_[0.0, e1], np.r_[0.0, var])
    return out


def _shape_position(shape: np.ndarray) -> np.ndarray:
    """Fractional row of each shape in ``SHAPES`` (log scale), clipped to the grid."""
    return np.interp(np.log(shape), np.log(SHAPES), np.arange(len(SHAPES), dtype=np.float64))


def _grid_index(
    y: torch.Tensor, step: float, n: int, floor: float = MIN_MEAN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower node and weight of the upper node of each value on the grid 0, step, .., (n-1) step
    (values clipped to [floor, last node])."""
    t = y.clamp(floor, (n - 1) * step) / step
    i = t.long().clamp_(max=n - 2)
    return i, t - i


# --- the noise model of a run --------------------------------------------------------------------
# central levels whose interval multiplier is calibrated on the validation slides (the bounds'
# 0.8 and 0.95 among them, and evaluate's reliability curve)
Z_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class NoiseModel:
    """Per-gene count noise of one run: NB shape r_g (G,), the mean squared residual on the
    validation spots (G,) (NaN where no validation slide measured the gene), their number, and
    the interval multipliers ``z`` at ``Z_LEVELS`` (the level's quantile of |y - prediction| / sd
    over the validation pairs; the Gaussian ones when missing)."""

    shape: np.ndarray
    residual_var: np.ndarray
    n_spots: np.ndarray
    z: np.ndarray = field(default_factory=lambda: gaussian_z())
    floor: float = MIN_MEAN  # predictions below it get its noise
    source: str = "train"  # "train": noise.safetensors; "cohort": fitted at predict time
    slide_var: float = 0.0  # variance of a new slide's depth offset (log scale); 0 in old files

    def curves(self, cols: slice | np.ndarray) -> torch.Tensor:
        """(k, M_N) float32: noise variance as a function of the prediction, for panel columns
        ``cols`` (the table's rows blended in log shape)."""
        t = _shape_position(self.shape[cols])
        i = np.minimum(t.astype(np.int64), len(SHAPES) - 2)
        f = (t - i)[:, None]
        table = nb_log1p_variance()
        return torch.from_numpy(((1 - f) * table[i] + f * table[i + 1]).astype(np.float32))

    def variance(self, y: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
        """Noise variance (rows, k) of predictions ``y`` (rows, k) >= 0 of the genes whose
        ``curves(cols)`` are given: count noise plus the slide's unknown depth."""
        v = noise_variance(y, curves, self.floor)
        if self.slide_var > 0:
            v = v.add_(depth_sensitivity(y, self.floor).square_().mul_(self.slide_var))
        return v

    def save(self, path: str | Path) -> None:
        arrays = dict(
            shape=self.shape, residual_var=self.residual_var, n_spots=self.n_spots, z=self.z,
            z_levels=np.asarray(Z_LEVELS), floor=np.array([self.floor]),
            slide_var=np.array([self.slide_var]),
        )  # fmt: skip
        save_tensors(
            path, {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in arrays.items()}
        )

    @classmethod
    def load(cls, path: str | Path, n_genes: int) -> NoiseModel:
        t = load_tensors(path)
        if not {"shape", "residual_var", "n_spots"} <= set(t) or len(t["shape"]) != n_genes:
            raise InputError(f"not a noise model of {n_genes} genes", path)
        z = gaussian_z()
        if "z" in t and np.allclose(t["z_levels"].numpy(), Z_LEVELS):
            z = t["z"].double().numpy()
        floor = float(t["floor"][0]) if "floor" in t else MIN_MEAN
        slide_var = float(t["slide_var"][0]) if "slide_var" in t else 0.0
        if not (np.isfinite(slide_var) and slide_var >= 0):
            raise InputError(f"slide_var must be a finite variance >= 0, got {slide_var}", path)
        arrays = (t["shape"].double().numpy(), t["residual_var"].numpy(), t["n_spots"].numpy())
        return cls(*arrays, z=z, floor=floor, slide_var=slide_var)


def gaussian_z() -> np.ndarray:
    """(len(Z_LEVELS),) the standard normal's central multipliers: 1.2816 at 0.8, ..."""
    return norm.ppf((1 + np.asarray(Z_LEVELS)) / 2)


def depth_sensitivity(y: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """u(y) = 1 - exp(-y): how far log1p(mu) moves when log mu moves by 1, at E[log1p] = y
    (Poisson: exact to first order; 0 for a certain zero, 1 for large counts). (rows, k)."""
    return torch.expm1(-y.clamp(min=floor)).neg_()


def noise_variance(y: torch.Tensor, curves: torch.Tensor, floor: float = MIN_MEAN) -> torch.Tensor:
    """Noise variance of predictions ``y`` (rows, k) >= 0, given the ``curves`` (k, M_N) of their
    genes: linear interpolation on the grid of means; predictions below ``floor`` count as it."""
    i, f = _grid_index(y, M_STEP, M_N, floor)
    i += torch.arange(y.shape[1], device=y.device) * M_N
    flat = curves.to(y.device).reshape(-1)
    v0 = flat.take(i)
    return v0.add_(f.mul_(flat.take(i.add_(1)).sub_(v0)))


class NoiseFit:
    """Accumulates (prediction, measured log1p) pairs of validation slides per gene, then fits
    each gene's shape: sum over its spots of noise(prediction) = sum of squared residuals.

    Predictions are binned on every ``FIT_EVERY``-th node of the grid (linear weights to the two
    nearest), so the memory is (G, M_N / FIT_EVERY) whatever the number of spots.
    """

    def __init__(self, n_genes: int):
        self.n_bins = (M_N - 1) // FIT_EVERY + 1
        self.hist = torch.zeros(n_genes * self.n_bins, dtype=torch.float64)
        self.sq = torch.zeros(n_genes, dtype=torch.float64)
        self.n = torch.zeros(n_genes, dtype=torch.float64)
        self.low = [0.0, 0]  # sum of the measured values predicted below LOW, their number

    def add(self, pred: torch.Tensor, truth: torch.Tensor, cols: torch.Tensor) -> None:
        """pred (n, k) clipped predictions and truth (n, k) log1p(counts) of panel ``cols`` (k,)."""
        pred, truth, cols = pred.detach().cpu().float(), truth.cpu().float(), cols.cpu()
        i, f = _grid_index(pred, M_STEP * FIT_EVERY, self.n_bins)
        i += cols[None] * self.n_bins
        self.hist.index_add_(0, i.reshape(-1), (1 - f).reshape(-1).double())
        self.hist.index_add_(0, (i + 1).reshape(-1), f.reshape(-1).double())
        self.sq.index_add_(0, cols, ((truth - pred) ** 2).sum(0).double())
        self.n.index_add_(0, cols, torch.full((len(cols),), float(len(pred)), dtype=torch.float64))
        low = pred <= LOW
        self.low[0] += float(truth[low].double().sum())
        self.low[1] += int(low.sum())

    def fit(self, source: str = "train") -> NoiseModel:
        if not (self.n > 0).any():
            raise InputError("no validation spot to fit the count noise on")
        hist = self.hist.view(len(self.n), self.n_bins).numpy()
        floor = float(np.clip(self.low[0] / max(self.low[1], 1), MIN_MEAN, MAX_FLOOR))
        # the noise at each node of the histogram, nodes below the floor at the floor
        nodes = np.maximum(np.arange(self.n_bins) * M_STEP * FIT_EVERY, floor)
        fine = np.arange(M_N) * M_STEP
        v = np.stack([np.interp(nodes, fine, row) for row in nb_log1p_variance().astype(float)])
        sq, n = self.sq.numpy(), self.n.numpy()
        pooled = _fit_shape(hist.sum(0, keepdims=True) @ v.T, np.array([sq.sum()]))[0]
        shape = np.full(len(n), pooled)
        ok = (n >= MIN_FIT_SPOTS) & (sq > 0)
        shape[ok] = _fit_shape(hist[ok] @ v.T, sq[ok])
        with np.errstate(invalid="ignore", divide="ignore"):
            resid = np.where(n > 0, sq / n, np.nan)
        resid, n = resid.astype(np.float32), n.astype(np.float32)
        return NoiseModel(shape, resid, n, floor=floor, source=source)


def _fit_shape(S: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row: the shape whose summed noise ``S`` (rows, n_shapes; decreasing in the shape)
    equals ``target``, interpolated in log-log between grid shapes and clipped to the grid."""
    d = np.log(np.maximum(S, 1e-300)) - np.log(np.maximum(target, 1e-300))[:, None]
    above = (d > 0).sum(1)  # shapes giving more variance than observed
    out = np.empty(len(S))
    out[above == 0] = SHAPES[0]  # more residual than the most dispersed shape gives
    out[above == len(SHAPES)] = SHAPES[-1]  # less than Poisson noise
    mid = np.flatnonzero((above > 0) & (above < len(SHAPES)))
    i = above[mid] - 1
    d0, d1 = d[mid, i], d[mid, i + 1]
    f = d0 / np.maximum(d0 - d1, 1e-300)
    out[mid] = np.exp(np.log(SHAPES[i]) + f * (np.log(SHAPES[i + 1]) - np.log(SHAPES[i])))
    return out


def slide_offsets(blocks: Iterable) -> dict:
    """Each validation slide's depth offset: the least-squares delta_s of (y - prediction) on
    u(prediction) over its (spot, gene) pairs; blocks (prediction, truth, cols, slide)."""
    sums: dict = {}
    for pred, truth, _, slide in blocks:
        u = depth_sensitivity(pred)
        ru, uu = sums.get(slide, (0.0, 0.0))
        sums[slide] = (ru + float((truth - pred).mul_(u).sum()), uu + float(u.square_().sum()))
    return {k: ru / uu if uu > 0 else 0.0 for k, (ru, uu) in sums.items()}


def _within(blocks: Iterable, offsets: dict) -> Iterable:
    """(prediction, truth with the slide's depth offset removed, cols, u(prediction)) of each
    block; a slide without an offset keeps its truth."""
    for pred, truth, cols, slide in blocks:
        u = depth_sensitivity(pred)
        yield pred, truth - offsets.get(slide, 0.0) * u, cols, u


Z_STEP, Z_BINS = 0.002, 25_000  # histogram of |value - prediction| / sd on [0, 50)


def calibrate_z(noise: NoiseModel, blocks: Iterable, offsets: dict | None = None) -> np.ndarray:
    """(len(Z_LEVELS),) the interval multipliers: for each level, the z at which
    [max(X - z sd, 0), X + z sd] covers that share of the validation pairs as a slide of unknown
    depth would show them: each pair keeps its within-slide residual and takes, in turn, the
    offset of every validation slide with either sign (2K values for K slides). Without
    offsets this is the level's quantile of |y - prediction| / sd, split-conformal calibration
    of the scale (Kuleshov et al., 2018); a value is inside exactly when |y - X| / sd <= z
    (y >= 0). ``blocks``: (prediction, truth, cols, slide); ``offsets``: ``slide_offsets``."""
    offsets = offsets or {}
    shifts = [s * d for d in offsets.values() for s in (1.0, -1.0)] or [0.0]  # slides alike
    hist = torch.zeros(Z_BINS, dtype=torch.float64)
    for pred, truth, cols, u in _within(blocks, offsets):
        within = truth - pred
        sd = noise.variance(pred, noise.curves(cols.numpy())).sqrt_()
        for shift in shifts:
            a = (within + shift * u).abs_().div_(sd).div_(Z_STEP).long().clamp_(max=Z_BINS - 1)
            hist += torch.bincount(a.reshape(-1), minlength=Z_BINS).double()
    cdf = hist.cumsum(0).numpy() / max(float(hist.sum()), 1.0)
    edges = np.arange(1, Z_BINS + 1) * Z_STEP  # right edges: cdf[j] = P(a < edges[j])
    return np.interp(Z_LEVELS, np.r_[0.0, cdf], np.r_[0.0, edges])


def fit_noise(blocks: Callable[[], Iterable], n_genes: int, source: str) -> NoiseModel:
    """From passes over the validation ``blocks()`` (prediction, truth, cols, slide): each
    slide's depth offset, then the floor and per-gene shapes on the residuals without it, then
    the interval multipliers."""
    offsets = slide_offsets(blocks())
    fit = NoiseFit(n_genes)
    for pred, truth, cols, _ in _within(blocks(), offsets):
        fit.add(pred, truth, cols)
    noise = fit.fit(source)
    noise.slide_var = float(np.mean([d * d for d in offsets.values()])) if offsets else 0.0
    noise.z = calibrate_z(noise, blocks(), offsets)
    return noise


VAL_BLOCK = 2**22  # float32 elements per block of a validation prediction


VAL_COLS = 4096  # genes per block (the noise curves of a block: VAL_COLS x M_N float32)


@torch.no_grad()
def noise_from_model(model, slides: Sequence[SlideTensors], device=None) -> NoiseModel:
    """Fit a trained HistoPrism's count noise on its validation ``slides`` (with targets)."""
    device = device or next(model.parameters()).device
    model.eval()
    hidden = {}  # (N, H) per slide: the blocks are read twice

    def blocks():
        for s in slides:
            if s.id not in hidden:
                hidden[s.id] = trunk_output(model, s, device)
            h = hidden[s.id]
            for c in range(0, len(s.target_cols), VAL_COLS):
                cols = s.target_cols[c : c + VAL_COLS]
                step = max(1, VAL_BLOCK // len(cols))
                for i in range(0, s.n_spots, step):
                    pred = model.head(h[i : i + step], cols.to(device)).clamp_(min=0).cpu()
                    yield pred, s.target[i : i + step, c : c + VAL_COLS], cols, s.id

    return fit_noise(blocks, model.cfg.n_genes, "train")
