"""Calibration of predicted uncertainty: do the measured log1p(counts) fall inside the predicted
intervals as often as their level says, and is a larger sd where the error is larger?

For predictions with ``layers['sd']`` (``predict --uncertainty``), against the slide's measured
log1p(raw counts), spots aligned by barcode and genes by name as in ``evaluate`` (docs/metrics.md,
"Calibration"): coverage of the central 50/80/95 % intervals over every (spot, gene) pair, a
reliability curve (nominal vs empirical coverage at ``LEVELS``), the mean squared z-score, and the
Spearman correlation between the predicted sd and the absolute error per gene (over the spots of
a slide) and per spot (over its genes). ``evaluate`` writes them to metrics.json ``calibration``
and ``calibration.csv``; ``plotting.figures.reliability_diagram`` draws the curve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm, rankdata

from .._core import keys
from .._core.files import atomic_path
from ..expression.correlation import dense_block, pearson_per_gene, squared_error
from ..io.cohort import align_by_barcode, truth_counts

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the reliability curve
HEADLINE_LEVELS = (0.5, 0.8, 0.95)
# the levels whose bounds a prediction stores as layers (predict --uncertainty)
STORED = {0.8: ("q10", "q90"), 0.95: ("q025", "q975")}
_BLOCK = 2**23  # float64 elements per block of (spots x genes): bounds memory per slide


def central_interval(
    X: np.ndarray, sd: np.ndarray, level: float, z: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the central ``level`` interval as ``predict`` writes them: [max(X - z sd, 0),
    X + z sd], with the prediction's calibrated multiplier ``z`` (default: the Gaussian one,
    Phi^-1((1 + level) / 2))."""
    z = norm.ppf((1 + level) / 2) if z is None else z
    return np.maximum(X - z * sd, 0.0), X + z * sd


def interval_multipliers(pred: ad.AnnData, levels=LEVELS) -> dict[float, float]:
    """{level: z} of a prediction: ``uns['histoprism']['uncertainty']`` ``z`` at ``z_levels``
    where it has them, the Gaussian multiplier for the other levels."""
    info = pred.uns.get(keys.UNS_HISTOPRISM, {}).get("uncertainty", {})
    levels_given = np.asarray(info.get("z_levels", []), dtype=float)
    z_given = np.asarray(info.get("z", []), dtype=float)
    given = (
        dict(zip(levels_given, z_given, strict=True)) if len(levels_given) == len(z_given) else {}
    )
    out = {}
    for level in levels:
        near = [z for lv, z in given.items() if np.isclose(lv, level)]
        out[level] = float(near[0]) if near else float(norm.ppf((1 + level) / 2))
    return out


def inside(truth: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Where lo <= truth <= hi (bounds included: a measured 0 is inside [0, hi])."""
    return (truth >= lo) & (truth <= hi)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho per column of two (N, K) arrays (average ranks for ties): (K,) float64,
    NaN where a column is constant."""
    return pearson_per_gene(rankdata(a, axis=0), rankdata(b, axis=0))


@dataclass
class CalibrationTally:
    """Running sums over the evaluated slides; ``add`` one slide at a time."""

    levels: tuple[float, ...] = LEVELS
    n: int = 0  # (spot, gene) pairs scored
    n_slides: int = 0
    hits: dict[float, int] = field(default_factory=dict)  # level -> pairs inside (Gaussian)
    hits_stored: dict[float, int] = field(default_factory=dict)  # level -> inside the layers
    sums: dict[str, float] = field(default_factory=dict)  # z2, sd, width_80, width_95
    gene_rho: dict[str, list[float]] = field(default_factory=dict)  # gene -> rho per slide
    spot_rho: list[np.ndarray] = field(default_factory=list)  # per slide, rho per spot

    def add(self, pred: ad.AnnData, st: ad.AnnData, *, path: Path | None = None) -> bool:
        """Score one slide if its prediction has ``layers['sd']``; returns whether it had."""
        if keys.LAYER_SD not in pred.layers:
            return False

        pred_rows, st_rows = align_by_barcode(pred.obs_names, st.obs_names, path=path)
        genes = pd.Index(pred.var_names.astype(str))
        counts, have = truth_counts(st, genes)  # (N_st, K) raw counts of the genes ``have``
        if len(have) == 0:
            return False
        truth = sp.csc_matrix(counts[st_rows])
        layers = {name: pred.layers[name] for name in (keys.LAYER_SD, *keys.LAYER_BOUNDS)}
        m, z = len(st_rows), interval_multipliers(pred, self.levels)
        step = max(1, _BLOCK // m)
        abs_err, sds = [], []
        for start in range(0, len(have), step):
            k = np.arange(start, min(start + step, len(have)))
            cols = have[k]
            y = np.log1p(dense_block(truth, slice(None), k))  # (M, b)
            x = dense_block(pred.X, pred_rows, cols)
            s = dense_block(layers[keys.LAYER_SD], pred_rows, cols)
            bounds = {n: dense_block(v, pred_rows, cols) for n, v in layers.items()}
            self._pairs(y, x, s, bounds, z)
            err = np.abs(y - x)
            for g, rho in zip(genes[cols], spearman_columns(s, err), strict=True):
                if np.isfinite(rho):
                    self.gene_rho.setdefault(g, []).append(float(rho))
            abs_err.append(err.astype(np.float32))
            sds.append(s.astype(np.float32))
        # per spot, over its genes: rows of the (M, K) arrays
        err, s = np.concatenate(abs_err, axis=1), np.concatenate(sds, axis=1)
        self.spot_rho.append(spearman_columns(s.T, err.T))
        self.n_slides += 1
        return True

    def _pairs(self, y, x, s, stored: Mapping[str, np.ndarray], z: Mapping[float, float]) -> None:
        self.n += y.size
        for level in self.levels:
            lo, hi = central_interval(x, s, level, z[level])
            self.hits[level] = self.hits.get(level, 0) + int(inside(y, lo, hi).sum())
        for level, (lo, hi) in STORED.items():
            hit = int(inside(y, stored[lo], stored[hi]).sum())
            self.hits_stored[level] = self.hits_stored.get(level, 0) + hit
            self._sum(f"width_{round(level * 100)}", float((stored[hi] - stored[lo]).sum()))
        with np.errstate(divide="ignore", invalid="ignore"):
            z2 = np.where(s > 0, ((y - x) / s) ** 2, np.nan)
        self._sum("z2", float(np.nansum(z2)))
        self._sum("sd", float(s.sum()))
        self._sum("sq_err", squared_error(x, y)[0])

    def _sum(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def reliability(self) -> pd.DataFrame:
        """One row per level: ``nominal``, ``coverage`` (X ± z sd with the file's multiplier
        z of the level) and ``coverage_layers`` (the file's own bounds, at the levels it stores;
        else empty)."""
        n = max(self.n, 1)
        return pd.DataFrame(
            {
                "nominal": list(self.levels),
                "coverage": [self.hits[lv] / n for lv in self.levels],
                "coverage_layers": [
                    self.hits_stored[lv] / n if lv in self.hits_stored else np.nan
                    for lv in self.levels
                ],
            }
        )

    def summary(self) -> dict | None:
        """metrics.json ``calibration`` (docs/formats.md), or None when no slide had an sd."""
        if not self.n_slides:
            return None
        n, rel = self.n, self.reliability().set_index("nominal")
        gene_rho = pd.Series({g: np.mean(v) for g, v in self.gene_rho.items()}, dtype=float)
        spot_rho = np.concatenate(self.spot_rho)
        spot_rho = spot_rho[np.isfinite(spot_rho)]
        out = {"n_slides": self.n_slides, "n_values": n}
        for level in HEADLINE_LEVELS:
            pct = round(level * 100)
            source = "coverage_layers" if level in STORED else "coverage"
            out[f"coverage_{pct}"] = float(rel.loc[level, source])
        out.update(
            mean_sd=self.sums["sd"] / n,
            rmse=float(np.sqrt(self.sums["sq_err"] / n)),
            mean_squared_z=self.sums["z2"] / n,
            mean_width_80=self.sums["width_80"] / n,
            mean_width_95=self.sums["width_95"] / n,
            spearman_sd_error_per_gene=float(gene_rho.mean()),
            spearman_sd_error_per_spot=float(spot_rho.mean()) if len(spot_rho) else np.nan,
            n_genes_spearman=int(gene_rho.notna().sum()),
            n_spots_spearman=len(spot_rho),
            reliability=[
                {"nominal": lv, "coverage": float(rel.loc[lv, "coverage"])} for lv in self.levels
            ],
            intervals="X ± z·sd clipped at 0, z of the prediction (layers at 80 and 95 %)",
        )
        return out

    def write(self, out_dir: str | Path) -> dict | None:
        """Write ``calibration.csv`` (the reliability curve) and return the metrics.json block;
        nothing and None when no slide had an sd."""
        block = self.summary()
        if block is not None:
            with atomic_path(Path(out_dir) / keys.EVAL_CALIBRATION) as tmp:
                self.reliability().to_csv(tmp, index=False)
        return block
