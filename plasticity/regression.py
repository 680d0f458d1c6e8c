"""Position regression of query vectors (SPEC 2.3) and scalar position predictability (SPEC 2.4).

Pure functions on float64 numpy arrays; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Floor of the total sum of squares in ``R2_c = 1 - SS_res / max(SS_tot, R2_SS_TOT_FLOOR)`` (SPEC 2.3).
R2_SS_TOT_FLOOR = 1e-12
#: ``||beta||`` below this counts as "no positional direction" (SPEC 2.4 / 2.5).
BETA_NORM_TOL = 1e-12


def row_blocks(n: int, d: int, target_bytes: int = 1 << 20):
    """Yield ``slice`` objects covering ``range(n)`` in blocks of about ``target_bytes`` of float64 rows.

    Used to stream over (n, d) matrices with cache-sized temporaries instead of n x d ones.
    """
    step = max(256, target_bytes // (8 * max(d, 1)))
    for a in range(0, n, step):
        yield slice(a, min(a + step, n))


def as_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    """``X`` as a 2-D float64 array ((n,) is read as one column)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {X.shape}")
    return X


def as_vector(p: np.ndarray, n: int, name: str = "p") -> np.ndarray:
    """``p`` as a 1-D float64 array of length ``n``."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if p.shape[0] != n:
        raise ValueError(f"{name} has length {p.shape[0]}, expected {n}")
    return p


@dataclass(frozen=True)
class PositionFit:
    """Per-dimension OLS ``X = alpha + beta * p + R`` (SPEC 2.3).

    Attributes
    ----------
    alpha, beta : (d,) intercepts and slopes.
    r2 : (d,) ``R2_c = 1 - SS_res_c / max(SS_tot_c, 1e-12)``.
    r2_overall : ``nanmean(r2)``.
    beta_norm : ``||beta||_2``.
    mean : (d,) column means of X.
    ss_tot, ss_res : (d,) ``sum (X_c - mean_c)^2`` and ``sum R_c^2``.
    n : number of rows.
    position_mean : mean of p.
    positions_vary : False when all positions are equal (then beta = 0, alpha = mean, r2 = 0).
    """

    alpha: np.ndarray
    beta: np.ndarray
    r2: np.ndarray
    r2_overall: float
    beta_norm: float
    mean: np.ndarray
    ss_tot: np.ndarray
    ss_res: np.ndarray
    n: int
    position_mean: float
    positions_vary: bool

    @property
    def resid_var(self) -> np.ndarray:
        """``var(R, ddof=1) = SS_res / (n - 1)`` per component; all ones when n < 2 (SPEC 2.5)."""
        if self.n < 2:
            return np.ones_like(self.ss_res)
        return self.ss_res / (self.n - 1)

    def predict(self, p: np.ndarray) -> np.ndarray:
        """``alpha + outer(p, beta)``, shape (len(p), d)."""
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        return self.alpha[None, :] + p[:, None] * self.beta[None, :]

    def residuals(self, p: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``R = X - alpha - outer(p, beta)``, computed as ``(X - mean) - outer(p - mean(p), beta)``."""
        X = as_matrix(X)
        p = as_vector(p, X.shape[0])
        return (X - self.mean[None, :]) - (p - self.position_mean)[:, None] * self.beta[None, :]


def fit_position_regression(p: np.ndarray, X: np.ndarray) -> PositionFit:
    """OLS per column of ``X`` on the position ``p`` (SPEC 2.3).

    ``pc = p - mean(p)``, ``Xc = X - mean(X)``; ``beta = pc^T Xc / pc^T pc``,
    ``alpha = mean(X) - beta * mean(p)``; ``R = Xc - pc beta^T``;
    ``R2_c = 1 - SS_res_c / max(SS_tot_c, 1e-12)``; ``r2_overall = nanmean(R2_c)``.
    If positions do not vary (max(p) == min(p)): ``beta = 0``, ``alpha = mean``, all ``R2 = 0``.
    Residual sums are computed explicitly (not as SS_tot - beta*Sxy), streaming over row
    blocks so no (n, d) temporary is formed.
    """
    X = as_matrix(X)
    n, d = X.shape
    if n == 0:
        raise ValueError("fit_position_regression needs at least one row")
    p = as_vector(p, n)
    mx = X.mean(axis=0)
    mp = float(p.mean())
    pc = p - mp
    vary = bool(p.max() != p.min())
    sxx = float(pc @ pc) if vary else 0.0
    if not (sxx > 0.0):
        vary = False
    sst = np.zeros(d)
    sxy = np.zeros(d)
    for sl in row_blocks(n, d):
        xc = X[sl] - mx
        sst += np.einsum("ij,ij->j", xc, xc)
        if vary:
            sxy += pc[sl] @ xc
    if vary:
        beta = sxy / sxx
        ssr = np.zeros(d)
        for sl in row_blocks(n, d):
            r = (X[sl] - mx) - pc[sl, None] * beta[None, :]
            ssr += np.einsum("ij,ij->j", r, r)
        r2 = 1.0 - ssr / np.maximum(sst, R2_SS_TOT_FLOOR)
    else:
        beta = np.zeros(d)
        ssr = sst.copy()
        r2 = np.zeros(d)
    alpha = mx - beta * mp
    with np.errstate(invalid="ignore"):
        r2_overall = float(np.nanmean(r2)) if np.any(~np.isnan(r2)) else float("nan")
    return PositionFit(
        alpha=alpha,
        beta=beta,
        r2=r2,
        r2_overall=r2_overall,
        beta_norm=float(np.linalg.norm(beta)),
        mean=mx,
        ss_tot=sst,
        ss_res=ssr,
        n=n,
        position_mean=mp,
        positions_vary=vary,
    )


def _ols_scalar(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Simple OLS ``y ~ a + b x``: returns (a, b, R2) with ``R2 = 1 - SS_res/SS_tot``.

    ``b = 0`` (``a = mean(y)``) when x does not vary; ``R2 = 0`` when y does not vary.
    """
    xm = float(x.mean())
    ym = float(y.mean())
    xc = x - xm
    yc = y - ym
    sxx = float(xc @ xc)
    syy = float(yc @ yc)
    if x.max() == x.min() or not sxx > 0.0:
        return ym, 0.0, 0.0
    b = float(xc @ yc) / sxx
    a = ym - b * xm
    if not syy > 0.0:
        return a, b, 0.0
    res = yc - b * xc
    return a, b, 1.0 - float(res @ res) / syy


def scalar_position_predictability(p: np.ndarray, X: np.ndarray, beta: np.ndarray) -> dict:
    """How well the single projection ``s = X u`` (``u = beta/||beta||``) predicts ``y = log2(p + 1)`` (SPEC 2.4).

    OLS ``y ~ a + b s``; ``q_R2_scalar`` = its R2 (0 when y or s is constant);
    ``q_mae_baseline = mean|y - mean(y)|``; ``q_mae_proj = mean|y - yhat|``;
    ``q_mae_ratio = q_mae_proj / q_mae_baseline`` (1.0 when the baseline is 0).
    If ``||beta|| < 1e-12`` (no positional direction): R2 0 and both MAEs equal the baseline.
    """
    X = as_matrix(X)
    n, d = X.shape
    p = as_vector(p, n)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if beta.shape[0] != d:
        raise ValueError(f"beta has length {beta.shape[0]}, expected {d}")
    if n == 0:
        raise ValueError("scalar_position_predictability needs at least one row")
    y = np.log2(p + 1.0)
    baseline = float(np.mean(np.abs(y - y.mean())))
    nrm = float(np.linalg.norm(beta))
    if not nrm >= BETA_NORM_TOL:
        r2, mae = 0.0, baseline
    else:
        s = X @ (beta / nrm)
        a, b, r2 = _ols_scalar(s, y)
        mae = float(np.mean(np.abs(y - (a + b * s))))
    ratio = mae / baseline if baseline > 0.0 else 1.0
    return {
        "q_R2_scalar": float(r2),
        "q_mae_baseline": baseline,
        "q_mae_proj": float(mae),
        "q_mae_ratio": float(ratio),
    }
