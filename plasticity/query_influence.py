"""Query side of the example jackknife: how each bucket's query model moves when one group of
examples leaves, and the first-order move of AP_j that follows (`model_shifts_full_cov`,
`model_shifts_linear_diag`).

Everything comes from additive sums over the runs of equal (bucket, example) of the canonical
queries, so every replicate's model change is exact; only its effect on the pair APs is linear (the
gradients of `plasticity.pair_influence`). Notation: oriented queries ``x`` (docs/method.md#orientation), rotated
``x H`` (docs/method.md#rotation-to-the-positional-basis), ``pc = p - mean(p)``, ``u = H e1`` the positional direction, ``r0`` the residual
of the rotated component 0 after the position fit; a prime marks "without group g".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cholesky
from scipy.linalg.blas import dtrmm

from .estimators import QueryBuckets, reflect_both_sides
from .regression import BETA_NORM_TOL, PositionDesign, PositionFit, block_rows
from .rotation import reflect_rows_inplace

#: Relative ridge that makes a positive semi-definite form factorisable (removed again exactly).
_FORM_RIDGE = 1e-10


@dataclass(frozen=True)
class RowRuns:
    """Maximal runs of rows with equal (bucket, example) in canonical order: ``start``/``stop`` and
    the example group of each run."""

    start: np.ndarray
    stop: np.ndarray
    group: np.ndarray

    @classmethod
    def build(cls, bucket: np.ndarray, example_id: np.ndarray, group: np.ndarray) -> "RowRuns":
        n = bucket.shape[0]
        brk = np.r_[True, (bucket[1:] != bucket[:-1]) | (example_id[1:] != example_id[:-1])] if n else np.zeros(0, bool)
        start = np.flatnonzero(brk).astype(np.int64)
        stop = np.r_[start[1:], n].astype(np.int64)
        return cls(start, stop, np.asarray(group, dtype=np.int64)[start])

    def blocks(self, target_rows: int):
        """``(a, z, r0, r1)``: rows ``a:z`` made of the whole runs ``r0:r1``, about ``target_rows`` rows each."""
        r0, n_runs = 0, self.start.shape[0]
        while r0 < n_runs:
            r1 = max(int(np.searchsorted(self.stop, self.start[r0] + target_rows, side="right")), r0 + 1)
            yield int(self.start[r0]), int(self.stop[r1 - 1]), r0, r1
            r0 = r1

    def within(self, a: int, z: int) -> slice:
        """The runs making up rows ``a:z`` (a bucket's rows: runs never cross buckets)."""
        r0, r1 = np.searchsorted(self.start, [a, z])
        return slice(int(r0), int(r1))


def group_sums(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the rows of ``values`` (one per run) by group: (n_groups, ...)."""
    out = np.zeros((n_groups,) + values.shape[1:])
    np.add.at(out, group, values)
    return out


@dataclass(frozen=True)
class QueryRunSums:
    """Per run: ``n`` rows; sums of ``pc``, ``pc^2``, ``r0``, ``r0^2``, ``pc r0`` (scalars); and
    ``X`` (runs, 3, d) = the sums of ``x``, ``pc x`` and ``r0 x`` over the run's oriented rows."""

    n: np.ndarray
    sp: np.ndarray
    spp: np.ndarray
    sr0: np.ndarray
    sr0r0: np.ndarray
    spr0: np.ndarray
    X: np.ndarray


def query_run_sums(Xq: np.ndarray, pc: np.ndarray, r0: np.ndarray, runs: RowRuns) -> QueryRunSums:
    """One pass over the oriented queries: per run one small product ``x_run^T [1, pc, r0]``
    (a BLAS call per run reads the rows once; ``np.add.reduceat`` over rows is 4-7x slower)."""
    n_runs, d = runs.start.shape[0], Xq.shape[1]
    W = np.empty((Xq.shape[0], 3))
    W[:, 0] = 1.0
    W[:, 1] = pc
    W[:, 2] = r0
    X = np.empty((n_runs, 3, d))
    for i, (a, z) in enumerate(zip(runs.start.tolist(), runs.stop.tolist())):
        X[i] = W[a:z].T @ Xq[a:z]
    starts = runs.start
    scalars = [np.add.reduceat(v, starts) if n_runs else np.zeros(0) for v in (pc, pc * pc, r0, r0 * r0, pc * r0)]
    return QueryRunSums((runs.stop - runs.start).astype(np.float64), *scalars, X)


@dataclass(frozen=True)
class DeletedFits:
    """The position fit without each group, as changes from the full fit (rows: groups, columns:
    components): ``rbar`` = mean full-fit residual of the other rows, ``pbar`` = their mean ``pc``,
    ``dbeta`` = slope change, ``dresid_var`` = change of ``resid_var``."""

    pbar: np.ndarray
    rbar: np.ndarray
    dbeta: np.ndarray
    dresid_var: np.ndarray


def deleted_fits(n, sp, spp, sr, srr, spr, positions_vary: bool) -> DeletedFits:
    """Refit without each group from per-group sums (rows) of ``pc``, ``pc^2`` and the full-fit
    residuals ``R``: ``R``, ``R^2``, ``pc R`` (columns: components), totals minus the group's:

    ``pbar' = sp'/n'``, ``rbar' = sr'/n'``, ``Spp = spp' - n' pbar'^2``, ``SpR = spr' - n' pbar' rbar'``,
    ``SRR = srr' - n' rbar'^2``; ``dbeta = SpR / Spp`` (0 when positions do not vary),
    ``resid_var' = (SRR - dbeta SpR) / (n' - 1)``, minus the same expression on all rows. Residuals of
    the full fit keep the sums small, so nothing cancels catastrophically. NaN where a group leaves
    fewer than 2 rows or no position spread.
    """
    SPP = spp.sum()

    def fit(n, sp, spp, sr, srr, spr):
        with np.errstate(invalid="ignore", divide="ignore"):
            pbar = sp / n
            rbar = sr / n[..., None]
            spp_c = spp - n * pbar * pbar
            spr_c = spr - (n * pbar)[..., None] * rbar
            srr_c = srr - n[..., None] * rbar * rbar
            if positions_vary:
                ok = spp_c > 1e-12 * SPP
                dbeta = np.where(ok[..., None], spr_c / np.where(ok, spp_c, 1.0)[..., None], np.nan)
            else:
                dbeta = np.zeros_like(spr_c)
            rv = (srr_c - dbeta * spr_c) / np.where(n >= 2, n - 1.0, np.nan)[..., None]
        return pbar, rbar, dbeta, rv

    totals = [np.asarray(v.sum(axis=0)) for v in (n, sp, spp, sr, srr, spr)]
    rv_all = fit(*totals)[3]
    pbar, rbar, dbeta, rv = fit(*(t - v for t, v in zip(totals, (n, sp, spp, sr, srr, spr))))
    return DeletedFits(pbar=pbar, rbar=rbar, dbeta=dbeta, dresid_var=rv - rv_all)


class QuadraticForm:
    """``q_i = y_i^T A y_i`` for the rows of blocks ``Y`` and one positive semi-definite ``A``.

    Computed as ``||L^T y_i||^2 - delta ||y_i||^2`` with ``L L^T = A + delta I``,
    ``delta = 1e-10 tr(A) / d`` (the ridge makes a singular A factorisable; its term is removed
    exactly), so a triangular product (half the flops of ``Y A``) does the work; ``einsum(Y A, Y)``
    if the factorisation fails all the same.
    """

    def __init__(self, A: np.ndarray):
        d = A.shape[0]
        self.A = A
        self.L = None
        tr = float(np.trace(A))
        self.zero = not np.any(A)
        self.delta = _FORM_RIDGE * tr / d
        if tr > 0.0:
            try:
                self.L = cholesky(A + self.delta * np.eye(d), lower=True, check_finite=False)
            except LinAlgError:
                pass

    def rows(self, Y: np.ndarray) -> np.ndarray:
        """The forms of the rows of ``Y`` (float64, C-contiguous), which is used as scratch and overwritten."""
        if self.zero:
            return np.zeros(Y.shape[0])
        if self.L is None:
            return np.einsum("ij,ij->i", Y @ self.A, Y)
        yy = np.einsum("ij,ij->i", Y, Y)
        Z = dtrmm(1.0, self.L, Y.T, side=0, lower=1, trans_a=1, overwrite_b=1).T  # rows y_i^T L, in place
        return np.einsum("ij,ij->i", Z, Z) - self.delta * yy


@dataclass(frozen=True)
class BucketGroupStats:
    """Per query bucket of the model (rows, index jj) and example group (columns): query counts ``n``
    and sums of ``pc`` (``sp``)."""

    n: np.ndarray
    sp: np.ndarray


def bucket_group_stats(run_n: np.ndarray, run_sp: np.ndarray, runs: RowRuns, buckets: QueryBuckets,
                       n_groups: int) -> BucketGroupStats:
    """`BucketGroupStats` from the runs' row counts and sums of ``pc``."""
    J = buckets.bucket.shape[0]
    n = np.zeros((J, n_groups))
    sp = np.zeros((J, n_groups))
    for jj in range(J):
        r = runs.within(int(buckets.start[jj]), int(buckets.stop[jj]))
        np.add.at(n[jj], runs.group[r], run_n[r])
        np.add.at(sp[jj], runs.group[r], run_sp[r])
    return BucketGroupStats(n, sp)


def _tau_shift(stats: BucketGroupStats, buckets: QueryBuckets) -> tuple[np.ndarray, np.ndarray]:
    """``(n', dtau)`` (J, G): queries left in each bucket and the change of its mean position,
    ``dtau = (sp_j - sp_jg) / n' - sp_j / n_j``."""
    nj = buckets.n.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        n_left = nj - stats.n
        sp_j = stats.sp.sum(axis=1, keepdims=True)
        return n_left, (sp_j - stats.sp) / n_left - sp_j / nj


def model_shifts_full_cov(Xq: np.ndarray, design: PositionDesign, fit: PositionFit, fit_rot: PositionFit,
                          x0: np.ndarray, w: np.ndarray | None, buckets: QueryBuckets, mu: np.ndarray,
                          Sigma: np.ndarray, runs: RowRuns, n_groups: int, grad_mean: np.ndarray,
                          grad_cov: np.ndarray) -> tuple[BucketGroupStats, np.ndarray]:
    """``Delta_jg`` (J, G) of bucket_full_cov, the first-order change of AP_j without group g:

        g_0 dm0 + G_00 dsigma2 + g_s . dmu + <G_ss, dSigma> + r_s . du_s

    with ``g = dAP_j/dmean``, ``G = dAP_j/dC`` (rotated; s = semantic block) and, for ``n'`` queries
    left in the bucket:

    * ``dm0 = rbar0' + dbeta0 (tau_j + dtau - mean(p) - pbar') + beta0 dtau``, ``dsigma2``: the refit
      of component 0 (`deleted_fits`);
    * ``dmu = -S_jg / n'`` with ``S_jg`` the group's sum of semantic rows about ``mu_j``;
    * ``<G_ss, dSigma> = (Q_j - Q_jg - S_jg^T G_ss S_jg / n') / (n' - 1) - Q_j / (n_j - 1)``, the
      rank-one downdate of the bucket scatter, with ``Q`` the sums of the forms
      ``(y - mu_j)^T G_ss (y - mu_j)`` (`QuadraticForm`; the 1e-12 ridge cancels);
    * the rotation: the positional direction ``u = beta / |beta|`` moves by ``du = P dbeta / |beta|``
      (``P = I - u u^T``, ``dbeta`` the refit of all components); the model depends on it through
      ``mean_j = xbar_j + u u^T e_j`` (``e_j = alpha + beta tau_j - xbar_j``), ``sigma2 = u^T S_R u`` (pooled
      residual covariance ``S_R``) and the semantic covariance ``P S_j P``, so
      ``r = g e_j0 + e_j g_0 + 2 sigma2 G u + 2 G_00 S_R u - 2 G P S_j u - 2 S_j P G u``, whose
      semantic part in the rotated basis is
      ``g_s e_j0 + e_js g_0 + 2 sigma2 G_s0 + 2 G_00 (S_R)_s0 - 2 G_ss (S_j)_s0 - 2 (S_j)_ss G_s0``.
      No rotation term when ``|beta| < 1e-12`` (no positional direction).
    """
    G = n_groups
    J = buckets.bucket.shape[0]
    d = Xq.shape[1]
    beta0 = float(fit_rot.beta[0])
    r0 = (x0 - fit_rot.mean[0]) - design.pc * beta0
    sums = query_run_sums(Xq, design.pc, r0, runs)
    stats = bucket_group_stats(sums.n, sums.sp, runs, buckets, G)
    if J == 0:
        return stats, np.zeros((0, G))
    n_left, dtau = _tau_shift(stats, buckets)

    def rotate(V):
        V = np.array(V, dtype=np.float64)
        if w is not None:
            reflect_rows_inplace(V.reshape(-1, d), w)
        return V

    # component 0 refit per group
    gn = group_sums(sums.n, runs.group, G)
    gsp = group_sums(sums.sp, runs.group, G)
    gspp = group_sums(sums.spp, runs.group, G)
    fits0 = deleted_fits(gn, gsp, gspp, group_sums(sums.sr0, runs.group, G)[:, None],
                         group_sums(sums.sr0r0, runs.group, G)[:, None], group_sums(sums.spr0, runs.group, G)[:, None],
                         design.vary)
    # the refit of all components (oriented) for the rotation: residual sums sum(x - mean) - beta sum(pc), ...
    mean = fit.mean
    sr = group_sums(sums.X[:, 0], runs.group, G) - gn[:, None] * mean - gsp[:, None] * fit.beta
    spr = group_sums(sums.X[:, 1], runs.group, G) - gsp[:, None] * mean - gspp[:, None] * fit.beta
    if fit.beta_norm >= BETA_NORM_TOL:
        dbeta = deleted_fits(gn, gsp, gspp, sr, np.zeros_like(sr), spr, design.vary).dbeta  # (G, d) oriented
        du_sem = rotate(dbeta)[:, 1:] / fit.beta_norm
    else:
        du_sem = np.zeros((G, d - 1))
    # pooled residual covariance with component 0: sum_i R_i r0_i / (n - 1), R = (x - mean) - pc beta
    sr_u = sums.X[:, 2].sum(axis=0) - mean * sums.sr0.sum() - fit.beta * sums.spr0.sum()
    pooled_s0 = rotate(sr_u / max(float(sums.n.sum()) - 1.0, 1.0))[1:]

    # per bucket of the model: its runs, mean (oriented), mean of x0 = mean0 + r0 + beta0 pc
    run_jj = np.searchsorted(buckets.start, runs.start, side="right") - 1
    mine = (run_jj >= 0) & (runs.start < buckets.stop[np.maximum(run_jj, 0)])
    rj, rg = run_jj[mine], runs.group[mine]
    nj = buckets.n.astype(np.float64)

    def per_bucket(values):
        out = np.zeros((J,) + values.shape[1:])
        np.add.at(out, rj, values[mine])
        return out

    xbar = per_bucket(sums.X[:, 0]) / nj[:, None]
    x0bar = fit_rot.mean[0] + (per_bucket(sums.sr0) + beta0 * per_bucket(sums.sp)) / nj
    # semantic sums about the bucket mean, per group (rotated)
    S = np.zeros((J, G, d - 1))
    np.add.at(S, (rj, rg), rotate(sums.X[mine, 0] - sums.n[mine, None] * xbar[rj])[:, 1:])
    # bucket covariance of every component with component 0: sum (x - xbar)(x0 - x0bar) / (n - 1),
    # with x0 - x0bar = r0 + beta0 pc + const
    cross = (per_bucket(sums.X[:, 2]) - xbar * per_bucket(sums.sr0)[:, None]
             + beta0 * (per_bucket(sums.X[:, 1]) - xbar * per_bucket(sums.sp)[:, None]))
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_s0 = rotate(cross / (nj - 1.0)[:, None])[:, 1:]
    # sums of the forms (x - xbar_j)^T A_j (x - xbar_j), A_j = H blockdiag(0, G_ss) H: one pass per
    # bucket, in cache-sized blocks of rows
    G_ss = grad_cov[:, 1:, 1:]
    quad = np.zeros((J, G))
    form = np.zeros((d, d))
    step = block_rows(d)
    scratch = np.empty((min(step, Xq.shape[0]), d))
    for jj in range(J):
        a, z = int(buckets.start[jj]), int(buckets.stop[jj])
        form[1:, 1:] = G_ss[jj]
        qf = QuadraticForm(reflect_both_sides(form, w))
        q = np.empty(z - a)
        for b0 in range(a, z, step):
            b1 = min(b0 + step, z)
            Y = scratch[: b1 - b0]
            np.subtract(Xq[b0:b1], xbar[jj], out=Y)
            q[b0 - a : b1 - a] = qf.rows(Y)
        r = runs.within(a, z)
        np.add.at(quad[jj], runs.group[r], np.add.reduceat(q, runs.start[r] - a))
    Q = quad.sum(axis=1, keepdims=True)

    g, g0, G00, G_s0 = grad_mean, grad_mean[:, :1], grad_cov[:, :1, 0], grad_cov[:, 1:, 0]
    tau = buckets.tau[:, None]
    m0 = fit_rot.alpha[0] + beta0 * buckets.tau
    e_sem = fit_rot.alpha[1:] + fit_rot.beta[1:] * tau - mu
    r_sem = (g[:, 1:] * (m0 - x0bar)[:, None] + e_sem * g0 + 2.0 * fit_rot.resid_var[0] * G_s0
             + 2.0 * G00 * pooled_s0 - 2.0 * np.einsum("jde,je->jd", G_ss, sigma_s0)
             - 2.0 * np.einsum("jde,je->jd", Sigma, G_s0))
    with np.errstate(invalid="ignore", divide="ignore"):
        dm0 = fits0.rbar[:, 0] + fits0.dbeta[:, 0] * (tau + dtau - design.mean - fits0.pbar) + beta0 * dtau
        dmu = -np.einsum("jgd,jd->jg", S, g[:, 1:]) / n_left
        sgs = np.einsum("jge,jge->jg", S @ G_ss, S)  # S_jg^T G_ss S_jg
        dcov = (Q - quad - sgs / n_left) / (n_left - 1.0) - Q / (nj[:, None] - 1.0)
        return stats, g0 * dm0 + G00 * fits0.dresid_var[:, 0] + dmu + dcov + r_sem @ du_sem.T


def model_shifts_linear_diag(Xq: np.ndarray, design: PositionDesign, fit: PositionFit, fit_rot: PositionFit,
                             w: np.ndarray | None, buckets: QueryBuckets, runs: RowRuns, n_groups: int,
                             grad_mean: np.ndarray, grad_diag: np.ndarray) -> tuple[BucketGroupStats, np.ndarray]:
    """``Delta_jg`` (J, G) of linear_diag: ``g . dmean_jg + g_diag . dresid_var_g`` with the bucket mean
    ``alpha_rot + beta_rot tau_j`` refit without g,
    ``dmean = rbar' + dbeta (tau_j + dtau - mean(p) - pbar') + beta_rot dtau`` (all components, from
    the rotated residuals ``R = (x - mean) H - pc beta_rot``; the rotation itself is held fixed)."""
    G = n_groups
    d = Xq.shape[1]
    n_runs = runs.start.shape[0]
    run_r = np.empty((n_runs, 3, d))  # sums of R, pc R, R^2
    pc = design.pc
    W = np.empty((Xq.shape[0], 2))
    W[:, 0] = 1.0
    W[:, 1] = pc
    for a, z, r0, r1 in runs.blocks(block_rows(d)):
        R = Xq[a:z] - fit.mean
        if w is not None:
            reflect_rows_inplace(R, w)
        R -= pc[a:z, None] * fit_rot.beta
        R2 = R * R
        for i in range(r0, r1):
            u, v = int(runs.start[i]) - a, int(runs.stop[i]) - a
            run_r[i, :2] = W[a + u : a + v].T @ R[u:v]
            run_r[i, 2] = R2[u:v].sum(axis=0)
    run_n = (runs.stop - runs.start).astype(np.float64)
    run_sp = np.add.reduceat(pc, runs.start) if n_runs else np.zeros(0)
    run_spp = np.add.reduceat(pc * pc, runs.start) if n_runs else np.zeros(0)
    stats = bucket_group_stats(run_n, run_sp, runs, buckets, G)
    fits = deleted_fits(group_sums(run_n, runs.group, G), group_sums(run_sp, runs.group, G),
                        group_sums(run_spp, runs.group, G), group_sums(run_r[:, 0], runs.group, G),
                        group_sums(run_r[:, 2], runs.group, G), group_sums(run_r[:, 1], runs.group, G), design.vary)
    n_left, dtau = _tau_shift(stats, buckets)
    with np.errstate(invalid="ignore"):
        lever = buckets.tau[:, None] + dtau - design.mean - fits.pbar[None, :]  # (J, G)
        dmean = (fits.rbar[None] + fits.dbeta[None] * lever[..., None]
                 + fit_rot.beta[None, None, :] * dtau[..., None])  # (J, G, d)
        return stats, np.einsum("jd,jgd->jg", grad_mean, dmean) + grad_diag @ fits.dresid_var.T
