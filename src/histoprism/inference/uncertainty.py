"""Per-spot predictive uncertainty: the distribution of the MEASURED log1p(counts) of each spot
and gene, not only the spread of the model.

Three sources, added as the variance of a mixture (docs/formats.md, "Uncertainty layers"):

- model spread: K runs trained with other seeds (``ensemble``), or T forward passes of one run
  with its dropout on (``mc-dropout``). Each member k predicts y_k = max(h_k W_k' + b_k, 0);
  X = mean_k y_k and the spread is var_k y_k (population variance: an equal mixture).
- count noise: the measured count of a spot is a draw around what the image shows. It is taken
  as Y ~ NB(mean mu, shape r_g) (gamma-Poisson: var = mu + mu² / r_g), mu being the mean whose
  E[log1p Y] is the member's prediction, and noise(y, g) = Var[log1p Y], exactly (``nb_log1p_
  variance``). The per-gene shape r_g is fitted at train time on the run's validation slides, so
  that the summed noise variance of each gene matches its summed squared residual there
  (``noise.safetensors`` in the run directory); runs trained before that file existed get it from
  their validation slides in the cohort at predict time (``noise_from_cohort``). A prediction
  clipped to (near) 0 is not a certain 0: predictions below the run's ``floor`` (the mean
  measured log1p of the validation pairs predicted below 0.01) get the noise of the floor.

- slide depth: a slide's sequencing depth (and capture efficiency) shifts all its counts, and
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
Everything is streamed in (spots x genes) tiles into the HDF5 file, as ``predict`` streams X;
memory holds the members' (N, H) hidden layers and a few tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy.stats import norm

from .._core import keys
from .._core.errors import InputError
from ..expression.genes import looks_like_ensembl
from ..expression.negbin import nb_log1p_moments
from ..expression.pathways import linear_head_scores, linear_head_variance
from ..io.cohort import Cohort
from ..io.rundir import check_encoder, load_tensors, save_tensors
from ..models.inputs import SlideTensors, slide_targets
from .predict import (
    DENSE_MAX_BYTES,
    H5_CHUNK_SPOTS,
    TILE_GENES,
    HistoPrismPredictor,
    Run,
    check_output,
    dense_dataset,
    load,
    torch_dtype,
)

log = logging.getLogger(__name__)

METHODS = ("ensemble", "mc-dropout")
DEFAULT_PASSES = 20  # mc-dropout forward passes
# interval bounds written as layers: name -> (central level, side)
BOUNDS = {"q025": (0.95, -1), "q10": (0.8, -1), "q90": (0.8, 1), "q975": (0.95, 1)}
INTERVALS = "X ± z·sd clipped at 0, z of each level calibrated on the validation slides"
NOISE_MODEL = (
    "Var[log1p Y], Y ~ negative binomial with a per-gene shape fitted on validation, plus "
    "slide_var * (1 - exp(-y))^2 for the unknown depth of the slide"
)
TILE_SPOTS = 1024  # spots per tile: a few (1024 x 4096) float32 temporaries per member

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
                inputs = {k: v.to(device) for k, v in s.model_inputs().items() if v is not None}
                hidden[s.id] = model.trunk(**inputs)[0]
            h = hidden[s.id]
            for c in range(0, len(s.target_cols), VAL_COLS):
                cols = s.target_cols[c : c + VAL_COLS]
                step = max(1, VAL_BLOCK // len(cols))
                for i in range(0, s.n_spots, step):
                    pred = model.head(h[i : i + step], cols.to(device)).clamp_(min=0).cpu()
                    yield pred, s.target[i : i + step, c : c + VAL_COLS], cols, s.id

    return fit_noise(blocks, model.cfg.n_genes, "train")


@torch.no_grad()
def noise_from_cohort(run: Run, cohort: Cohort, encoder: str) -> NoiseModel:
    """The count noise of a run without ``noise.safetensors``, fitted on its validation slides
    (``config.json`` ``val_slides``) found in ``cohort``; InputError naming the run if none is."""
    have = set(cohort.ids())
    ids = [i for i in run.config.get("val_slides", []) if i in have and cohort.st_path(i).exists()]
    if not ids:
        raise InputError(
            f"run has no {keys.RUN_NOISE} (trained by an older histoprism) and none of its "
            "validation slides is in the cohort to fit the count noise on: retrain it",
            run.path,
        )
    space = "ensembl" if looks_like_ensembl(run.panel.genes) else "symbol"
    slides = []
    for sid in ids:
        slide = cohort.slide(sid, encoder).in_gene_space(space)
        y, cols = slide_targets(slide, run.panel)
        if len(cols):
            slides.append((sid, run.predictor.prepare(slide), y, cols))

    def blocks():
        g = len(run.panel)
        for sid, prepared, y, cols in slides:
            step = max(1, VAL_BLOCK // g)
            for i in range(0, len(y), step):
                rows = slice(i, min(i + step, len(y)))
                pred = np.maximum(run.predictor.predict_genes(prepared, slice(None), rows), 0)
                for c in range(0, len(cols), VAL_COLS):
                    k = cols[c : c + VAL_COLS]
                    truth = torch.from_numpy(y[rows, c : c + VAL_COLS])
                    yield torch.from_numpy(pred[:, k]), truth, _long(k), sid

    log.info("%s: count noise fitted on %d validation slides of the cohort", run.path, len(ids))
    return fit_noise(blocks, len(run.panel), "cohort")


def _long(cols: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(cols, dtype=np.int64))


def run_noise(run: Run, cohort: Cohort | None, encoder: str | None) -> NoiseModel:
    """The run's ``noise.safetensors``, else fitted on its validation slides in ``cohort``."""
    path = run.path / keys.RUN_NOISE
    if path.exists():
        return NoiseModel.load(path, len(run.panel))
    if cohort is None or encoder is None:
        raise InputError(f"run has no {keys.RUN_NOISE} (trained by an older histoprism)", run.path)
    return noise_from_cohort(run, cohort, encoder)


# --- members: runs of an ensemble, or passes of one run ------------------------------------------
@dataclass
class Uncertainty:
    """What ``predict`` needs to write the uncertainty layers: the loaded runs (K for an
    ensemble, 1 for mc-dropout), their noise models, and the settings."""

    method: str
    runs: list[Run]
    noise: list[NoiseModel]
    passes: int = DEFAULT_PASSES
    seed: int = 0

    @property
    def n_members(self) -> int:
        return len(self.runs) if self.method == "ensemble" else self.passes

    @property
    def z(self) -> np.ndarray:
        """(len(Z_LEVELS),) interval multipliers: the mean of the runs' calibrated ones."""
        return np.mean([n.z for n in self.noise], axis=0)

    def info(self) -> dict:
        """``uns['histoprism']['uncertainty']``."""
        return {
            "method": self.method,
            "runs": [r.path.resolve().name for r in self.runs],
            "n_members": self.n_members,  # K runs, or T passes
            "seed": self.seed,  # of the mc-dropout passes
            "noise": NOISE_MODEL,
            "noise_source": [n.source for n in self.noise],
            "slide_var": [float(n.slide_var) for n in self.noise],  # per run: depth offset
            "intervals": INTERVALS,
            "z_levels": list(Z_LEVELS),  # central levels ...
            "z": [float(v) for v in self.z],  # ... and their multipliers
        }

    def prepare(self, slide, *, unknown_cancer: bool = False) -> list[torch.Tensor]:
        """Each member's last hidden layer (N, H): K runs, or T passes with dropout on."""
        if self.method == "ensemble":
            return [r.predictor.prepare(slide, unknown_cancer=unknown_cancer) for r in self.runs]
        predictor = self.runs[0].predictor
        return [
            _dropout_pass(predictor, slide, unknown_cancer, seed=self.seed * 1_000_003 + t)
            for t in range(self.passes)
        ]

    def heads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(G, H) weight and (G,) bias of each member's linear head (passes share one)."""
        heads = [
            (r.predictor.model.head_out.weight, r.predictor.model.head_out.bias) for r in self.runs
        ]
        return heads if self.method == "ensemble" else heads * self.passes

    def member_noise(self) -> list[NoiseModel]:
        return self.noise if self.method == "ensemble" else self.noise * self.passes

    def check_output(self, output: str, dense_bytes: int) -> bool:
        """The layers are dense (N x G each): refuse factorised output, and 'auto' where it
        would pick it. Returns False (not factorised)."""
        check_output(output)
        if output == "factorised" or (output == "auto" and dense_bytes > DENSE_MAX_BYTES):
            why = "--output factorised" if output == "factorised" else "a slide this large"
            raise InputError(
                f"uncertainty layers are dense (N x G each, {dense_bytes / 2**30:.1f} GiB "
                f"here): not available with {why}"
            )
        return False

    def write_dense(self, prepared, f: h5py.File, shape, dtype, M: np.ndarray):
        """X, the layers and (N, S) pathway scores and their sd (``write_dense``)."""
        return write_dense(self, prepared, f, shape, dtype, M)


def _dropout_pass(
    predictor: HistoPrismPredictor, slide, unknown_cancer: bool, *, seed: int
) -> torch.Tensor:
    """One forward pass with the network's dropout on (residual branches, feed-forward, cancer
    conditioning, head), attention-weight dropout off (with it SDPA materialises N x N weights);
    LayerNorm has no train mode, local attention and centring are as in eval. Seeded, and the
    global random state is left as it was."""
    model = predictor.model
    blocks = list(model.blocks)
    saved = [b.attn_dropout for b in blocks]
    devices = [predictor.device] if predictor.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train()
            for b in blocks:
                b.attn_dropout = 0.0
            return predictor.prepare(slide, unknown_cancer=unknown_cancer)
    finally:
        model.eval()
        for b, p in zip(blocks, saved, strict=True):
            b.attn_dropout = p


def resolve_runs(model, members: int | None = None) -> list[Path]:
    """Run directories of an ensemble: a list of run directories, or a folder whose
    subdirectories with a ``config.json`` are runs (sorted by name); the first ``members``."""
    if isinstance(model, (list, tuple)):
        paths = [Path(p) for p in model]
    else:
        model = Path(model)
        if (model / keys.RUN_CONFIG).exists():
            paths = [model]
        elif model.is_dir():
            paths = sorted(p for p in model.iterdir() if (p / keys.RUN_CONFIG).exists())
        else:
            raise InputError("run directory not found", model)
    if members is not None:
        if members < 2:
            raise InputError(f"an ensemble needs at least 2 members, got --members {members}")
        if members > len(paths):
            raise InputError(f"--members {members}, but only {len(paths)} runs given", model)
        paths = paths[:members]
    if len(paths) < 2:
        raise InputError(
            "an ensemble needs at least 2 runs: a folder of run directories (trained with "
            "different --seed) or a list of them",
            paths[0] if paths else model,
        )
    return paths


def check_members(runs: Sequence[Run]) -> None:
    """Every member predicts the same genes for the same cancers from the same embeddings with a
    linear head; InputError naming the first run that does not."""
    first = runs[0]
    for run in runs:
        if run.kind != "histoprism":
            raise InputError(
                f"uncertainty needs HistoPrism runs (a linear head); this run is '{run.kind}'",
                run.path,
            )
    for run in runs[1:]:
        for what, key in (("genes", "genes"), ("encoder", "encoder"), ("cancers", "cancers")):
            if run.config.get(key) != first.config.get(key):
                raise InputError(f"ensemble member has other {what} than {first.path}", run.path)
        if run.config.get("in_dim") != first.config.get("in_dim"):
            raise InputError(
                f"ensemble member has another embedding dimension than {first.path}", run.path
            )


def load_uncertainty(
    model,
    method: str,
    *,
    encoder: str,
    cohort: Cohort | None = None,
    members: int | None = None,
    passes: int = DEFAULT_PASSES,
    seed: int = 0,
    attention: str | None = None,
    attention_radius_um: float | None = None,
    device=None,
) -> Uncertainty:
    """Load the members of ``method`` ('ensemble': ``resolve_runs(model, members)``;
    'mc-dropout': the one run ``model``, ``passes`` passes) and their noise models."""
    if method not in METHODS:
        raise InputError(f"uncertainty must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "ensemble":
        paths = resolve_runs(model, members)
    else:
        if isinstance(model, (list, tuple)) or not (Path(model) / keys.RUN_CONFIG).exists():
            raise InputError(
                "mc-dropout takes one run directory",
                model if not isinstance(model, (list, tuple)) else None,
            )
        if passes < 2:
            raise InputError(f"mc-dropout needs at least 2 passes, got {passes}")
        paths = [Path(model)]
    opts = dict(attention=attention, attention_radius_um=attention_radius_um, device=device)
    runs = [load(p, **opts) for p in paths]
    for run in runs:
        check_encoder(run.config, encoder, run_dir=run.path)
    check_members(runs)
    noise = [run_noise(run, cohort, encoder) for run in runs]
    return Uncertainty(method, runs, noise, passes=passes, seed=seed)


# --- writing the layers ----------------------------------------------------------------------------
def _dataset(group: h5py.Group, name: str, shape, dtype, chunks) -> h5py.Dataset:
    ds = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def write_dense(
    unc: Uncertainty, prepared: list[torch.Tensor], f: h5py.File, shape, dtype, M: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """X (mean of the members), ``layers['sd']`` and the interval bounds into the open file, in
    (spots x genes) tiles -> (N, S) pathway scores of the mean prediction and their sd."""
    n, g = shape
    rows, cols = min(n, TILE_SPOTS), min(g, TILE_GENES)
    chunks = (min(n, H5_CHUNK_SPOTS), cols) if n and g else None
    X = dense_dataset(f, "X", (n, g), dtype, chunks)
    layers = f.require_group("layers")
    out = {name: dense_dataset(layers, name, (n, g), dtype, chunks) for name in ("sd", *BOUNDS)}
    z_at = dict(zip(Z_LEVELS, unc.z, strict=True))
    z = {name: side * float(z_at[level]) for name, (level, side) in BOUNDS.items()}
    heads, noise = unc.heads(), unc.member_noise()
    distinct = {id(nm): nm for nm in noise}
    a = _pathway_noise_weights(unc, prepared, heads, M)  # (G, S)
    pw_noise = torch.zeros(n, M.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for c in range(0, g, cols):
            cs = slice(c, min(c + cols, g))
            curves = {k: nm.curves(cs).to(prepared[0].device) for k, nm in distinct.items()}
            for r in range(0, n, rows):
                rs = slice(r, min(r + rows, n))
                mean, var, nv = _mixture(prepared, heads, noise, curves, rs, cs)
                sd = var.add_(nv).sqrt_()
                X[rs, cs] = _np(mean, dtype)
                out["sd"][rs, cs] = _np(sd, dtype)
                for name, zq in z.items():
                    out[name][rs, cs] = _np((mean + zq * sd).clamp_(min=0), dtype)
                pw_noise[rs] += (nv.cpu() @ a[cs]).double()
    pathways, spread = _pathway_scores(unc, prepared, heads, M)
    return pathways, np.sqrt(spread + pw_noise.numpy())


def _mixture(prepared, heads, noise, curves, rs: slice, cs: slice):
    """Over the members, of the clipped predictions (rows, cols): mean, population variance
    (Welford's update: stable in float32) and mean count-noise variance."""
    mean = var = nv = None
    for k, (h, (w, b), nm) in enumerate(zip(prepared, heads, noise, strict=True)):
        y = torch.addmm(b[cs], h[rs], w[cs].T).clamp_(min=0)
        v = nm.variance(y, curves[id(nm)])
        if mean is None:
            mean, var, nv = y.clone(), torch.zeros_like(y), v
            continue
        delta = y - mean
        mean.add_(delta, alpha=1 / (k + 1))
        var.add_(delta.mul_(y.sub_(mean)))
        nv.add_(v)
    k = len(prepared)
    return mean, var.div_(k).clamp_(min=0), nv.div_(k)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.to(torch_dtype(dtype)).cpu().numpy()


def _mean_head(unc: Uncertainty, prepared, heads):
    """(hidden, weight, bias) whose linear output is the members' mean (unclipped) prediction:
    passes share a head, so their hidden layers average; runs concatenate theirs."""
    if unc.method == "mc-dropout":
        w, b = heads[0]
        return torch.stack(prepared).mean(0), w, b
    k = len(prepared)
    hidden = torch.cat(prepared, dim=1) / k  # (N, K H)
    weight = torch.cat([w for w, _ in heads], dim=1)  # (G, K H)
    bias = torch.stack([b for _, b in heads]).mean(0)
    return hidden, weight, bias


@torch.no_grad()
def _pathway_scores(unc, prepared, heads, M) -> tuple[np.ndarray, np.ndarray]:
    """Pathway scores of the mean prediction (closed form, as ``predict``) and the members'
    population variance of their own scores: (N, S), (N, S) float64."""
    hidden, weight, bias = _mean_head(unc, prepared, heads)
    mean = linear_head_scores(hidden, weight, bias, M)
    scores = [linear_head_scores(h, w, b, M) for h, (w, b) in zip(prepared, heads, strict=True)]
    return mean, np.var(np.stack(scores), axis=0)


@torch.no_grad()
def _pathway_noise_weights(unc, prepared, heads, M: np.ndarray) -> torch.Tensor:
    """(G, S) float32 a[g, s] = 1 / (|S| ² s_g²) for the set's genes: count noise v[n, g] moves
    the set's mean z-score at spot n by sum_g v[n, g] a[g, s], genes z-scored by the spread a
    measured slide shows, s_g² = the mean prediction's variance over the spots + the gene's mean
    squared validation residual."""
    hidden, weight, _ = _mean_head(unc, prepared, heads)
    spread = linear_head_variance(hidden, weight)[1].cpu().numpy()  # (G,)
    resid = np.nanmean(np.stack([nm.residual_var for nm in unc.noise]), axis=0)
    fill = np.nanmedian(resid) if np.isfinite(resid).any() else 0.0
    s2 = spread + np.where(np.isfinite(resid), resid, fill)
    sizes = np.maximum(M.sum(0), 1)
    with np.errstate(divide="ignore"):
        inv = np.where(s2 > 1e-12, 1.0 / s2, 0.0)
    return torch.from_numpy((M * inv[:, None] / sizes**2).astype(np.float32))
