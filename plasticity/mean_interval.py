"""The 95% interval of a mean of several heads' AP, from their own standard errors (the plots' bands).

Heads of one model are measured on the same examples, so their estimation errors are correlated in
an unknown way and their standard errors do not combine as if independent. Whatever the correlation,
``|cov(e_i, e_j)| <= s_i s_j``, so for the mean of k estimates

    Var(mean_i x_i) = (1/k^2) sum_ij cov(e_i, e_j) <= ((1/k) sum_i s_i)^2,

i.e. the mean of the standard errors bounds the standard error of the mean (with equality when the
errors are perfectly correlated; with independent errors the true value is sqrt(sum s_i^2) / k,
smaller by up to sqrt(k)). The interval is therefore conservative: at least 95%.
"""

from __future__ import annotations

import numpy as np
from scipy.special import stdtrit

from .jackknife import CI_LEVEL


def mean_interval_bound(estimate, se, df, level: float = CI_LEVEL):
    """Mean of the heads' estimates with a conservative interval, per row (rows = points of a curve,
    columns = heads; a NaN estimate means the head is not part of that row's mean):

        mean = mean_i x_i,   se_bound = mean_i s_i,   mean -/+ t_{(1+level)/2, min_i df_i} se_bound,

    clipped to [0, 1] (where AP lives). The smallest degrees of freedom give the widest t quantile.
    The interval is NaN for a row without estimates, or where any head in the row has a non-finite
    standard error or fewer than 1 degree of freedom (its error is unknown, so no bound exists).

    Returns ``(mean, se_bound, low, high)``, each of shape (rows,), float64.
    """
    x = np.atleast_2d(np.asarray(estimate, dtype=np.float64))
    s = np.broadcast_to(np.asarray(se, dtype=np.float64), x.shape)
    d = np.broadcast_to(np.asarray(df, dtype=np.float64), x.shape)
    present = np.isfinite(x)
    n = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(present, x, 0.0).sum(axis=1) / n
        known = (~present | (np.isfinite(s) & (d >= 1))).all(axis=1) & (n > 0)
        se_bound = np.where(known, np.where(present, s, 0.0).sum(axis=1) / n, np.nan)
        min_df = np.where(present, d, np.inf).min(axis=1)
        half = stdtrit(np.where(known, min_df, 1.0), 0.5 + 0.5 * level) * se_bound
    mean = np.where(n > 0, mean, np.nan)
    return mean, se_bound, np.clip(mean - half, 0.0, 1.0), np.clip(mean + half, 0.0, 1.0)


def t_interval_of_mean(values, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """Mean of n values (n >= 2) and its two-sided t-interval, the values taken as a sample:

        mean -/+ t_{(1+level)/2, n-1} * sd / sqrt(n),   sd with n - 1 degrees of freedom.

    Returns ``(mean, low, high)`` as floats."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a t-interval needs at least 2 values")
    mean = float(x.mean())
    half = float(stdtrit(x.size - 1, 0.5 + 0.5 * level)) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return mean, mean - half, mean + half
