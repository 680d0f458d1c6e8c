"""Attention-plasticity estimators: pair AP, cell rows, aggregation and standard error."""

import numpy as np
import pytest
from scipy.special import ndtr, owens_t

from plasticity.estimators import (
    CellTable,
    KeyBasis,
    aggregate_cells,
    ap_from_moments,
    bucket_full_cov,
    linear_diag,
    summarize_buckets,
)
from plasticity.pairs import sample_key_pairs
from plasticity.rotation import householder_matrix, householder_vector


def test_ap_from_moments_formula_and_bounds():
    rng = np.random.default_rng(0)
    m = rng.standard_normal(1000) * 5
    v = rng.exponential(size=1000)
    v[:50] = 0.0
    v[50:60] = -1.0
    ap = ap_from_moments(m, v)
    vv = np.where(v <= 0, 1e-12, v)
    p = ndtr(m / np.sqrt(vv))
    np.testing.assert_array_equal(ap, 4 * p * (1 - p))
    assert np.all((ap >= 0) & (ap <= 1))
    assert np.all(ap_from_moments(np.zeros(5), np.array([1e-30, 1.0, 5.0, 0.0, -3.0])) == 1.0)
    assert ap_from_moments(1e3, 1.0) == 0.0


def _keys(rng, n_k=600, d=4, n_ex=6, buckets=4):
    b = np.sort(rng.integers(0, buckets, n_k))
    ex = np.concatenate([np.sort(rng.integers(0, n_ex, np.sum(b == u))) for u in range(buckets)])
    pos = b * 100.0 + rng.integers(0, 100, n_k)
    order = np.lexsort((pos, ex, b))
    return b[order], ex[order], pos[order], rng.standard_normal((n_k, d))


def _queries(rng, d=4, counts=(5, 40, 60, 80, 1)):
    b = np.repeat(np.arange(len(counts)), counts)
    pos = b * 100.0 + rng.integers(0, 100, b.shape[0])
    order = np.lexsort((pos, b))
    return b[order], pos[order], rng.standard_normal((b.shape[0], d)) + np.arange(d)


def test_bucket_full_cov_equals_a_per_pair_loop():
    rng = np.random.default_rng(1)
    kb, kex, kpos, Xk = _keys(rng)
    qb, qpos, Xq = _queries(rng)
    alpha, beta, rv = rng.standard_normal(4), rng.standard_normal(4) * 1e-2, rng.exponential(size=4)
    table = bucket_full_cov(qb, qpos, Xq, alpha, beta, rv, kb, kex, kpos, Xk,
                            num_pairs_per_bucket=30, rng=np.random.default_rng(7))
    rng2 = np.random.default_rng(7)
    rows = []
    for j in (1, 2, 3):  # bucket 0 and the 1-query bucket 4 are skipped
        sel = qb == j
        tau = qpos[sel].mean()
        mu = Xq[sel, 1:].mean(0)
        S = np.cov(Xq[sel, 1:].T, ddof=1) + 1e-12 * np.eye(3)
        for c in range(j):
            krows = np.flatnonzero(kb == c)
            i1, i2, total = sample_key_pairs(kex[krows], 30, rng2)
            aps = []
            for a, b in zip(krows[i1], krows[i2]):
                D = Xk[a] - Xk[b]
                m = D[0] * (alpha[0] + beta[0] * tau) + D[1:] @ mu
                v = D[0] ** 2 * rv[0] + D[1:] @ S @ D[1:]
                # variance of m from the bucket's sampled mean (S / n_j) and the fitted line at tau
                w = D[1:] @ S @ D[1:] / sel.sum() + D[0] ** 2 * rv[0] * (
                    1 / qpos.size + (tau - qpos.mean()) ** 2 / np.sum((qpos - qpos.mean()) ** 2))
                # Owen's T form of the debiased AP: E over m_hat ~ N(m, w) of it is 4 Phi (1 - Phi)
                aps.append(8 * owens_t(m / np.sqrt(v - w), 1 / np.sqrt(1 - 2 * w / v)))
            aps = np.array(aps)
            rows.append((j, c, min(aps.mean(), 1.0) if aps.size else np.nan, aps.size,
                         aps.var(ddof=1) if aps.size > 1 else 0.0, sel.sum()))
    got = list(zip(table.q_bucket, table.k_bucket, table.plasticity, table.n_pairs, table.ap_var, table.q_count))
    assert [(r[0], r[1], r[3], r[5]) for r in got] == [(r[0], r[1], r[3], r[5]) for r in rows]
    np.testing.assert_allclose([r[2] for r in got], [r[2] for r in rows], rtol=1e-10)
    np.testing.assert_allclose([r[4] for r in got], [r[4] for r in rows], rtol=1e-8, atol=1e-15)
    assert table.estimator == "bucket_full_cov"
    assert set(table.rows()) == {"q_bucket", "k_bucket", "plasticity", "n_pairs"}


def test_linear_diag_equals_a_per_pair_loop_and_uses_same_pairs():
    rng = np.random.default_rng(2)
    kb, kex, kpos, Xk = _keys(rng)
    qb, qpos, Xq = _queries(rng)
    alpha, beta, rv = rng.standard_normal(4), rng.standard_normal(4) * 1e-2, rng.exponential(size=4)
    table = linear_diag(qb, qpos, None, alpha, beta, rv, kb, kex, kpos, Xk, num_pairs_per_bucket=25,
                        rng=np.random.default_rng(3))
    full = bucket_full_cov(qb, qpos, Xq, alpha, beta, rv, kb, kex, kpos, Xk, num_pairs_per_bucket=25,
                           rng=np.random.default_rng(3))
    np.testing.assert_array_equal(table.n_pairs, full.n_pairs)
    rng2 = np.random.default_rng(3)
    vals = []
    for j in (1, 2, 3):
        tau = qpos[qb == j].mean()
        for c in range(j):
            krows = np.flatnonzero(kb == c)
            i1, i2, _ = sample_key_pairs(kex[krows], 25, rng2)
            D = Xk[krows[i1]] - Xk[krows[i2]]
            m = D @ (alpha + beta * tau)
            v = (D**2) @ rv
            # every component's mean is a line fitted to all queries: m's variance is v times
            # 1/N + (tau - mean p)^2 / sum (p - mean p)^2; Owen's T form of the debiased AP
            s2 = 1 / qpos.size + (tau - qpos.mean()) ** 2 / np.sum((qpos - qpos.mean()) ** 2)
            vals.append(min(np.mean(8 * owens_t(m / np.sqrt(v * (1 - s2)), 1 / np.sqrt(1 - 2 * s2))), 1.0))
    np.testing.assert_allclose(table.plasticity, vals, rtol=1e-12)
    assert table.estimator == "linear_diag"


def test_cells_without_pairs_are_nan_rows():
    rng = np.random.default_rng(4)
    # key bucket 1 has one key per example: no same-example pair
    kb = np.array([0, 0, 0, 1, 1, 1])
    kex = np.array([0, 0, 1, 0, 1, 2])
    kpos = np.array([0.0, 1, 2, 10, 11, 12])
    Xk = rng.standard_normal((6, 3))
    qb = np.repeat([2], 5)
    qpos = 20.0 + np.arange(5)
    Xq = rng.standard_normal((5, 3))
    t = bucket_full_cov(qb, qpos, Xq, np.zeros(3), np.zeros(3), np.ones(3), kb, kex, kpos, Xk,
                        rng=np.random.default_rng(0))
    np.testing.assert_array_equal(t.k_bucket, [0, 1])
    np.testing.assert_array_equal(t.n_pairs, [1, 0])
    np.testing.assert_array_equal(t.total_pairs, [1, 0])
    assert not np.isnan(t.plasticity[0]) and np.isnan(t.plasticity[1])
    ap, se = aggregate_cells(t)
    assert ap == t.plasticity[0] and se == 0.0  # one pair: variance 0


def test_nothing_eligible_gives_nan_and_no_rows():
    rng = np.random.default_rng(5)
    kb, kex, kpos, Xk = _keys(rng, buckets=2)
    t = bucket_full_cov(np.zeros(10, int), np.arange(10.0), rng.standard_normal((10, 4)), np.zeros(4), np.zeros(4),
                        np.ones(4), kb, kex, kpos, Xk, rng=np.random.default_rng(0))
    assert t.q_bucket.shape == (0,)
    ap, se = aggregate_cells(t)
    assert np.isnan(ap) and np.isnan(se)


def test_zero_mean_queries_give_ap_exactly_one():
    rng = np.random.default_rng(6)
    kb, kex, kpos, Xk = _keys(rng, buckets=3)
    half = rng.integers(-3, 4, size=(50, 4)).astype(float)
    Xq = np.vstack([half, -half, half, -half])  # bucket means exactly 0
    qb = np.repeat([1, 2], 100)
    qpos = np.r_[np.full(100, 150.0), np.full(100, 250.0)]
    for est in (bucket_full_cov, linear_diag):
        t = est(qb, qpos, Xq, np.zeros(4), np.zeros(4), np.ones(4), kb, kex, kpos, Xk, rng=np.random.default_rng(1))
        assert np.all(t.plasticity == 1.0)
        # the debiased pair AP at m = 0 is 1 + (2/pi) int_0^rho ... > 1 (its mean over m_hat ~ N(0, w) is 1),
        # the same for every pair here (n_j = 100, and the fitted line's variance factor is also 1/100),
        # so the pairs' variance is rounding only, and the clipped cells are exactly 1
        assert np.all(t.ap_var < 1e-26)
        ap, se = aggregate_cells(t)
        assert ap == 1.0 and se < 1e-14


def test_deterministic_queries_give_ap_near_zero():
    rng = np.random.default_rng(7)
    kb, kex, kpos, Xk = _keys(rng, buckets=3)
    qb = np.repeat([1, 2], 200)
    qpos = np.r_[np.full(200, 150.0), np.full(200, 250.0)]
    Xq = np.array([3.0, -2.0, 1.5, 2.5]) + rng.standard_normal((400, 4)) * 1e-5
    t = bucket_full_cov(qb, qpos, Xq, np.array([3.0, 0, 0, 0]), np.zeros(4), np.full(4, 1e-10), kb, kex, kpos, Xk,
                        rng=np.random.default_rng(2))
    ap, se = aggregate_cells(t)
    assert ap < 0.01
    assert np.all((t.plasticity >= 0) & (t.plasticity <= 1))


def _table(estimator):
    return CellTable(
        estimator=estimator,
        q_bucket=np.array([1, 2, 2, 2]),
        k_bucket=np.array([0, 0, 1, 3]),
        plasticity=np.array([0.5, 0.9, np.nan, 0.7]),
        n_pairs=np.array([2, 4, 0, 1]),
        total_pairs=np.array([5, 9, 0, 1]),
        ap_var=np.array([0.02, 0.04, np.nan, 0.0]),
        q_count=np.array([10, 30, 30, 30]),
    )


def test_aggregation_by_hand_bucket_full_cov():
    t = _table("bucket_full_cov")
    s = summarize_buckets(t)
    np.testing.assert_array_equal(s.bucket, [1, 2])
    np.testing.assert_allclose(s.ap, [0.5, 0.8])
    np.testing.assert_allclose(s.var, [0.01, (0.01 + 0.0) / 4])
    ap, se = aggregate_cells(t)
    assert ap == pytest.approx(0.25 * 0.5 + 0.75 * 0.8, rel=1e-15)
    assert se == pytest.approx(np.sqrt(0.25**2 * 0.01 + 0.75**2 * 0.0025), rel=1e-14)


def test_aggregation_by_hand_linear_diag():
    ap, se = aggregate_cells(_table("linear_diag"))
    assert ap == pytest.approx(0.7, rel=1e-15)
    assert se == pytest.approx(np.sqrt((0.01 + 0.01 + 0.0) / 9), rel=1e-14)


def test_key_basis_maps_model_into_raw_key_space():
    rng = np.random.default_rng(8)
    d = 6
    s = np.where(rng.random(d) < 0.5, -1.0, 1.0)
    beta = rng.standard_normal(d)
    basis = KeyBasis(s=s, w=householder_vector(beta))
    H = householder_matrix(beta)
    Draw = rng.standard_normal((20, d))
    Drot = (Draw * s) @ H
    np.testing.assert_allclose(basis.rotate(Draw), Drot, atol=1e-13)
    mu = rng.standard_normal(d)
    A = rng.standard_normal((d, d))
    C = A @ A.T
    np.testing.assert_allclose(Draw @ basis.map_mean(mu), Drot @ mu, rtol=1e-12)
    np.testing.assert_allclose(np.einsum("ij,jk,ik->i", Draw, basis.map_cov(C), Draw),
                               np.einsum("ij,jk,ik->i", Drot, C, Drot), rtol=1e-11)
