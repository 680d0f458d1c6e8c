"""The attention plasticity of one key pair (docs/method.md#attention-plasticity) and its slopes in the pair's moments.

For a key difference ``D`` and a Gaussian query model with mean ``mu`` and covariance ``S``:
``m = D . mu``, ``v = D^T S D`` (``v <= 0 -> 1e-12``), ``z = m / sqrt(v)``, ``p = Phi(z)``,
``AP = 4 p (1 - p)``; and the same corrected for the sampling noise of an estimated mean
(`debiased_ap`, with the variance of that noise from `mean_noise_variance`).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

#: Floor replacing non-positive pair variances ``v`` (docs/method.md#attention-plasticity).
VAR_FLOOR = 1e-12
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def floored_z(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z, v')``: ``v' = v`` where ``v > 0`` and 1e-12 elsewhere, ``z = m / sqrt(v')`` (float64)."""
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    v = np.where(v <= 0.0, VAR_FLOOR, v)
    return m / np.sqrt(v), v


def ap_from_moments(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention plasticity of a pair: ``AP = 4 p (1 - p)``, ``p = Phi(m / sqrt(v))`` (scipy.special.ndtr),
    where ``v <= 0`` is replaced by 1e-12. AP lies in [0, 1]; it is 1 when m = 0."""
    p = ndtr(floored_z(m, v)[0])
    return 4.0 * p * (1.0 - p)


def ap_with_slopes(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(AP, dAP/dm, dAP/dv)`` per pair. AP has the bits of `ap_from_moments`;
    ``dAP/dm = 4 (1 - 2p) phi(z) / sqrt(v)``; ``dAP/dv = -2 (1 - 2p) phi(z) z / v``, which is
    non-negative (a wider query spread never lowers AP) and 0 where ``v <= 0`` was floored."""
    z, vf = floored_z(m, v)
    p = ndtr(z)
    ap = 4.0 * p * (1.0 - p)
    dap_dz = 4.0 * (1.0 - 2.0 * p) * (_INV_SQRT_2PI * np.exp(-0.5 * z * z))
    dap_dm = dap_dz / np.sqrt(vf)
    dap_dv = np.where(np.asarray(v) > 0.0, np.maximum(-0.5 * dap_dz * z / vf, 0.0), 0.0)
    return ap, dap_dm, dap_dv


# ----------------------------------------------------------------------------- the debiased pair AP
#
# bucket_full_cov plugs estimated means into ``m``: ``m_hat = D . mean_hat`` scatters around the true
# ``m`` with variance ``w = D^T Var(mean_hat) D``, and AP is concave near m = 0 (AP ~ 1 - (2/pi) z^2),
# so ``AP(m_hat, v)`` reads low by about (2/pi) w / v. With ``y = m_hat / sqrt(v) ~ N(z, s2)``,
# ``s2 = w / v``, the function whose expectation is exactly ``4 Phi(z) (1 - Phi(z))`` follows from
# E[Phi(a Y)] = Phi(a z / sqrt(1 + a^2 s2)) and, for two standard normals with correlation r
# independent of Y, P(X1 <= a Y, X2 <= a Y) = Phi2(a z / sqrt(1 + a^2 s2); (r + a^2 s2) / (1 + a^2 s2)):
# a^2 = 1 / (1 - s2) and r = -s2 / (1 - s2) give back Phi(z) and Phi(z)^2. By Plackett's identity
# (dPhi2/dr = the bivariate density) the estimate 4 (Phi(x) - Phi2(x, x; r)) is
#
#     AP_w = 4 Phi(x) (1 - Phi(x)) + (2/pi) int_0^rho exp(-x^2 / (1 - t)) / sqrt(1 - t^2) dt,
#     x = m / sqrt(v - w),   rho = w / (v - w)
#
# (= 8 T(x, 1 / sqrt(1 - 2 s2)) with Owen's T). The integral runs over [0, rho] with rho <= 1/3 and a
# smooth integrand, so a 4-node Gauss-Legendre rule evaluates it to within 1e-14 for rho <= 0.11
# (buckets of 10 queries or more) and 1e-9 at rho = 1/3 (tests check it against scipy's owens_t).

#: Largest ``s2 = w / v`` corrected for (rho <= 1/3); ``s2 <= max(1 / n_j, ...)``, so only buckets of
#: fewer than 4 queries reach it (they are flagged as too small for a calibrated interval anyway).
S2_MAX = 0.25
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def _debias_terms(m, v, w):
    """``(x, rho, scale, vf, s2, floored, clipped)``: ``vf`` = v with ``v <= 0 -> 1e-12``,
    ``s2 = w / vf`` clipped to [0, S2_MAX], ``scale = 1 / sqrt(vf - s2 vf)``, ``x = m scale``,
    ``rho = s2 / (1 - s2)``."""
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    floored = v <= 0.0
    vf = np.where(floored, VAR_FLOOR, v)
    ratio = np.asarray(w, dtype=np.float64) / vf
    s2 = np.clip(ratio, 0.0, S2_MAX)
    scale = 1.0 / np.sqrt(vf * (1.0 - s2))
    return m * scale, s2 / (1.0 - s2), scale, vf, s2, floored, ratio > S2_MAX


def _correction(x, rho, slopes: bool = False):
    """``I = (2/pi) int_0^rho exp(-x^2/(1-t)) / sqrt(1-t^2) dt`` by Gauss-Legendre; with ``slopes``
    also ``dI/dx`` and ``dI/drho = (2/pi) exp(-x^2/(1-rho)) / sqrt(1-rho^2)``."""
    half = 0.5 * rho
    x2 = x * x
    total = np.zeros(np.broadcast(x, rho).shape)
    slope = np.zeros_like(total) if slopes else None
    for node, weight in zip(_GL_NODES, _GL_WEIGHTS):
        t = half * (1.0 + node)
        inv = 1.0 / (1.0 - t)
        f = (weight / np.sqrt(1.0 - t * t)) * np.exp(-x2 * inv)
        total += f
        if slopes:
            slope += f * inv
    c = (2.0 / np.pi) * half
    if not slopes:
        return c * total
    at_rho = (2.0 / np.pi) * np.exp(-x2 / (1.0 - rho)) / np.sqrt(1.0 - rho * rho)
    return c * total, -2.0 * x * c * slope, at_rho


def debiased_ap(m: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pair AP corrected for the sampling noise of the model mean (variance ``w`` of ``m``):

        AP_w = 4 Phi(x) (1 - Phi(x)) + (2/pi) int_0^rho exp(-x^2/(1-t)) / sqrt(1-t^2) dt,
        x = m / sqrt(v - w),  rho = w / (v - w),

    whose expectation over ``m_hat ~ N(m, w)`` is exactly ``4 p (1 - p)``, ``p = Phi(m / sqrt(v))``
    (``v <= 0 -> 1e-12``; ``w`` clipped to [0, v/4]). ``w = 0`` gives `ap_from_moments` up to
    rounding. A single value can exceed 1 (by at most (2/pi) asin(rho)); means of them are clipped by
    the caller.
    """
    x, rho = _debias_terms(m, v, w)[:2]
    p = ndtr(x)
    return 4.0 * p * (1.0 - p) + _correction(x, rho)


def debiased_ap_with_slopes(m: np.ndarray, v: np.ndarray, w: np.ndarray):
    """``(AP_w, dAP_w/dm, dAP_w/dv, dAP_w/dw)``, partial derivatives in the three moments. With
    ``u = v - w``, ``A'(x) = 4 (1 - 2p) phi(x) + dI/dx`` and ``I_rho = dI/drho``:

        dAP/dm = A'(x) / sqrt(u),
        dAP/dv = -A'(x) x / (2u) - I_rho w / u^2,     dAP/dw = A'(x) x / (2u) + I_rho v / u^2.

    Where ``v <= 0`` was floored both variance slopes are 0; where ``w > v/4`` was clipped ``w`` moves
    with ``v`` (``dAP/dv`` takes ``dAP/dw / 4``, ``dAP/dw`` is 0). AP_w has the bits of `debiased_ap`."""
    x, rho, scale, vf, s2, floored, clipped = _debias_terms(m, v, w)
    p = ndtr(x)
    corr, dcorr, i_rho = _correction(x, rho, slopes=True)
    ap = 4.0 * p * (1.0 - p) + corr
    dap_dx = 4.0 * (1.0 - 2.0 * p) * (_INV_SQRT_2PI * np.exp(-0.5 * x * x)) + dcorr
    u_inv = scale * scale  # 1 / (v - w)
    half_x = 0.5 * dap_dx * x * u_inv
    dap_dw = half_x + i_rho * vf * u_inv * u_inv
    dap_dv = -half_x - i_rho * (s2 * vf) * u_inv * u_inv
    dap_dv = np.where(clipped, dap_dv + S2_MAX * dap_dw, dap_dv)
    dap_dw = np.where(clipped, 0.0, dap_dw)
    return ap, dap_dx * scale, np.where(floored, 0.0, dap_dv), np.where(floored, 0.0, dap_dw)


def fitted_mean_variance(tau: np.ndarray, sigma2: float, positions: np.ndarray) -> np.ndarray:
    """Sampling variance of a least-squares line's value at ``tau`` fitted to ``positions`` (all the
    queries of the position fit) with residual variance ``sigma2``:

        sigma2 (1/N + (tau - mean(p))^2 / sum((p - mean(p))^2)),   sigma2 / N when positions do not vary.
    """
    p = np.asarray(positions, dtype=np.float64).reshape(-1)
    n = p.shape[0]
    tau = np.asarray(tau, dtype=np.float64)
    if n == 0:
        return np.full(tau.shape, np.nan)
    pbar = float(p.mean())
    pc = p - pbar
    sxx = float(pc @ pc) if p.max() != p.min() else 0.0
    lever = (tau - pbar) ** 2 / sxx if sxx > 0.0 else np.zeros(tau.shape)
    return float(sigma2) * (1.0 / n + lever)


def mean_noise_variance(v: np.ndarray, D0: np.ndarray, sigma2: float, n_j: int, lever: float) -> np.ndarray:
    """Variance ``w`` of ``m = D0 m0_j + D[1:] . mu_j`` over the sampling of the queries, with ``D0`` the
    pair's rotated component 0 and ``v = D0^2 sigma2 + D[1:]^T Sigma_j D[1:]``: the bucket mean ``mu_j``
    of ``n_j`` queries has covariance ``Sigma_j / n_j``, the fitted ``m0_j`` the variance
    ``sigma2 * lever`` (`fitted_mean_variance` with sigma2 = 1), independent of it under the model, so

        w = (v - D0^2 sigma2) / n_j + D0^2 sigma2 lever       (the first term floored at 0).

    (Queries are taken as independent given their position; within-example correlation would make the
    true variance larger and leave part of the bias.)
    """
    d2 = D0 * D0
    return np.maximum(v - d2 * sigma2, 0.0) / float(n_j) + d2 * (float(sigma2) * float(lever))
