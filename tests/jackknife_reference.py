"""The exact delete-a-group jackknife of the attention-plasticity estimators, written plainly for tests.

Replicate g reruns the estimator without the example group g: the rotated position fit, every
bucket's count, mean position, mean and covariance are recomputed from the remaining queries, and
every pair AP is recomputed under that model over the remaining pairs. Held fixed, as in
`plasticity.jackknife`: orientation signs, rotation (from all queries), eligible cells, the pair
draws. Slow (one full pass over all pairs per group), independent of the production code except
for the pair stream, which it replays with the same `KeyPairIndex.draw` calls.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, owens_t

from plasticity.estimators import QueryBuckets
from plasticity.head import canonicalize, pair_rng_seed
from plasticity.jackknife import example_groups
from plasticity.pairs import KeyPairIndex, eligibility_mask
from plasticity.regression import fit_position_regression
from plasticity.rotation import householder_apply, householder_matrix


def _pair_ap(D, mean, cov, noise=None):
    """Pair AP; ``noise`` = (n_j, lever): the debiased AP, in Owen's T form
    ``8 T(m / sqrt(v - w), 1 / sqrt(1 - 2 w / v))`` with ``w`` the variance of ``m``: bucket_full_cov,
    a bucket mean of n_j queries and the fitted component-0 line (variance sigma2 * lever);
    linear_diag (n_j None), fitted lines of every component (lever * v)."""
    m = D @ mean
    v = np.einsum("ij,jk,ik->i", D, cov, D)
    v = np.where(v <= 0, 1e-12, v)
    if noise is not None:
        n_j, lever = noise
        if n_j is None:  # linear_diag: every component's mean is a fitted line
            w = lever * v
        else:
            sem = np.einsum("ij,jk,ik->i", D[:, 1:], cov[1:, 1:], D[:, 1:])
            w = np.minimum(sem / n_j + D[:, 0] ** 2 * cov[0, 0] * lever, v / 4)
        return 8 * owens_t(m / np.sqrt(v - w), 1 / np.sqrt(1 - 2 * w / v))
    p = ndtr(m / np.sqrt(v))
    return 4 * p * (1 - p)


def exact_jackknife(q, k, s, *, layer, q_head, params, max_groups=64, refit_rotation=False):
    """Returns dict: ap (all groups), ap_rep (G,), bucket -> (AP_j, replicates (G,)), n_groups.

    ``refit_rotation``: each replicate also recomputes the rotation from its remaining queries (and
    rotates queries and keys with it), as the production jackknife does for bucket_full_cov."""
    q, k = canonicalize(q), canonicalize(k)
    p = q.position
    Xq = q.vectors * s
    beta = fit_position_regression(p, Xq).beta
    Xr = householder_apply(Xq, beta)
    Kr = householder_apply(k.vectors * s, beta)
    groups = example_groups(q.example_id, k.example_id, max_groups)
    qb = QueryBuckets.build(q.bucket, p)
    kidx = KeyPairIndex.build(k.bucket, k.example_id, k.position)
    elig = eligibility_mask(qb.bucket, qb.minpos, kidx.buckets, kidx.maxpos, q.sliding_window)
    rng = np.random.default_rng(pair_rng_seed(params.seed, layer, q_head))
    draws = []  # (bucket index, [(i1, i2) per cell])
    for jj in range(qb.bucket.shape[0]):
        cells = np.flatnonzero(elig[jj])
        if cells.shape[0] == 0:
            continue
        i1, i2, sizes = kidx.draw(cells, params.num_pairs_per_bucket, rng)
        edges = np.r_[0, np.cumsum(sizes)]
        draws.append((jj, [(i1[a:b], i2[a:b]) for a, b in zip(edges[:-1], edges[1:])]))
    d = Xq.shape[1]
    full = params.estimator == "bucket_full_cov"

    def estimate(drop):
        keep_q = groups.q_group != drop
        Xr_, Kr_ = Xr, Kr
        if refit_rotation:
            beta_g = fit_position_regression(p[keep_q], Xq[keep_q]).beta
            Xr_, Kr_ = householder_apply(Xq, beta_g), householder_apply(k.vectors * s, beta_g)
        fit = fit_position_regression(p[keep_q], Xr_[keep_q])
        rv = fit.resid_var
        num = den = 0.0
        cell_values = []
        per_bucket = {}
        for jj, cells in draws:
            rows = np.arange(qb.start[jj], qb.stop[jj])
            rows = rows[keep_q[rows]]
            if rows.shape[0] < 2:
                continue
            tau = p[rows].mean()
            if full:
                Y = Xr_[rows, 1:]
                mean = np.r_[fit.alpha[0] + fit.beta[0] * tau, Y.mean(axis=0)]
                cov = np.zeros((d, d))
                cov[0, 0] = rv[0]
                cov[1:, 1:] = np.cov(Y.T, ddof=1).reshape(d - 1, d - 1) + 1e-12 * np.eye(d - 1)
            else:
                mean = fit.alpha + fit.beta * tau
                cov = np.diag(rv)
            vals = []
            for i1, i2 in cells:
                keep = groups.k_group[i1] != drop
                if not np.any(keep):
                    continue
                pk = p[keep_q]
                lever = 1 / pk.size + (tau - pk.mean()) ** 2 / np.sum((pk - pk.mean()) ** 2)
                noise = (rows.shape[0] if full else None, lever)
                vals.append(min(_pair_ap(Kr_[i1[keep]] - Kr_[i2[keep]], mean, cov, noise).mean(), 1.0))
            if not vals:
                continue
            per_bucket[int(qb.bucket[jj])] = float(np.mean(vals))
            cell_values += vals
            num += rows.shape[0] * np.mean(vals)
            den += rows.shape[0]
        if full:
            ap = num / den if den else np.nan
        else:
            ap = float(np.mean(cell_values)) if cell_values else np.nan
        return ap, per_bucket

    ap, buckets = estimate(-1)
    reps = [estimate(g) for g in range(groups.n_groups)]
    return {
        "ap": ap,
        "ap_rep": np.array([r[0] for r in reps]),
        "buckets": {b: (v, np.array([r[1].get(b, np.nan) for r in reps])) for b, v in buckets.items()},
        "n_groups": groups.n_groups,
    }


def jackknife_se(rep):
    G = rep.shape[0]
    return float(np.sqrt((G - 1) / G * np.sum((rep - rep.mean()) ** 2)))


def linearised_shifts(Xq, p, q_group, buckets, influence, estimator):
    """``Delta_jg`` (J, G) of `plasticity.query_influence` (the linearised jackknife's query side),
    recomputed from all rows at once: no streaming blocks, no runs, no sums about shifts.

    ``Xq``: oriented queries in canonical order, ``p`` their positions, ``q_group`` their example
    groups; ``buckets`` a `QueryBuckets`; ``influence`` the cell table's `PairInfluence` (the
    gradients, in the rotated basis). Each replicate's query model is refitted without group g by
    ``numpy.linalg.lstsq`` and ``numpy.cov``; its change is contracted with the gradients:

    * linear_diag: ``g . (line'(tau'_j) - line(tau_j)) + g_diag . (resid_var' - resid_var)``,
      rotation held fixed;
    * bucket_full_cov: ``g_0 dm0 + G_00 dsigma2 + g_s . dmu + <G_ss, dSigma>`` (exact changes of the
      component-0 line at the bucket's mean position, its residual variance, the semantic bucket
      mean and covariance) plus the first-order rotation term ``r_s . du_s``, ``du = P dbeta / |beta|``
      with ``r_s = g_s (m0 - x0bar) + e_s g_0 + 2 sigma2 G_s0 + 2 G_00 (S_R)_s0 - 2 G_ss (S_j)_s0
      - 2 Sigma_j G_s0`` (``S_R``: pooled residual covariance, ``S_j``: the bucket's covariance).
    """
    n, d = Xq.shape
    G = influence.n_groups
    A = np.column_stack([np.ones(n), p])
    coef, *_ = np.linalg.lstsq(A, Xq, rcond=None)
    beta = coef[1]
    H = householder_matrix(beta)
    Xr = Xq @ H

    def fit(rows):
        c, *_ = np.linalg.lstsq(A[rows], Xr[rows], rcond=None)
        resid = Xr[rows] - A[rows] @ c
        return c[0], c[1], (resid**2).sum(axis=0) / (resid.shape[0] - 1.0), resid

    a, b, rv, resid = fit(np.ones(n, bool))
    pooled_s0 = (resid[:, 1:] * resid[:, :1]).sum(axis=0) / (n - 1.0)
    J = buckets.bucket.shape[0]
    shifts = np.full((J, G), np.nan)
    for g in range(G):
        keep = q_group != g
        a_, b_, rv_, _ = fit(keep)
        if estimator == "bucket_full_cov":
            c_, *_ = np.linalg.lstsq(A[keep], Xq[keep], rcond=None)
            du_sem = ((c_[1] - beta) @ H)[1:] / np.linalg.norm(beta)
        for jj in range(J):
            rows = slice(int(buckets.start[jj]), int(buckets.stop[jj]))
            kj = keep[rows]
            if kj.sum() < 2:
                continue
            tau, tau_ = p[rows].mean(), p[rows][kj].mean()
            gm = influence.grad_mean[jj]
            if estimator == "linear_diag":
                dmean = (a_ + b_ * tau_) - (a + b * tau)
                shifts[jj, g] = gm @ dmean + influence.grad_diag[jj] @ (rv_ - rv)
                continue
            Y = Xr[rows]
            Gc = influence.grad_cov[jj]
            mu = Y[:, 1:].mean(axis=0)
            sigma = np.cov(Y[:, 1:].T, ddof=1)
            dm0 = (a_[0] + b_[0] * tau_) - (a[0] + b[0] * tau)
            dmu = Y[kj, 1:].mean(axis=0) - mu
            dsigma = np.cov(Y[kj, 1:].T, ddof=1) - sigma
            exact = gm[0] * dm0 + Gc[0, 0] * (rv_[0] - rv[0]) + gm[1:] @ dmu + np.sum(Gc[1:, 1:] * dsigma)
            x0bar = Y[:, 0].mean()
            sigma_s0 = ((Y[:, 1:] - mu) * (Y[:, :1] - x0bar)).sum(axis=0) / (Y.shape[0] - 1.0)
            e_sem = a[1:] + b[1:] * tau - mu
            r_sem = (gm[1:] * (a[0] + b[0] * tau - x0bar) + e_sem * gm[0] + 2.0 * rv[0] * Gc[1:, 0]
                     + 2.0 * Gc[0, 0] * pooled_s0 - 2.0 * Gc[1:, 1:] @ sigma_s0
                     - 2.0 * (sigma + 1e-12 * np.eye(d - 1)) @ Gc[1:, 0])
            shifts[jj, g] = exact + r_sem @ du_sem
    return shifts
