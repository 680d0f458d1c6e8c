"""One streaming pass over the oriented queries for the scalar predictability, rotation and normality steps and the bucket moments of attention plasticity.

`rotated_query_pass` reads the oriented queries ``X_q`` (canonical order) block by block, rotates
each block, ``X_q_rot = X_q H`` (two BLAS level-2 calls), and while the block is in cache one compiled
pass (`plasticity.kernels.query_sums`) accumulates everything the later steps need: the refit of the position regression on ``X_q_rot`` (sums about the known mean ``mean(X_q) H``),
central moments up to order 4 of every column (docs/method.md#normality-diagnostics), column 0 (the scalar projection
``X_q u`` of the scalar predictability and the first-component series), the centred values of the KS columns,
and per query bucket the mean and covariance of columns 1.. (sums about the mean of the bucket's
first rows). ``X_q_rot`` itself is never stored. The results equal those of the reference
functions (`fit_position_regression`, `column_moments`, `householder_apply`, `bucket_moments`)
up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .estimators import SIGMA_RIDGE, QueryBuckets
from .regression import PositionDesign, PositionFit, block_rows, explicit_ssr, fit_from_sums
from .rotation import householder_vector, reflect_rows_inplace

#: Rows whose mean is the shift of a bucket's covariance sums.
_BUCKET_SHIFT_ROWS = 32


@dataclass(frozen=True)
class RotatedQueryStats:
    """Output of `rotated_query_pass`.

    ``fit_rot``: the position regression refitted on X_q_rot. ``mean, m2, m3, m4``: mean and central moments per
    column of X_q_rot. ``x0``: X_q_rot[:, 0]. ``Z`` (len(ks_sel), n): column ``1 + ks_sel[i]`` of
    X_q_rot minus a shift, and ``Z_center[i]`` = that column's mean minus the same shift. ``mu``/``Sigma``: per query bucket of ``buckets`` (None unless
    requested). ``w``: the Householder vector (None = identity).
    """

    fit_rot: PositionFit
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray
    x0: np.ndarray
    Z: np.ndarray
    Z_center: np.ndarray
    mu: np.ndarray | None
    Sigma: np.ndarray | None
    w: np.ndarray | None


def rotated_query_pass(
    X: np.ndarray,
    design: PositionDesign,
    fit: PositionFit,
    bucket_sorted: np.ndarray,
    buckets: QueryBuckets,
    ks_sel: np.ndarray,
    *,
    bucket_cov: bool,
) -> RotatedQueryStats:
    """Summarise ``X_q_rot = X_q H`` (H from ``fit.beta``) in one pass over ``X`` (= X_q, float64).

    ``bucket_sorted``: query bucket of every row (ascending); ``buckets``: eligible query buckets,
    whose row ranges get the mean and covariance (+1e-12 I) of columns 1.. when ``bucket_cov``.
    """
    from .kernels.query_sums import rotated_block_sums  # numba: imported on first use, not with this module

    n, d = X.shape
    w = householder_vector(fit.beta)
    w2 = None if w is None else 2.0 * w
    shift = np.ascontiguousarray(fit.mean, dtype=np.float64)  # X_q is centred on mean(X_q) before rotating
    shift_rot = shift.copy()
    if w is not None:
        shift_rot -= float(w @ shift) * w2
    pc = design.pc
    s2 = np.zeros(d)
    s3 = np.zeros(d)
    s4 = np.zeros(d)
    sxy = np.zeros(d)
    x0 = np.empty(n)
    r_all = np.empty(n)
    ks_cols = 1 + np.asarray(ks_sel, dtype=np.int64)
    k = ks_cols.shape[0]
    Z = np.empty((k, n))

    J = buckets.bucket.shape[0]
    want_cov = bucket_cov and J > 0
    mu = np.zeros((J, d - 1)) if want_cov else None
    Sigma = np.zeros((J, d - 1, d - 1)) if want_cov else None
    b = np.asarray(bucket_sorted)
    seg_start = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    seg_stop = np.r_[seg_start[1:], n].astype(np.int64)
    jj_of_start = {int(a): jj for jj, a in enumerate(buckets.start)} if want_cov else {}

    step = block_rows(d)
    cap = min(step, n)
    c = np.empty((cap, d))
    # centred semantic rows of one bucket, for a single covariance product per bucket
    y = np.empty((int(buckets.n.max()), d - 1)) if want_cov else np.empty((0, 0))
    g = np.zeros(max(d - 1, 0))
    ridge = SIGMA_RIDGE * np.eye(d - 1)
    pck = design.pc if design.vary else np.zeros(0)

    for a0, z0 in zip(seg_start.tolist(), seg_stop.tolist()):
        jj = jj_of_start.get(a0)
        for a in range(a0, z0, step):
            sl = slice(a, min(a + step, z0))
            cb = c[: sl.stop - a]
            np.subtract(X[sl], shift, out=cb)
            if w is not None:
                reflect_rows_inplace(cb, w, r_out=r_all[sl])
            # the block's sums and outputs in one compiled pass, in numpy's order (the same bits)
            rotated_block_sums(cb, a, pck, bool(design.vary), ks_cols, s2, s3, s4, sxy, x0, Z, y, a - a0,
                               jj is not None, a == a0, g, _BUCKET_SHIFT_ROWS)
        if jj is not None:
            nj = z0 - a0
            yj = y[:nj]
            t1 = yj.sum(axis=0)
            dj = t1 / nj
            mu[jj] = shift_rot[1:] + g + dj
            Sigma[jj] = (yj.T @ yj - np.outer(t1, dj)) / (nj - 1) + ridge

    x0 += shift_rot[0]

    def ssr_rot(cols, mean, beta):
        # X_q_rot[:, c] = X_q[:, c] - 2 w_c (X_q w), with X_q w = (X_q - shift) w + shift . w
        A = X[:, cols]  # a copy (fancy index), updated in place below
        if w is not None:
            A -= np.outer(r_all + float(shift @ w), w2[cols])
        return explicit_ssr(A, pc, mean, beta)

    # The rows were centred on mean(X_q) H = mean(X_q_rot) (exact up to rounding), so the sums
    # about shift_rot are central sums: sum(c) = 0.
    zero = np.zeros(d)
    fit_rot = fit_from_sums(design, shift_rot, zero, s2, sxy, explicit_ssr=ssr_rot)
    return RotatedQueryStats(
        fit_rot=fit_rot,
        mean=shift_rot,
        m2=s2 / n,
        m3=s3 / n,
        m4=s4 / n,
        x0=x0,
        Z=Z,
        Z_center=np.zeros(k),
        mu=mu,
        Sigma=Sigma,
        w=w,
    )
