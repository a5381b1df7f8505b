"""log1p of a negative-binomial count: E[log1p Y] and Var[log1p Y], Y ~ NB(mean mu, shape r).

The one implementation behind the synthetic cohort's ceiling (E) and the uncertainty's count
noise (Var): float64, accurate from mu = 1e-9 to 1e9 and shapes 0.2 (overdispersed) to 1e4.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betainc, digamma, gammaln, polygamma

EXACT_TERMS = 4096  # pmf summed exactly over 0..4095, then over log-spaced bins of the cdf
ASYMPTOTE_MU, ASYMPTOTE_SHAPE = 2000.0, 1.5  # gamma asymptote above this mean and shape


def nb_log1p_moments(mu: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """E and Var of log1p(Y), Y ~ NB(mean mu, shape r): (M,) -> (M,), (M,) float64.

    Exact pmf sums up to ``EXACT_TERMS``, then cdf differences over log-spaced bins (their
    log1p taken at the bin's middle, plus the within-bin variance of a uniform); large means of
    a not-too-dispersed gene use the gamma-Poisson asymptote (log lambda with lambda ~ Gamma).
    """
    mu = np.asarray(mu, dtype=np.float64)
    p = r / (r + mu)  # scipy's NB(n=r, p): mean r (1-p) / p = mu
    y = np.arange(EXACT_TERMS, dtype=np.float64)
    logpmf = (gammaln(y + r) - gammaln(r) - gammaln(y + 1))[None] + (
        r * np.log(p)[:, None] + y[None] * np.log1p(-p)[:, None]
    )
    pmf, f = np.exp(logpmf), np.log1p(y)
    e1, e2 = pmf @ f, pmf @ (f * f)
    edges = np.unique(np.round(np.geomspace(EXACT_TERMS, 1e15, 400)))
    mass = np.diff(betainc(r, edges[None], p[:, None]), axis=1)  # P(lo <= Y < hi)
    lo, hi = np.log1p(edges[:-1]), np.log1p(edges[1:] - 1)
    mid = (lo + hi) / 2
    e1 += mass @ mid
    e2 += mass @ (mid * mid + (hi - lo) ** 2 / 12)
    var = np.maximum(e2 - e1 * e1, 0.0)
    big = (mu > ASYMPTOTE_MU) & (r > ASYMPTOTE_SHAPE)
    inv = r / (mu[big] * (r - 1))  # E[1 / lambda]
    e1[big] = np.log(mu[big]) + digamma(r) - np.log(r) + inv / 2
    var[big] = polygamma(1, r) + inv
    return e1, var
