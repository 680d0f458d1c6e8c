"""Position regression of query vectors (docs/method.md#position-regression) and scalar position predictability (docs/method.md#scalar-position-predictability).

Pure functions on float64 numpy arrays; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Floor of the total sum of squares in ``R2_c = 1 - SS_res / max(SS_tot, R2_SS_TOT_FLOOR)`` (docs/method.md#position-regression).
R2_SS_TOT_FLOOR = 1e-12
#: ``||beta||`` below this counts as "no positional direction" (docs/method.md#scalar-position-predictability and the rotation).
BETA_NORM_TOL = 1e-12


def row_blocks(n: int, d: int, target_bytes: int = 1 << 19):
    """Yield ``slice`` objects covering ``range(n)`` in blocks of about ``target_bytes`` of float64 rows.

    Used to stream over (n, d) matrices with cache-sized temporaries instead of n x d ones.
    """
    step = block_rows(d, target_bytes)
    for a in range(0, n, step):
        yield slice(a, min(a + step, n))


def block_rows(d: int, target_bytes: int = 1 << 19) -> int:
    """Rows per streaming block for width ``d`` (at least 256)."""
    return max(256, target_bytes // (8 * max(d, 1)))


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
    """Per-dimension OLS ``X = alpha + beta * p + R`` (docs/method.md#position-regression).

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
        """``var(R, ddof=1) = SS_res / (n - 1)`` per component; all ones when n < 2 (docs/method.md#rotation-to-the-positional-basis)."""
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


#: Columns whose closed-form SS_res is below this fraction of SS_tot are recomputed explicitly.
_EXPLICIT_RESID_FRACTION = 1e-2


@dataclass(frozen=True)
class PositionDesign:
    """The regressor of the position regression: ``pc = p - mean(p)``, ``sxx = pc . pc``, ``spc = sum(pc)``."""

    p: np.ndarray
    mean: float
    pc: np.ndarray
    sxx: float
    spc: float
    vary: bool

    @classmethod
    def build(cls, p: np.ndarray) -> "PositionDesign":
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if p.shape[0] == 0:
            raise ValueError("need at least one position")
        mp = float(p.mean())
        pc = p - mp
        vary = bool(p.max() != p.min())
        sxx = float(pc @ pc) if vary else 0.0
        return cls(p=p, mean=mp, pc=pc, sxx=sxx, spc=float(pc.sum()), vary=vary and sxx > 0.0)


def fit_from_sums(
    design: PositionDesign,
    shift: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    sxy: np.ndarray,
    explicit_ssr=None,
) -> PositionFit:
    """Finish the OLS of the position regression from sums about a shift ``c``: ``s1 = sum(x - c)``,
    ``s2 = sum((x - c)^2)``, ``sxy = sum(pc (x - c))`` (per column).

    ``mean = c + s1/n``; ``SS_tot = s2 - s1^2/n``; ``Sxy = sxy - (mean - c) sum(pc)``;
    ``beta = Sxy/sxx``; ``SS_res = SS_tot - beta Sxy``. Where that closed form is below 1% of
    SS_tot (R2 > 0.99, where it loses digits) ``explicit_ssr(cols, mean, beta)`` recomputes
    ``sum((x - mean) - pc beta)^2`` from the data.
    """
    n = design.pc.shape[0]
    delta = s1 / n
    mean = shift + delta
    sst = np.maximum(s2 - s1 * delta, 0.0)
    d = mean.shape[0]
    if design.vary:
        sxy_c = sxy - delta * design.spc
        beta = sxy_c / design.sxx
        ssr = np.maximum(sst - beta * sxy_c, 0.0)
        cols = np.flatnonzero(ssr < _EXPLICIT_RESID_FRACTION * sst)
        if cols.shape[0] and explicit_ssr is not None:
            ssr[cols] = explicit_ssr(cols, mean[cols], beta[cols])
        r2 = 1.0 - ssr / np.maximum(sst, R2_SS_TOT_FLOOR)
    else:
        beta = np.zeros(d)
        ssr = sst.copy()
        r2 = np.zeros(d)
    with np.errstate(invalid="ignore"):
        r2_overall = float(np.nanmean(r2)) if np.any(~np.isnan(r2)) else float("nan")
    return PositionFit(
        alpha=mean - beta * design.mean,
        beta=beta,
        r2=r2,
        r2_overall=r2_overall,
        beta_norm=float(np.linalg.norm(beta)),
        mean=mean,
        ss_tot=sst,
        ss_res=ssr,
        n=n,
        position_mean=design.mean,
        positions_vary=design.vary,
    )


def explicit_ssr(A: np.ndarray, pc: np.ndarray, mean: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``sum_i ((A[i, c] - mean_c) - pc_i beta_c)^2`` per column of ``A`` (n, k)."""
    r = (A - mean) - pc[:, None] * beta
    return np.einsum("ij,ij->j", r, r)


def fit_rows(design: PositionDesign, X: np.ndarray, *, exact_residuals: bool = True) -> PositionFit:
    """`fit_position_regression` on the float64 matrix ``X`` (n, d): one pass over row blocks.

    ``exact_residuals=False`` skips the explicit residual pass over columns with R2 > 0.99: their
    ``ss_res`` (and ``resid_var``) then come from the closed form, with an absolute error of a few
    ulps of ``ss_tot`` -- which leaves ``r2`` exact to ~1e-15 but not ``ss_res`` itself. For callers
    that use only ``r2``, ``beta`` and the means (the unrotated fit of `analyze_head`)."""
    n, d = X.shape
    step = block_rows(d)
    shift = X[: min(step, n)].mean(axis=0)
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    sxy = np.zeros(d)
    c = np.empty((min(step, n), d))
    for a in range(0, n, step):
        sl = slice(a, min(a + step, n))
        cb = c[: sl.stop - a]
        np.subtract(X[sl], shift, out=cb)
        s1 += cb.sum(axis=0)
        s2 += np.einsum("ij,ij->j", cb, cb)
        if design.vary:
            sxy += np.einsum("i,ij->j", design.pc[sl], cb)  # not BLAS: small blocks
    return fit_from_sums(
        design, shift, s1, s2, sxy,
        explicit_ssr=(lambda cols, mean, beta: explicit_ssr(X[:, cols], design.pc, mean, beta))
        if exact_residuals else None,
    )


def fit_position_regression(p: np.ndarray, X: np.ndarray) -> PositionFit:
    """OLS per column of ``X`` on the position ``p`` (docs/method.md#position-regression).

    ``pc = p - mean(p)``; ``beta = sum(pc (X - mean X)) / sum(pc^2)``; ``alpha = mean(X) - beta mean(p)``;
    ``R = X - alpha - beta p``; ``R2_c = 1 - SS_res_c / max(SS_tot_c, 1e-12)``; ``r2_overall = nanmean(R2_c)``.
    If positions do not vary (max(p) == min(p)): ``beta = 0``, ``alpha = mean``, all ``R2 = 0``.

    One streaming pass of sums about the first block's mean (see `fit_from_sums`), then an
    explicit residual pass only for columns with R2 > 0.99.
    """
    X = as_matrix(X)
    n = X.shape[0]
    if n == 0:
        raise ValueError("fit_position_regression needs at least one row")
    return fit_rows(PositionDesign.build(as_vector(p, n)), X)


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
    """How well the single projection ``s = X u`` (``u = beta/||beta||``) predicts ``y = log2(p + 1)`` (docs/method.md#scalar-position-predictability).

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
    nrm = float(np.linalg.norm(beta))
    proj = X @ (beta / nrm) if nrm >= BETA_NORM_TOL else None
    return scalar_predictability_from_projection(p, proj)


def scalar_predictability_from_projection(p: np.ndarray, proj: np.ndarray | None) -> dict:
    """Scalar position predictability given the projection ``s = X u`` (``None`` when ``||beta|| < 1e-12``); see
    `scalar_position_predictability`."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if p.shape[0] == 0:
        raise ValueError("scalar position predictability needs at least one row")
    y = np.log2(p + 1.0)
    if y.max() == y.min():  # positions do not vary: nothing to predict
        return {"q_R2_scalar": 0.0, "q_mae_baseline": 0.0, "q_mae_proj": 0.0, "q_mae_ratio": 1.0}
    baseline = float(np.mean(np.abs(y - y.mean())))
    if proj is None:
        r2, mae = 0.0, baseline
    else:
        s = as_vector(proj, p.shape[0], "proj")
        a, b, r2 = _ols_scalar(s, y)
        mae = float(np.mean(np.abs(y - (a + b * s))))
    ratio = mae / baseline if baseline > 0.0 else 1.0
    return {
        "q_R2_scalar": float(r2),
        "q_mae_baseline": baseline,
        "q_mae_proj": float(mae),
        "q_mae_ratio": float(ratio),
    }
