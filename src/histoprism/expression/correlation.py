"""Pearson r per gene from co-moments, and the mean squared error of log1p(counts): the one
definition of each that evaluation, pooling over slides and validation during training share.

Co-moments (``MOMENT_COLUMNS``: rows used, two means, two sums of squared deviations, the sum of
cross deviations) are computed in float64 per block of genes and pooled over slides exactly
(Chan et al.'s parallel update), so no (spots x genes) matrix of a whole cohort is ever held.
A column whose std is rounding error of its mean is constant: its r is NaN, not noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

MOMENT_COLUMNS = ("n", "mean_pred", "mean_truth", "m2_pred", "m2_truth", "cross")
CONST_RTOL = 1e-12  # std below this share of |mean| is rounding error: the column is constant


def constant_genes(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(G,) bool: columns whose std is rounding error of their mean (or 0, or undefined)."""
    return (std <= CONST_RTOL * np.maximum(np.abs(mean), 1e-300)) | ~(std > 0)


# --- Pearson r per gene -------------------------------------------------------------------------
def comoments(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column co-moments of ``pred`` and ``truth`` over the rows where both are finite.

    pred, truth: (N, G) float, computed in float64. Returns {name: (G,) float64} for the names in
    ``MOMENT_COLUMNS``: ``n`` rows used, the two means, the two sums of squared deviations
    (``m2_*``) and the sum of cross products (``cross``).
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.ndim == 1:
        pred, truth = pred[:, None], truth.reshape(-1, 1)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must be the same (N, G)")
    ok = np.isfinite(pred) & np.isfinite(truth)
    n = ok.sum(axis=0).astype(np.float64)
    zero = np.zeros_like(n)
    mean_p = np.divide(np.where(ok, pred, 0.0).sum(axis=0), n, out=zero.copy(), where=n > 0)
    mean_t = np.divide(np.where(ok, truth, 0.0).sum(axis=0), n, out=zero.copy(), where=n > 0)
    # two-pass (centred) sums: exact zeros for constant columns, no cancellation
    dp = np.where(ok, pred - mean_p, 0.0)
    dt = np.where(ok, truth - mean_t, 0.0)
    return {
        "n": n,
        "mean_pred": mean_p,
        "mean_truth": mean_t,
        "m2_pred": np.einsum("ij,ij->j", dp, dp),
        "m2_truth": np.einsum("ij,ij->j", dt, dt),
        "cross": np.einsum("ij,ij->j", dp, dt),
    }


def pearson_from_moments(m: Mapping[str, np.ndarray] | pd.DataFrame) -> np.ndarray:
    """(G,) Pearson r from co-moments; NaN with < 2 rows or a constant column on either side."""
    n, mean_p, mean_t, m2_p, m2_t, cross = (
        np.asarray(m[k], dtype=np.float64) for k in MOMENT_COLUMNS
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        const_p = constant_genes(np.sqrt(m2_p / n), mean_p)
        const_t = constant_genes(np.sqrt(m2_t / n), mean_t)
        r = cross / np.sqrt(m2_p * m2_t)
    return np.where((n < 2) | const_p | const_t | ~np.isfinite(r), np.nan, np.clip(r, -1.0, 1.0))


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r across rows (spots) for each column (gene).

    pred, truth: (N, G) float. Returns (G,) float64; NaN where either column is constant (up to
    float rounding) or fewer than 2 rows are finite in both. Non-finite rows are left out per column.
    """
    return pearson_from_moments(comoments(pred, truth))


def merge_moments(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Pool the spots of two co-moment tables (rows = genes; Chan et al.'s parallel update).

    A gene missing from one table contributes nothing from it; ``n_slides`` (how many slides
    measured the gene) adds up.
    """
    genes = a.index.union(b.index, sort=False)
    a = a.reindex(genes, fill_value=0.0)
    b = b.reindex(genes, fill_value=0.0)
    n = a["n"] + b["n"]
    pooled = pool_comoments(a, b, w=(b["n"] / n).where(n > 0, 0.0))
    return pd.DataFrame({**pooled, "n_slides": a["n_slides"] + b["n_slides"]}, index=genes)


def pool_comoments(a: Mapping, b: Mapping, w) -> dict:
    """Chan et al.'s parallel update of two sets of co-moments (``MOMENT_COLUMNS``), ``w`` the
    weight of ``b`` in the pooled mean (n_b / n). Plain arithmetic, so numpy arrays, pandas
    columns and torch tensors (``validation.RunningMoments``, on the training device) share it."""
    k = a["n"] * w  # = n_a n_b / n
    d_p = b["mean_pred"] - a["mean_pred"]
    d_t = b["mean_truth"] - a["mean_truth"]
    return {
        "n": a["n"] + b["n"],
        "mean_pred": a["mean_pred"] + d_p * w,
        "mean_truth": a["mean_truth"] + d_t * w,
        "m2_pred": a["m2_pred"] + b["m2_pred"] + d_p * d_p * k,
        "m2_truth": a["m2_truth"] + b["m2_truth"] + d_t * d_t * k,
        "cross": a["cross"] + b["cross"] + d_p * d_t * k,
    }


def pooled_pearson(moments: pd.DataFrame, n_slides: int) -> pd.Series:
    """Pooled r per gene (HEST-bench protocol): only genes measured in all ``n_slides`` slides."""
    full = moments[moments["n_slides"] >= n_slides]
    return pd.Series(pearson_from_moments(full), index=full.index, name="pooled_r")


def squared_error(pred, truth, cols=None) -> tuple[float, int]:
    """(Σ (p - t)², number of terms) in float64 of predicted against measured log1p(counts), over
    the measured genes only: ``truth`` (N, G_m) holds the genes a slide measured and ``cols``
    (G_m,) their columns in ``pred`` (N, G); None when ``pred`` is already (N, G_m). Sums and
    counts add over slides: the pooled MSE is Σ sums / Σ counts. ``validation.RunningMoments``
    keeps this sum per gene in torch on the training device."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if cols is not None:
        pred = pred[:, np.asarray(cols)]
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    diff = pred.astype(np.float64) - truth.astype(np.float64)
    return float(np.square(diff).sum()), int(diff.size)


def mse(pred, truth, cols=None) -> float:
    """Mean squared error of predicted against measured log1p(counts) over the measured genes
    (``squared_error``); NaN when there is nothing to compare."""
    total, n = squared_error(pred, truth, cols)
    return total / n if n else float("nan")


def dense_block(X, rows, cols) -> np.ndarray:
    """(rows, cols) float64 block of a dense or sparse matrix (``rows``: indices or a slice): the
    blocks evaluate and calibration compute per-gene statistics on."""
    if sp.issparse(X):
        return np.asarray(X[rows][:, cols].toarray(), dtype=np.float64)
    X = np.asarray(X)
    if isinstance(rows, slice):
        return np.asarray(X[rows][:, cols], dtype=np.float64)
    return np.asarray(X[np.ix_(rows, cols)], dtype=np.float64)
