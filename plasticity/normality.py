"""Normality diagnostics of rotated queries (docs/method.md#normality-diagnostics), vectorised over columns.

Skewness, excess kurtosis and the one-sample Kolmogorov-Smirnov p-value reproduce
``scipy.stats.skew(bias=False)``, ``scipy.stats.kurtosis(fisher=True, bias=False)`` and
``scipy.stats.kstest(z, 'norm')`` (scipy's default ``method='auto'``, which for the
one-sample two-sided test always means the exact distribution ``kstwo.sf(D, n)``,
clipped to [0, 1]) without a per-column Python loop.
"""

from __future__ import annotations

import numpy as np
from scipy.special import kolmogorov, ndtr

from .regression import as_matrix, as_vector, fit_position_regression, row_blocks

#: A column is "zero spread" when its ddof=1 standard deviation is <= ZERO_SPREAD_RTOL * scale.
ZERO_SPREAD_RTOL = 1e-10
#: The KS statistic's bins (`ks_grid`): z in [-KS_ZLIM, KS_ZLIM), KS_BINS_PER_SQRT_N sqrt(n) of them.
KS_ZLIM = 8.0
KS_BINS_PER_SQRT_N = 64.0


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


def ks_grid(n: int) -> tuple[float, np.ndarray]:
    """The bins `ks_statistic` counts a column of ``n`` values into: width ``h = 2 KS_ZLIM / nb`` in z
    on ``[-KS_ZLIM, KS_ZLIM)`` with ``nb = clip(ceil(KS_BINS_PER_SQRT_N sqrt(n)), 64, 65536)`` (a bin
    then spans at most ``0.4 h`` of Phi, a small fraction of the statistic's spread ``~1/sqrt(n)``),
    and Phi at the edges: ``(h, [0, Phi(-KS_ZLIM + i h) for i = 0..nb, 1])``."""
    nb = int(min(max(64, np.ceil(KS_BINS_PER_SQRT_N * np.sqrt(max(n, 1)))), 65536))
    nb += nb % 2  # an even count puts an edge at z = 0
    h = 2.0 * KS_ZLIM / nb
    return h, np.concatenate(([0.0], ndtr(-KS_ZLIM + h * np.arange(nb + 1.0)), [1.0]))


def ks_statistic(Z: np.ndarray, center: np.ndarray | None = None, sd: np.ndarray | None = None) -> np.ndarray:
    """Two-sided KS statistic against N(0, 1) of each row of ``Z`` (k, n), rows in any order.

    ``D = max_i max((i+1)/n - Phi(z_(i)), Phi(z_(i)) - i/n)`` over the order statistics
    ``z_(0) <= .. <= z_(n-1)``: exactly the values ``scipy.stats.ks_1samp`` maximises, so the
    result is bit-identical to scipy's statistic. No row is sorted: the compiled
    `plasticity.kernels.ks.ks_candidates` counts each row into the bins of `ks_grid` and returns,
    sorted and ranked, the values of the bins whose bound can reach the maximum; Phi
    (``scipy.special.ndtr``) is evaluated for those alone.

    With ``center`` and ``sd`` (k,), the statistic is that of ``z = (Z - center) / sd`` (row-wise),
    z computed (with exactly those two operations) only where Phi is needed.
    """
    from .kernels.ks import ks_candidates

    Z = np.ascontiguousarray(Z, dtype=np.float64)
    k, n = Z.shape
    if k == 0:
        return np.zeros(0)
    if n == 0:
        raise ValueError("KS test needs at least one observation")
    plain = center is None
    center = np.zeros(k) if plain else np.ascontiguousarray(center, dtype=np.float64).reshape(-1)
    sd = np.ones(k) if plain else np.ascontiguousarray(sd, dtype=np.float64).reshape(-1)
    h, phi_edges = ks_grid(n)
    vals, rank, rows = ks_candidates(Z, center, sd, phi_edges, h, KS_ZLIM)
    F = ndtr(vals if plain else (vals - center[rows]) / sd[rows])
    terms = np.maximum((rank + 1.0) / n - F, F - rank / n)
    # every row has candidates (the bin of its largest lower bound), row after row
    return np.maximum.reduceat(terms, np.searchsorted(rows, np.arange(k)))


_SQRT2PI = np.sqrt(2 * np.pi)
_SQRT3 = np.sqrt(3)
_PI_SQUARED = np.pi**2
_PI_FOUR = np.pi**4
_PI_SIX = np.pi**6
_MIN_LOG = -708


def _pelz_good_cdf(n: int, x: np.ndarray) -> np.ndarray:
    """Vectorised copy of scipy.stats._ksstats._kolmogn_PelzGood(n, x, cdf=True) for 0 < x < 1 with
    ``-pi^2 / (8 n x^2) >= -708``; same operations in the same order (elements are grouped by the
    length of the series so every sum has scipy's length and summation order)."""
    out = np.empty(x.shape[0])
    z_all = np.sqrt(n) * x
    maxk_all = np.ceil(16 * z_all / np.pi).astype(np.int64)
    powers_of_n = np.power(n * 1.0, np.arange(4) / 2.0)
    for maxk in np.unique(maxk_all):
        idx = np.flatnonzero(maxk_all == maxk)
        z = z_all[idx]
        zsquared, zthree, zfour, zsix = z**2, z**3, z**4, z**6
        q = np.exp(-_PI_SQUARED / 8 / zsquared)
        k1a = -zsquared
        k1b = _PI_SQUARED / 4
        k2a = 6 * zsix + 2 * zfour
        k2b = (2 * zfour - 5 * zsquared) * _PI_SQUARED / 4
        k2c = _PI_FOUR * (1 - 2 * zsquared) / 16
        k3d = _PI_SIX * (5 - 30 * zsquared) / 64
        k3c = _PI_FOUR * (-60 * zsquared + 212 * zfour) / 16
        k3b = _PI_SQUARED * (135 * zfour - 96 * zsix) / 4
        k3a = -30 * zsix - 90 * z**8
        K = np.zeros((4, idx.shape[0]))
        for k in range(int(maxk), 0, -1):
            m = 2 * k - 1
            msquared, mfour, msix = m**2, m**4, m**6
            qpower = np.power(q, 8 * k)
            K *= qpower
            K[0] += 1.0
            K[1] += k1a + k1b * msquared
            K[2] += k2a + k2b * msquared + k2c * mfour
            K[3] += k3a + k3b * msquared + k3c * mfour + k3d * msix
        K *= q
        K *= _SQRT2PI
        K /= np.array([z, 6 * zfour, 72 * z**7, 6480 * z**10])
        q2 = np.exp(-_PI_SQUARED / 2 / zsquared)
        ks = np.arange(int(maxk), 0, -1)
        ksquared = ks**2
        sqrt3z = _SQRT3 * z
        kspi = np.pi * ks
        qpwers = q2[:, None] ** ksquared[None, :]
        k2extra = np.sum(ksquared * qpwers, axis=1)
        k2extra *= _PI_SQUARED * _SQRT2PI / (-36 * zthree)
        K[2] += k2extra
        k3extra = np.sum((sqrt3z[:, None] + kspi) * (sqrt3z[:, None] - kspi) * ksquared * qpwers, axis=1)
        k3extra *= _PI_SQUARED * _SQRT2PI / (216 * zsix)
        K[3] += k3extra
        K /= powers_of_n[:, None]
        out[idx] = ((K[0] + K[1]) + K[2]) + K[3]
    return out


_STIRLING_MIN = 40


def _stirling_tail(k):
    """``log(k!) - (k log k - k + log(2 pi k) / 2)`` for k >= 40 (series to k^-7; error < 1e-17)."""
    ik = 1.0 / k
    ik2 = ik * ik
    return ik * (1.0 / 12 - ik2 * (1.0 / 360 - ik2 * (1.0 / 1260 - ik2 * (1.0 / 1680))))


def smirnov_sf(n: int, x: float) -> float:
    """One-sided Smirnov survival function ``P(D_n^+ >= x)`` (what ``scipy.special.smirnov`` returns).

    Birnbaum-Tingey sum ``x sum_{v=0}^{floor(n(1-x))} C(n,v) (x + v/n)^(v-1) (1 - x - v/n)^(n-v)``,
    every term in log space with Stirling's series written so that no large logarithms cancel
    (``v log1p(n x / v) + (n-v) log1p(-n x / (n-v)) + ...``), summed as ``exp(max) * sum(exp(L - max))``.
    Agrees with scipy (double-double arithmetic) to ~2e-13 relative for n > 140, x < 0.5, in a few
    milliseconds instead of O(n) double-double operations.
    """
    n = int(n)
    xn = x * n
    v = np.arange(0, int(np.floor(n * (1.0 - x))) + 1, dtype=np.float64)
    k = n - v
    bn = k - xn  # n * (1 - x - v/n)
    keep = bn > 0
    v, k, bn = v[keep], k[keep], bn[keep]
    if v.shape[0] == 0:
        return 0.0
    a = (xn + v) / n
    L = np.empty(v.shape[0])
    mid = (v >= _STIRLING_MIN) & (k >= _STIRLING_MIN)
    vm, km = v[mid], k[mid]
    L[mid] = (
        vm * np.log1p(xn / vm) + km * np.log1p(-xn / km) - np.log(a[mid])
        + 0.5 * np.log(n / (2 * np.pi * vm * km))
        + _stirling_tail(float(n)) - _stirling_tail(vm) - _stirling_tail(km)
    )
    i = np.arange(min(_STIRLING_MIN, n), dtype=np.float64)
    logc = np.r_[0.0, np.cumsum(np.log(n - i) - np.log(i + 1))]  # log C(n, j), j < 40
    lo = v < _STIRLING_MIN
    vl = v[lo]
    L[lo] = logc[vl.astype(np.int64)] + (vl - 1) * np.log(a[lo]) + k[lo] * np.log1p(-a[lo])
    hi = ~mid & ~lo  # n - v < 40: C(n, v) = C(n, n - v)
    kh = k[hi]
    bh = bn[hi] / n
    L[hi] = logc[kh.astype(np.int64)] + (v[hi] - 1) * np.log1p(-bh) + kh * np.log(bh)
    L += np.log(x)
    m = L.max()
    return float(np.exp(m + np.log(np.sum(np.exp(L - m)))))


def kstwo_sf(D: np.ndarray, n: int) -> np.ndarray:
    """``scipy.stats.kstwo.sf(D, n)`` for an array of statistics and one sample size.

    For n > 140 the two branches scipy evaluates for typical D are done here with scipy's
    formulas: ``2 * smirnov(n, D)`` (when ``2.2 <= n D^2 < 370``, via `smirnov_sf`) and the
    Pelz-Good series (vectorised); every other case calls ``kstwo.sf`` itself. Agrees with scipy
    to ~1e-12 relative (tested).
    """
    D = np.asarray(D, dtype=np.float64).reshape(-1)
    n = int(n)
    out = np.full(D.shape[0], np.nan)
    rest = np.ones(D.shape[0], bool)
    if n > 140:
        t = n * D
        nxsq = t * D
        inner = (D > 0.0) & (D < 0.5) & (t > 1.0) & (t < n - 1)
        smir = inner & (nxsq >= 2.2) & (nxsq < 370.0)
        for j in np.flatnonzero(smir):
            out[j] = min(max(2 * smirnov_sf(n, float(D[j])), 0.0), 1.0)
        pg = inner & (nxsq < 2.2) & ~((n <= 100000) & (n * D**1.5 <= 1.4))
        with np.errstate(divide="ignore"):
            pg &= (-_PI_SQUARED / 8 / (n * D * D)) >= _MIN_LOG
        if np.any(pg):
            out[pg] = np.clip(1.0 - _pelz_good_cdf(n, D[pg]), 0.0, 1.0)
        # scipy's _kolmogn returns exactly 0.0 for the survival function when n D^2 >= 370
        zero = inner & (nxsq >= 370.0)
        out[zero] = 0.0
        rest = ~(smir | pg | zero)
    if np.any(rest):
        from scipy.stats import kstwo  # imported here: scipy.stats costs ~1 s of start-up per worker

        out[rest] = np.asarray(kstwo.sf(D[rest], n), dtype=np.float64)
    return out


#: For n > 140 and 1e-7 <= p <= 0.6 the Stephens-corrected Kolmogorov approximation is within
#: [0.95, 1.02] of the exact p-value (checked for n = 141 .. 200000); it decides "p < p_alpha" on
#: its own only when it is more than a factor 1.5 away from p_alpha.
_APPROX_DECISIVE_FACTOR = 1.5


def ks_median_and_fraction(D: np.ndarray, n: int, p_alpha: float) -> tuple[float, float]:
    """``(median(p), mean(p < p_alpha))`` of the KS p-values ``p = clip(kstwo.sf(D, n), 0, 1)``
    without computing every p (each can cost milliseconds for large n).

    p is non-increasing in D, so the median is the exact p of the middle order statistic(s) of D,
    and ``p < p_alpha`` holds exactly for the largest D's: their boundary is located with exact
    p-values, where an asymptotic approximation (Stephens-corrected Kolmogorov) is not decisive.
    """
    D = np.sort(np.asarray(D, dtype=np.float64).reshape(-1))
    k = D.shape[0]
    if k == 0:
        return float("nan"), float("nan")
    cache: dict[int, float] = {}

    def p_at(idx):
        need = [i for i in idx if i not in cache]
        if need:
            vals = np.clip(kstwo_sf(D[need], n), 0.0, 1.0)
            cache.update(zip(need, vals.tolist()))
        return [cache[i] for i in idx]

    if k % 2:
        med = p_at([k // 2])[0]
    else:
        a, b = p_at([k // 2 - 1, k // 2])
        med = float(np.mean([a, b]))
    sq = np.sqrt(n)
    approx = kolmogorov(D * (sq + 0.12 + 0.11 / sq))
    usable = n > 140 and p_alpha >= 1e-7

    def below(i):  # exact "p_i < p_alpha"
        if i in cache:
            return cache[i] < p_alpha
        if usable and not (p_alpha / _APPROX_DECISIVE_FACTOR <= approx[i] <= p_alpha * _APPROX_DECISIVE_FACTOR):
            return bool(approx[i] < p_alpha)
        return p_at([i])[0] < p_alpha

    # p < p_alpha holds exactly for the indices f..k-1 of the ascending D; find f
    c = k - int(np.sum(approx < p_alpha))
    lo, hi, tries = 0, k, 0
    while True:
        c = min(max(c, lo), hi)
        up = c < k and not below(c)
        down = c > 0 and below(c - 1)
        if up:
            lo = c + 1
        elif down:
            hi = c - 1
        else:
            break
        tries += 1
        c = (c + 1 if up else c - 1) if tries < 3 else (lo + hi) // 2
    return float(med), (k - c) / k


def ks_norm_pvalues(Z: np.ndarray) -> np.ndarray:
    """p-values of ``scipy.stats.kstest(z, 'norm')`` for every row ``z`` of ``Z`` (k, n).

    ``p = clip(kstwo.sf(D, n), 0, 1)`` (see `kstwo_sf`) with D from `ks_statistic`
    (scipy's ``method='auto'`` selects this exact distribution for every n).
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[None, :]
    k, n = Z.shape
    if k == 0:
        return np.zeros(0)
    if n == 0:
        raise ValueError("KS test needs at least one observation")
    D = ks_statistic(Z)
    return np.clip(kstwo_sf(D, n), 0.0, 1.0)


def first_component_residual_stats(p: np.ndarray, x0: np.ndarray, *, scale: float | None = None):
    """(skew, excess kurtosis, KS p) of the standardised residual of ``x0 ~ a + b p`` (docs/method.md#normality-diagnostics).

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


def ks_columns(m: int, normality_max_dims: int, seed: int) -> np.ndarray:
    """The semantic columns (0-based among the m) that get a KS test:
    ``numpy.random.default_rng(seed).choice(m, size=min(normality_max_dims, m), replace=False)``."""
    size = min(int(normality_max_dims), int(m))
    if size <= 0:
        return np.zeros(0, np.int64)
    return np.random.default_rng(seed).choice(m, size=size, replace=False)


def noise_summary(
    n: int,
    m2: np.ndarray,
    m3: np.ndarray,
    m4: np.ndarray,
    Z: np.ndarray,
    Z_center: np.ndarray,
    sel: np.ndarray,
    scale: float,
    p_alpha: float,
) -> dict:
    """The four noise statistics (docs/method.md#normality-diagnostics) from the central moments m2, m3, m4 of the m semantic columns.

    ``Z`` (len(sel), n) holds the values of the tested columns ``sel`` (any common shift per row)
    and ``Z_center`` their means in the same shift (standardised only where the KS statistic
    evaluates Phi, see `ks_statistic`).
    See `noise_normality_stats` for the definitions.
    """
    m = m2.shape[0]
    if m == 0 or n < 3:
        return {
            "q_noise_med_abs_skew": 0.0,
            "q_noise_med_abs_kurt": 0.0,
            "q_noise_med_ks_p": 1.0,
            "q_noise_frac_ks_p_lt_alpha": 0.0,
        }
    sd = np.sqrt(m2 * (n / (n - 1.0)))
    zero = ~(sd > ZERO_SPREAD_RTOL * scale)
    skew, kurt = skew_kurtosis_from_moments(m2, m3, m4, n)
    skew = np.where(zero, 0.0, skew)
    kurt = np.where(zero, 0.0, kurt)
    size = sel.shape[0]
    D = np.zeros(size)  # zero-spread columns: D = 0, p = 1
    live = ~zero[sel]
    if np.any(live):
        Zl = Z if np.all(live) else Z[live]
        D[live] = ks_statistic(Zl, np.asarray(Z_center)[live], sd[sel[live]])
    med_p, frac = ks_median_and_fraction(D, n, p_alpha)
    return {
        "q_noise_med_abs_skew": float(np.median(np.abs(skew))),
        "q_noise_med_abs_kurt": float(np.median(np.abs(kurt))),
        "q_noise_med_ks_p": med_p,
        "q_noise_frac_ks_p_lt_alpha": frac,
    }


def noise_normality_stats(
    X_sem: np.ndarray,
    normality_max_dims: int,
    p_alpha: float,
    seed: int,
    *,
    scale: float | None = None,
) -> dict:
    """Normality of the semantic columns ``X_sem`` = columns 1..d-1 of ``X_q_rot`` (docs/method.md#normality-diagnostics).

    Each column is standardised (``(x - mean) / std(x, ddof=1)``). ``q_noise_med_abs_skew`` /
    ``q_noise_med_abs_kurt`` = median over all columns of |unbiased skew| / |unbiased excess
    kurtosis|. KS p-values (``scipy.stats.kstest(z, 'norm')``) on the ``min(normality_max_dims, m)``
    columns `ks_columns` picks (m = number of columns): ``q_noise_med_ks_p`` = their median,
    ``q_noise_frac_ks_p_lt_alpha`` = share with p < p_alpha (both NaN when no column is tested,
    i.e. normality_max_dims = 0). Zero-spread columns (std <= 1e-10 * scale; ``scale`` defaults
    to the RMS row norm of X_sem) count as skew 0, kurtosis 0, p 1. m = 0 or fewer than 3 rows:
    0, 0, 1, 0.
    """
    X = as_matrix(X_sem, "X_sem")
    n, m = X.shape
    if m == 0 or n < 3:
        z = np.zeros(0)
        return noise_summary(n, z, z, z, np.zeros((0, n)), z, np.zeros(0, np.int64), 1.0, p_alpha)
    mean, m2, m3, m4 = column_moments(X)
    if scale is None:
        scale = float(np.sqrt(np.sum(mean * mean + m2)))
    sel = ks_columns(m, normality_max_dims, seed)
    Z = np.ascontiguousarray(X[:, sel].T)
    return noise_summary(n, m2, m3, m4, Z, mean[sel], sel, scale, p_alpha)
