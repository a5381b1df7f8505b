"""The synthetic cohort's ceiling: E[log1p(counts) | what the tissue shows], per gene.

Everything hidden enters a gene's log mean additively and is N(0, hidden_sd^2) given the visible
state, so the ceiling is a 1-D function of the visible log mean. Data path:

1. ``_nb_log1p_fine(phi)``: E[log1p X], X ~ NB(mean exp(l), dispersion phi), on a fine grid of
   log means l (FINE_N,) float64, from ``expression.negbin.nb_log1p_moments`` (shape 1/phi).
2. ``ceiling_table(phi, hidden_sd, n_nodes)``: Gauss-Hermite over the hidden term, per gene
   (G,) -> (G, LOGMU_N) float32 on the coarse log-mean grid.
3. ``ceiling_at(table, log_mu)``: linear interpolation of the table rows of g genes at the
   visible log means (N, g) -> (N, g) float32.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..expression.negbin import nb_log1p_moments

LOGMU_LO, LOGMU_STEP, LOGMU_N = -16.0, 0.1, 321  # uniform grid of visible log NB means
FINE_LO, FINE_STEP, FINE_N = -26.0, 0.02, 2601  # finer grid for the un-smoothed expectation


@cache
def _nb_log1p_fine(phi: float) -> np.ndarray:
    """E[log1p(X)], X ~ NB(mean=exp(l), dispersion phi), on the fine log-mean grid: (FINE_N,)."""
    mu = np.exp(FINE_LO + FINE_STEP * np.arange(FINE_N))
    return nb_log1p_moments(mu, 1.0 / phi)[0]


def ceiling_table(phi: np.ndarray, hidden_sd: np.ndarray, n_nodes: int) -> np.ndarray:
    """Per-gene E[log1p(counts)] as a function of the visible log mean, (G, LOGMU_N) float32.

    ``phi`` (G,) is each gene's NB dispersion (var = mu + phi mu^2), ``hidden_sd`` (G,) the sd of
    its hidden log-scale term N(0, hidden_sd^2), integrated with ``n_nodes`` Gauss-Hermite nodes.
    """
    nodes, weights = np.polynomial.hermite.hermgauss(n_nodes)
    grid = LOGMU_LO + LOGMU_STEP * np.arange(LOGMU_N)
    out = np.empty((len(phi), LOGMU_N), dtype=np.float32)
    for level in np.unique(phi):
        genes = np.flatnonzero(phi == level)
        fine = _nb_log1p_fine(float(level))
        shift = np.sqrt(2.0) * hidden_sd[genes, None, None] * nodes  # (g, 1, Q)
        t = np.clip((grid[None, :, None] + shift - FINE_LO) / FINE_STEP, 0, FINE_N - 1.001)
        i = t.astype(np.int64)
        value = fine[i] + (t - i) * (fine[i + 1] - fine[i])  # (g, M, Q)
        out[genes] = value @ weights / np.sqrt(np.pi)
    return out


def ceiling_at(table: np.ndarray, log_mu: np.ndarray) -> np.ndarray:
    """E[log1p(counts) | visible state], (N, g) float32, by interpolating ceiling tables.

    ``table`` (g, LOGMU_N) holds the ``ceiling_table`` rows of the g genes whose visible log mean
    is ``log_mu`` (N, g).
    """
    t = np.clip((log_mu - LOGMU_LO) / LOGMU_STEP, 0, LOGMU_N - 1.001).astype(np.float32)
    i = t.astype(np.int64)
    frac = t - i
    i += (np.arange(len(table)) * LOGMU_N)[None]  # row offsets into the flattened (g, M) table
    flat = table.ravel()
    return flat[i] + frac * (flat[i + 1] - flat[i])
