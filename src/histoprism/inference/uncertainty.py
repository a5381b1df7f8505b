"""Per-spot predictive uncertainty: the distribution of the MEASURED log1p(counts) of each spot
and gene, not only the spread of the model.

Three sources, added as the variance of a mixture (docs/formats.md, "Uncertainty layers"):

- model spread: K runs trained with other seeds (``ensemble``), or T forward passes of one run
  with its dropout on (``mc-dropout``). Each member k predicts y_k = max(h_k W_k' + b_k, 0);
  X = mean_k y_k and the spread is var_k y_k (population variance: an equal mixture).
- count noise and slide depth: the measured count is a draw around what the image shows, on a
  slide whose depth no image shows (``histoprism.models.noise``, fitted at train time, which
  also says how the interval multipliers z are calibrated).

sd = sqrt(var_k y_k + mean_k [noise(y_k, g) + slide_var u(y_k)²]); the interval of central level
p is [max(X - z_p sd, 0), X + z_p sd], clipped at 0 as X is.
Everything is streamed in (spots x genes) tiles into the HDF5 file, as ``predict`` streams X;
memory holds the members' (N, H) hidden layers and a few tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from .._core import keys
from .._core.errors import InputError
from ..expression.genes import looks_like_ensembl
from ..expression.pathways import linear_head_scores, linear_head_variance
from ..io.cohort import Cohort
from ..io.rundir import check_encoder
from ..models.inputs import slide_targets
from ..models.noise import VAL_BLOCK, VAL_COLS, Z_LEVELS, NoiseModel, fit_noise
from ..models.run import HistoPrismPredictor, Run, load
from .writer import (
    DENSE_MAX_BYTES,
    H5_CHUNK_SPOTS,
    TILE_GENES,
    check_output,
    dense_dataset,
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
    """One forward pass with the network's dropout on (input features, residual branches,
    feed-forward, cancer conditioning, head), attention-weight dropout off (with it SDPA
    materialises N x N weights); LayerNorm has no train mode, local attention and centring are
    as in eval. Seeded, and the global random state is left as it was."""
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
