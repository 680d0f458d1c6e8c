"""Normality diagnostics of rotated queries (SPEC 2.6), vectorised over columns.

Skewness, excess kurtosis and the one-sample Kolmogorov-Smirnov p-value reproduce
``scipy.stats.skew(bias=False)``, ``scipy.stats.kurtosis(fisher=True, bias=False)`` and
``scipy.stats.kstest(z, 'norm')`` (scipy's default ``method='auto'``, which for the
one-sample two-sided test always means the exact distribution ``kstwo.sf(D, n)``,
clipped to [0, 1]) without a per-column Python loop.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr
from scipy.stats import kstwo

from .regression import as_matrix, as_vector, fit_position_regression, row_blocks

#: A column is "zero spread" when its ddof=1 standard deviation is <= ZERO_SPREAD_RTOL * scale.
ZERO_SPREAD_RTOL = 1e-10
#: Block length of the exact, pruned KS maximum search (see `ks_statistic_sorted`).
KS_BLOCK = 16


def column_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column means and central moments ``m_k = mean((x - mean)^k)`` for k = 2, 3, 4.

    Streams over row blocks (no (n, d) temporaries). Returns (mean, m2, m3, m4), each (d,).
    """
    X = as_matrix(X)
    n, d = X.shape
    mean = X.mean(axis=0)
    s2 = np.zeros(d)
    s3 = np.zeros(d)
    s4 = np.zeros(d)
    for sl in row_blocks(n, d):
        c = X[sl] - mean
        c2 = c * c
        s2 += c2.sum(axis=0)
        s3 += np.einsum("ij,ij->j", c2, c)
        s4 += np.einsum("ij,ij->j", c2, c2)
    return mean, s2 / n, s3 / n, s4 / n


def skew_kurtosis_from_moments(m2: np.ndarray, m3: np.ndarray, m4: np.ndarray, n: int):
    """Unbiased skewness and excess kurtosis from central moments, as scipy computes them.

    ``g1 = m3 / m2^1.5``; for n > 2: ``G1 = sqrt(n (n-1)) / (n-2) * g1`` (scipy.stats.skew, bias=False).
    ``g2 = m4 / m2^2``; for n > 3: ``G2 = ((n^2-1) g2 - 3 (n-1)^2) / ((n-2)(n-3))``
    (scipy.stats.kurtosis, fisher=True, bias=False); otherwise the biased ``g2 - 3``.
    Zero-variance columns give inf/NaN here; callers map them to 0.
    """
    m2 = np.asarray(m2, dtype=np.float64)
    with np.errstate(all="ignore"):
        if n > 2:
            skew = ((n - 1.0) * n) ** 0.5 / (n - 2.0) * m3 / m2**1.5
        else:
            skew = m3 / m2**1.5
        if n > 3:
            kurt = (1.0 / (n - 2) / (n - 3) * ((n**2 - 1.0) * m4 / m2**2.0 - 3 * (n - 1) ** 2.0) + 3.0) - 3.0
        else:
            kurt = m4 / m2**2.0 - 3.0
    return skew, kurt


def ks_statistic_sorted(S: np.ndarray) -> np.ndarray:
    """Two-sided KS statistic against N(0, 1) for each row of ``S`` (k, n), rows sorted ascending.

    ``D = max_i max((i+1)/n - Phi(z_(i)), Phi(z_(i)) - i/n)`` (i = 0..n-1), exactly the values
    ``scipy.stats.ks_1samp`` maximises, so the result is bit-identical to scipy's statistic.
    Phi is evaluated only where the maximum can lie: Phi at every KS_BLOCK-th order statistic
    gives exact values (a lower bound L) and, by monotonicity, an upper bound for each block;
    Phi is then evaluated inside the blocks whose bound reaches L.
    """
    S = np.asarray(S, dtype=np.float64)
    k, n = S.shape
    if k == 0:
        return np.zeros(0)
    B = KS_BLOCK
    if n <= 8 * B:
        F = ndtr(S)
        dp = np.arange(1.0, n + 1) / n - F
        dm = F - np.arange(0.0, n) / n
        return np.maximum(dp.max(axis=1), dm.max(axis=1))
    ends = np.arange(0, n, B)
    if ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    Fe = ndtr(S[:, ends])
    after = (ends + 1.0) / n  # ECDF just after order statistic i
    before = ends / n  # ECDF just before order statistic i
    L = np.maximum((after - Fe).max(axis=1), (Fe - before).max(axis=1))
    # block s holds order statistics ends[s] .. ends[s+1]; Phi is monotone between the ends
    ub = np.maximum(after[None, 1:] - Fe[:, :-1], Fe[:, 1:] - before[None, :-1])
    rows, segs = np.nonzero(ub >= L[:, None] - 1e-12)
    starts = ends[segs] + 1
    lens = ends[segs + 1] - starts
    D = L.copy()
    tot = int(lens.sum())
    if tot:
        offs = np.cumsum(lens) - lens
        idx = np.repeat(starts - offs, lens) + np.arange(tot)
        rr = np.repeat(rows, lens)
        F = ndtr(S[rr, idx])
        vals = np.maximum((idx + 1.0) / n - F, F - idx / n)
        np.maximum.at(D, rr, vals)
    return D


def ks_norm_pvalues(Z: np.ndarray, *, presorted: bool = False) -> np.ndarray:
    """p-values of ``scipy.stats.kstest(z, 'norm')`` for every row ``z`` of ``Z`` (k, n).

    ``p = clip(kstwo.sf(D, n), 0, 1)`` with D from `ks_statistic_sorted` (scipy's
    ``method='auto'`` selects this exact distribution for every n).
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[None, :]
    k, n = Z.shape
    if k == 0:
        return np.zeros(0)
    if n == 0:
        raise ValueError("KS test needs at least one observation")
    S = Z if presorted else np.sort(Z, axis=1)
    D = ks_statistic_sorted(S)
    return np.clip(np.asarray(kstwo.sf(D, n), dtype=np.float64), 0.0, 1.0)


def first_component_residual_stats(p: np.ndarray, x0: np.ndarray, *, scale: float | None = None):
    """(skew, excess kurtosis, KS p) of the standardised residual of ``x0 ~ a + b p`` (SPEC 2.6).

    ``r = x0 - a - b p`` (OLS, `fit_position_regression`); ``z = (r - mean r) / std(r, ddof=1)``;
    skew/kurtosis unbiased (scipy bias=False rules, incl. small n), KS two-sided against N(0, 1).
    Zero spread (fewer than 2 rows, or ``std(r) <= 1e-10 * scale``; ``scale`` defaults to
    ``sqrt(mean(x0^2))``) gives (0.0, 0.0, 1.0).
    """
    x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
    n = x0.shape[0]
    if n < 2:
        return 0.0, 0.0, 1.0
    p = as_vector(p, n)
    fit = fit_position_regression(p, x0[:, None])
    r = fit.residuals(p, x0[:, None])[:, 0]
    rc = r - r.mean()
    sd = float(np.sqrt((rc @ rc) / (n - 1)))
    if scale is None:
        scale = float(np.sqrt(np.mean(x0 * x0)))
    if not sd > ZERO_SPREAD_RTOL * scale:
        return 0.0, 0.0, 1.0
    z = rc / sd
    _, m2, m3, m4 = column_moments(z[:, None])
    skew, kurt = skew_kurtosis_from_moments(m2, m3, m4, n)
    ks_p = ks_norm_pvalues(z[None, :])
    return float(skew[0]), float(kurt[0]), float(ks_p[0])


def noise_normality_stats(
    X_sem: np.ndarray,
    normality_max_dims: int,
    p_alpha: float,
    seed: int,
    *,
    scale: float | None = None,
) -> dict:
    """Normality of the semantic columns ``X_sem`` = columns 1..d-1 of ``X_q_rot`` (SPEC 2.6).

    Each column is standardised (ddof=1). ``q_noise_med_abs_skew`` / ``q_noise_med_abs_kurt`` =
    median over all columns of |unbiased skew| / |unbiased excess kurtosis|. KS p-values on the
    ``min(normality_max_dims, m)`` columns ``numpy.random.default_rng(seed).choice(m, size,
    replace=False)`` (m = number of columns): ``q_noise_med_ks_p`` = their median,
    ``q_noise_frac_ks_p_lt_alpha`` = share with p < p_alpha (both NaN when no column is tested,
    i.e. normality_max_dims = 0). Zero-spread columns (std <= 1e-10 * scale; ``scale`` defaults
    to the RMS row norm of X_sem) count as skew 0, kurtosis 0, p 1. m = 0 or fewer than 3 rows:
    0, 0, 1, 0.
    """
    X = as_matrix(X_sem, "X_sem")
    n, m = X.shape
    if m == 0 or n < 3:
        return {
            "q_noise_med_abs_skew": 0.0,
            "q_noise_med_abs_kurt": 0.0,
            "q_noise_med_ks_p": 1.0,
            "q_noise_frac_ks_p_lt_alpha": 0.0,
        }
    mean, m2, m3, m4 = column_moments(X)
    sd = np.sqrt(m2 * (n / (n - 1.0)))
    if scale is None:
        scale = float(np.sqrt(np.sum(mean * mean + m2)))
    zero = ~(sd > ZERO_SPREAD_RTOL * scale)
    skew, kurt = skew_kurtosis_from_moments(m2, m3, m4, n)
    skew = np.where(zero, 0.0, skew)
    kurt = np.where(zero, 0.0, kurt)
    size = min(int(normality_max_dims), m)
    sel = np.random.default_rng(seed).choice(m, size=size, replace=False)
    pvals = np.ones(size)
    live = ~zero[sel]
    if np.any(live):
        cols = sel[live]
        Z = np.ascontiguousarray(X[:, cols].T)
        Z -= mean[cols][:, None]
        Z /= sd[cols][:, None]
        Z.sort(axis=1)
        pvals[live] = ks_norm_pvalues(Z, presorted=True)
    if size:
        med_p = float(np.median(pvals))
        frac = float(np.mean(pvals < p_alpha))
    else:
        med_p = frac = float("nan")
    return {
        "q_noise_med_abs_skew": float(np.median(np.abs(skew))),
        "q_noise_med_abs_kurt": float(np.median(np.abs(kurt))),
        "q_noise_med_ks_p": med_p,
        "q_noise_frac_ks_p_lt_alpha": frac,
    }
