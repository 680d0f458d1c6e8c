"""The example jackknife of `ap_overall_se`: groups, pair slopes and gradients, the exact
per-group refits, the replicates against the exact delete-a-group jackknife, and the NaN rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jackknife_reference import exact_jackknife, jackknife_se as reference_se
from scipy.special import ndtr

from plasticity.estimators import (
    CellTable,
    KeyBasis,
    QueryBuckets,
    ap_from_moments,
    full_cov_model,
    linear_diag_model,
    plasticity_cells,
)
from plasticity.head import analyze_head
from plasticity.jackknife import combine_replicates, example_groups, jackknife_se, t_interval
from plasticity.orientation import orientation_from_keys
from plasticity.pair_ap import ap_with_slopes
from plasticity.pair_influence import PairInfluence
from plasticity.pairs import KeyPairIndex
from plasticity.query_influence import BucketGroupStats, QuadraticForm, deleted_fits
from plasticity.regression import fit_position_regression
from plasticity.rotation import householder_vector
from plasticity.synthetic import SyntheticSpec, make_key_shard, make_query_shard
from plasticity.types import AnalysisParams, TokenArrays


def test_groups_are_examples_or_balanced_hash_groups():
    q_ex = np.repeat(np.arange(0, 20, 2), 5)
    k_ex = np.arange(30)
    g = example_groups(q_ex, k_ex, max_groups=64)
    assert (g.n_groups, g.n_examples) == (30, 30)  # union of query and key examples, one group each
    assert np.array_equal(g.q_group, g.k_group[q_ex])
    assert len(set(g.k_group.tolist())) == 30
    h = example_groups(q_ex, k_ex, max_groups=7)
    assert (h.n_groups, h.n_examples) == (7, 30)
    sizes = np.bincount(h.k_group, minlength=7)
    assert sizes.max() - sizes.min() <= 1  # dealt round-robin
    again = example_groups(q_ex[::-1], k_ex[::-1], max_groups=7)  # depends on the ids only
    assert np.array_equal(again.k_group[::-1], h.k_group)
    assert not np.array_equal(h.k_group, np.arange(30) % 7)  # hash order, not id order


def test_ap_with_slopes_bits_and_derivatives():
    rng = np.random.default_rng(0)
    m = rng.standard_normal(500) * 3
    v = rng.exponential(size=500) + 0.05
    v[:5] = [0.0, -1.0, 0.0, 1e-300, -1e-3]
    ap, dm, dv = ap_with_slopes(m, v)
    np.testing.assert_array_equal(ap, ap_from_moments(m, v))
    ok = v > 1e-3
    h = 1e-6
    np.testing.assert_allclose(dm[ok], (ap_from_moments(m + h, v) - ap_from_moments(m - h, v))[ok] / (2 * h),
                               rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dv[ok], (ap_from_moments(m, v + h) - ap_from_moments(m, v - h))[ok] / (2 * h),
                               rtol=1e-5, atol=1e-8)
    assert np.all(dv >= 0) and np.all(dv[[0, 1, 2, 4]] == 0)
    z = m[ok] / np.sqrt(v[ok])
    p = ndtr(z)
    np.testing.assert_allclose(dm[ok], 4 * (1 - 2 * p) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi) / np.sqrt(v[ok]),
                               rtol=1e-12, atol=1e-300)


def _small_head(seed, n_ex=6, d=5):
    rng = np.random.default_rng(seed)
    kb = np.repeat(np.arange(4), 60)
    kex = np.tile(np.repeat(np.arange(n_ex), 10), 4)
    kpos = kb * 100.0 + np.tile(np.arange(10), 24) * 9
    Xk = rng.standard_normal((240, d))
    qb = np.repeat([1, 2, 3], 40)
    qpos = qb * 100.0 + rng.integers(0, 100, 120)
    Xq = rng.standard_normal((120, d)) * 0.4 + np.linspace(0.5, 1.5, d)
    return kb, kex, kpos, Xk, qb, qpos, Xq


@pytest.mark.parametrize("estimator", ["bucket_full_cov", "linear_diag"])
def test_pair_gradients_equal_finite_differences(estimator):
    kb, kex, kpos, Xk, qb, qpos, Xq = _small_head(1)
    d = Xq.shape[1]
    rng = np.random.default_rng(2)
    s = np.where(rng.random(d) < 0.5, -1.0, 1.0)
    basis = KeyBasis(s=s, w=householder_vector(rng.standard_normal(d)))
    buckets = QueryBuckets.build(qb, qpos)
    keys = KeyPairIndex.build(kb, kex, kpos)
    alpha, beta, rv = np.linspace(0.6, -0.4, d), np.full(d, 1e-3), np.linspace(0.2, 0.6, d)
    if estimator == "bucket_full_cov":
        mu = np.stack([Xq[qb == j, 1:].mean(0) for j in (1, 2, 3)])
        Sigma = np.stack([np.cov(Xq[qb == j, 1:].T) for j in (1, 2, 3)])
        model = full_cov_model(buckets, mu, Sigma, alpha, beta, rv, positions=qpos)
    else:
        model = linear_diag_model(buckets, alpha, beta, rv, positions=qpos)

    def run(model, groups=None):
        return plasticity_cells(model, keys, Xk, sliding_window=None, num_pairs_per_bucket=40,
                                rng=np.random.default_rng(5), basis=basis, key_group=groups, n_groups=3)

    base = run(model)
    table = run(model, groups=kex % 3)
    for f in ("plasticity", "n_pairs", "ap_var"):  # the pair side changes no number of the estimate
        np.testing.assert_array_equal(getattr(table, f), getattr(base, f))
    inf = table.influence
    np.testing.assert_allclose(inf.cell_group_ap.sum(1) / inf.cell_group_pairs.sum(1), table.plasticity, rtol=1e-13)
    np.testing.assert_array_equal(inf.cell_group_pairs.sum(1), table.n_pairs)

    def bucket_aps(t):
        return np.array([np.nanmean(t.plasticity[t.q_bucket == j]) for j in (1, 2, 3)])

    def slope(**change):
        up = run(dataclasses.replace(model, **{k: getattr(model, k) + v for k, v in change.items()}))
        down = run(dataclasses.replace(model, **{k: getattr(model, k) - v for k, v in change.items()}))
        return (bucket_aps(up) - bucket_aps(down)) / (2 * h)

    h = 1e-6
    for c in (0, 2):  # the mean of component c in every bucket
        e = np.zeros(d)
        e[c] = h
        np.testing.assert_allclose(inf.grad_mean[:, c], slope(mean=e), rtol=1e-5, atol=1e-9)
    if estimator == "bucket_full_cov":
        for a, b in ((0, 0), (2, 3), (1, 4)):  # symmetric perturbations of the covariance
            E = np.zeros((d, d))
            E[a, b] = E[b, a] = h
            np.testing.assert_allclose((1 if a == b else 2) * inf.grad_cov[:, a, b], slope(cov=E), rtol=1e-5, atol=1e-9)
    else:
        for c in (0, 3):
            e = np.zeros(d)
            e[c] = h
            np.testing.assert_allclose(inf.grad_diag[:, c], slope(diag=e), rtol=1e-5, atol=1e-9)


def test_deleted_fits_equal_refits_without_the_group():
    rng = np.random.default_rng(3)
    n, k, G = 300, 3, 5
    p = rng.integers(0, 500, n).astype(float)
    X = 2.0 + 0.01 * p[:, None] * np.arange(1, k + 1) + rng.standard_normal((n, k))
    grp = rng.integers(0, G, n)
    full = fit_position_regression(p, X)
    pc = p - p.mean()
    R = (X - full.mean) - pc[:, None] * full.beta

    def gs(v):
        out = np.zeros((G,) + v.shape[1:])
        np.add.at(out, grp, v)
        return out

    fits = deleted_fits(gs(np.ones(n)), gs(pc), gs(pc * pc), gs(R), gs(R * R), gs(pc[:, None] * R), True)
    for g in range(G):
        keep = grp != g
        ref = fit_position_regression(p[keep], X[keep])
        np.testing.assert_allclose(full.beta + fits.dbeta[g], ref.beta, rtol=1e-10)
        np.testing.assert_allclose(full.resid_var + fits.dresid_var[g], ref.resid_var, rtol=1e-10)
        tau = 321.0  # the fitted mean at any position
        got = full.alpha + full.beta * tau + fits.rbar[g] + fits.dbeta[g] * (tau - p.mean() - fits.pbar[g])
        np.testing.assert_allclose(got, ref.alpha + ref.beta * tau, rtol=1e-10)


@pytest.mark.parametrize("rank", [0, 2, 6])
def test_quadratic_forms_of_rows(rank):
    rng = np.random.default_rng(rank)
    B = rng.standard_normal((6, rank))
    A = B @ B.T
    Y = rng.standard_normal((50, 6)) + 3.0
    want = np.einsum("ij,jk,ik->i", Y, A, Y)
    form = QuadraticForm(A)
    assert (form.L is None) == (rank == 0)
    np.testing.assert_allclose(form.rows(Y.copy()), want, rtol=1e-9, atol=1e-12 * np.abs(want).max(initial=1))
    indefinite = QuadraticForm(A - 10 * np.eye(6) if rank else -np.eye(6))  # not PSD: the plain product
    np.testing.assert_allclose(indefinite.rows(Y.copy()), np.einsum("ij,jk,ik->i", Y, indefinite.A, Y), rtol=1e-12)


def test_key_side_replicates_are_exact():
    """With no model shift, a replicate is exactly the estimate from the pairs of the other groups."""
    cell_ap = np.array([[0.2, 0.4, 0.0], [1.0, 0.0, 0.5], [0.3, 0.3, 0.3], [0.1, 0.0, 0.9]])
    cell_pairs = np.array([[1, 2, 0], [2, 0, 1], [1, 1, 1], [1, 0, 2]])
    table = CellTable("bucket_full_cov", np.array([1, 2, 2, 3]), np.array([0, 0, 1, 2]),
                      cell_ap.sum(1) / cell_pairs.sum(1), cell_pairs.sum(1), np.full(4, 9), np.zeros(4),
                      np.array([4, 6, 6, 2]),
                      PairInfluence(3, cell_ap, cell_pairs, np.zeros((3, 2)), np.zeros((3, 2, 2)), None))
    buckets = QueryBuckets(np.array([1, 2, 3]), np.zeros(3, int), np.zeros(3, int), np.array([4, 6, 2]),
                           np.zeros(3), np.zeros(3))
    stats = BucketGroupStats(n=np.array([[1, 2, 1], [2, 2, 2], [0, 0, 2]], float), sp=np.zeros((3, 3)))
    jk = combine_replicates(table, buckets, stats, np.zeros((3, 3)), n_examples=3)
    # by hand: without group 0 bucket 1 keeps 0.4/2, bucket 2 keeps (0.5/1, 0.6/2), bucket 3 (0.9/2) with 2 queries
    by_hand = [(3 * 0.2 + 4 * (0.5 + 0.3) / 2 + 2 * 0.45) / 9,
               # without group 1: bucket 1 (0.2/1, 2 queries), bucket 2 ((1.5/3), 0.6/2), bucket 3 (1.0/3)
               (2 * 0.2 + 4 * (0.5 + 0.3) / 2 + 2 * (1.0 / 3)) / 8,
               # without group 2: bucket 1 (0.6/3), bucket 2 (1.0/2, 0.6/2); bucket 3 keeps a pair but
               # loses its queries, so it drops out
               (3 * 0.2 + 4 * (0.5 + 0.3) / 2) / 7]
    np.testing.assert_allclose(jk.ap_replicates, by_hand, rtol=1e-14)
    assert jk.ap_se == pytest.approx(np.sqrt(2 / 3 * np.sum((np.array(by_hand) - np.mean(by_hand)) ** 2)), rel=1e-14)
    assert np.isnan(jk.bucket_se[2]) and np.all(np.isfinite(jk.bucket_se[:2]))  # bucket 3 vanishes without group 2
    lin = dataclasses.replace(table, estimator="linear_diag")
    jl = combine_replicates(lin, buckets, stats, np.zeros((3, 3)), n_examples=3)
    np.testing.assert_allclose(jl.ap_replicates, [(0.2 + 0.5 + 0.3 + 0.45) / 4, (0.2 + 0.5 + 0.3 + 1 / 3) / 4,
                                                  (0.2 + 0.5 + 0.3) / 3], rtol=1e-14)


def test_jackknife_se_and_t_interval():
    r = np.array([1.0, 2.0, 4.0])
    assert jackknife_se(r) == pytest.approx(np.sqrt(2 / 3 * ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2)),
                                            rel=1e-15)
    assert np.isnan(jackknife_se(np.array([0.3])))
    assert np.isnan(jackknife_se(np.array([0.3, np.nan, 0.2])))
    lo, hi = t_interval(0.5, 0.01, 1)  # t(0.975, 1) = 12.7062047361747
    assert lo == pytest.approx(0.5 - 0.127062047361747, rel=1e-13) and hi == pytest.approx(0.5 + 0.127062047361747, rel=1e-13)
    lo, hi = t_interval(np.array([0.02, 0.99]), np.array([0.1, 0.1]), 30)
    assert lo[0] == 0.0 and hi[1] == 1.0 and lo[1] == pytest.approx(0.99 - 0.1 * 2.0422724563012373, rel=1e-13)
    lo, hi = t_interval(0.5, 0.01, 0)
    assert np.isnan(lo) and np.isnan(hi)


def _synthetic_head(layer, q_head, **kw):
    spec = SyntheticSpec(**{**dict(num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=12, num_examples=16,
                                   seq_len=256, bucket_size=32, sliding_windows={1: 64}, capture_fraction=0.7,
                                   noise_scales=(0.05, 0.2, 0.6, 2.0)), **kw})
    q, k = make_query_shard(spec, layer, q_head), make_key_shard(spec, layer, q_head // 2)
    return q, k, orientation_from_keys(k.bucket, k.vectors)


@pytest.mark.parametrize("estimator", ["bucket_full_cov", "linear_diag"])
def test_linearised_replicates_match_the_exact_jackknife(estimator):
    params = AnalysisParams(estimator=estimator, normality_max_dims=0)
    ratios, bucket_ratios = [], []
    for layer, q_head in ((0, 0), (0, 1), (1, 2), (1, 3)):
        q, k, s = _synthetic_head(layer, q_head)
        res = analyze_head(q, k, s, layer=layer, q_head=q_head, params=params)
        ref = exact_jackknife(q, k, s, layer=layer, q_head=q_head, params=params,
                              refit_rotation=estimator == "bucket_full_cov")
        assert ref["ap"] == pytest.approx(res.metrics["ap_overall"], rel=1e-9)
        assert res.metrics["ap_se_df"] == ref["n_groups"] - 1 == 15
        ratios.append(res.metrics["ap_overall_se"] / reference_se(ref["ap_rep"]))
        rows = res.bucket_summary_rows
        assert list(rows["q_bucket"]) == sorted(ref["buckets"])
        bucket_ratios += list(rows["ap_se"] / np.array([reference_se(ref["buckets"][b][1]) for b in rows["q_bucket"]]))
    np.testing.assert_allclose(ratios, 1.0, atol=0.05)
    np.testing.assert_allclose(bucket_ratios, 1.0, atol=0.15)


def test_rotation_term_is_needed_for_bucket_full_cov():
    """bucket_full_cov with the rotation held fixed would miss part of the example variance."""
    params = AnalysisParams(normality_max_dims=0)
    q, k, s = _synthetic_head(0, 3, noise_condition=10.0, capture_fraction=1.0, sliding_windows={})
    res = analyze_head(q, k, s, layer=0, q_head=3, params=params)
    fixed = reference_se(exact_jackknife(q, k, s, layer=0, q_head=3, params=params)["ap_rep"])
    refit = reference_se(exact_jackknife(q, k, s, layer=0, q_head=3, params=params, refit_rotation=True)["ap_rep"])
    assert refit > 2 * fixed
    assert res.metrics["ap_overall_se"] == pytest.approx(refit, rel=0.06)


def test_few_examples_and_nothing_eligible():
    q, k, s = _synthetic_head(0, 2)
    one_q = TokenArrays(q.bucket[q.example_id == 3], q.example_id[q.example_id == 3], q.position[q.example_id == 3],
                        q.vectors[q.example_id == 3])
    one_k = TokenArrays(k.bucket[k.example_id == 3], k.example_id[k.example_id == 3], k.position[k.example_id == 3],
                        k.vectors[k.example_id == 3])
    m = analyze_head(one_q, one_k, s, layer=0, q_head=2, params=AnalysisParams()).metrics
    assert 0 < m["ap_overall"] < 1 and (m["n_examples"], m["ap_se_df"]) == (1, 0)
    assert all(np.isnan(m[c]) for c in ("ap_overall_se", "ap_overall_ci_low", "ap_overall_ci_high"))
    two = np.isin(q.example_id, [3, 8])
    two_k = np.isin(k.example_id, [3, 8])
    m = analyze_head(TokenArrays(q.bucket[two], q.example_id[two], q.position[two], q.vectors[two]),
                     TokenArrays(k.bucket[two_k], k.example_id[two_k], k.position[two_k], k.vectors[two_k]),
                     s, layer=0, q_head=2, params=AnalysisParams()).metrics
    assert (m["n_examples"], m["ap_se_df"]) == (2, 1) and m["ap_overall_se"] > 0
    half = 12.706204736174707 * m["ap_overall_se"]  # t(0.975, 1 degree of freedom)
    assert m["ap_overall_ci_low"] == pytest.approx(max(0.0, m["ap_overall"] - half), rel=1e-12, abs=1e-15)
    assert m["ap_overall_ci_high"] == pytest.approx(min(1.0, m["ap_overall"] + half), rel=1e-12)
    zero = q.bucket == 0
    res = analyze_head(TokenArrays(q.bucket[zero], q.example_id[zero], q.position[zero], q.vectors[zero]), k, s,
                       layer=0, q_head=2, params=AnalysisParams())
    assert np.isnan(res.metrics["ap_overall_se"]) and res.bucket_summary_rows["q_bucket"].shape == (0,)


def test_pull_is_the_transpose_of_map():
    """<g, map(x)> = <pull(g), x>: gradients in the raw basis come back to the rotated one exactly."""
    rng = np.random.default_rng(9)
    d = 7
    basis = KeyBasis(s=np.where(rng.random(d) < 0.5, -1.0, 1.0), w=householder_vector(rng.standard_normal(d)))
    mu, g = rng.standard_normal(d), rng.standard_normal(d)
    assert g @ basis.map_mean(mu) == pytest.approx(basis.pull_mean(g) @ mu, rel=1e-13)
    C, Graw = rng.standard_normal((d, d)), rng.standard_normal((3, d, d))
    C, Graw = C + C.T, Graw + Graw.transpose(0, 2, 1)
    pulled = basis.pull_cov(Graw)
    for i in range(3):
        assert np.vdot(Graw[i], basis.map_cov(C)) == pytest.approx(np.vdot(pulled[i], C), rel=1e-12)
    np.testing.assert_allclose(basis.pull_mean(np.stack([g, 2 * g])), [basis.pull_mean(g), 2 * basis.pull_mean(g)])


def _query_side_case(seed, constant_positions=False):
    """Canonical queries of 3 buckets x 5 examples, their fits and the structures the query side takes."""
    from plasticity.query_influence import RowRuns
    from plasticity.regression import PositionDesign, fit_rows

    rng = np.random.default_rng(seed)
    d, G = 4, 5
    qb = np.repeat([1, 2, 3], 50)
    ex = np.tile(np.repeat(np.arange(G), 10), 3)
    pos = np.full(150, 7.0) if constant_positions else qb * 100.0 + rng.integers(0, 100, 150)
    order = np.lexsort((pos, ex, qb))
    qb, ex, pos = qb[order], ex[order], pos[order]
    X = rng.standard_normal((150, d)) * np.array([1.0, 0.5, 2.0, 0.3]) + 0.01 * pos[:, None] * np.array([1.0, 0.2, 0, 0])
    X[ex == 2] += 0.7  # an example that differs, so replicates move
    design = PositionDesign.build(pos)
    fit = fit_rows(design, X)
    buckets = QueryBuckets.build(qb, pos)
    runs = RowRuns.build(qb, ex, ex)
    return X, pos, qb, ex, design, fit, buckets, runs, G


def test_full_cov_sigma_shift_is_the_exact_downdate():
    """With only dAP/dSigma non-zero (and no positional direction), Delta_jg = <Gamma, Sigma_j(without g) - Sigma_j>."""
    from plasticity.query_influence import model_shifts_full_cov

    X, pos, qb, ex, design, fit, buckets, runs, G = _query_side_case(10, constant_positions=True)
    d = X.shape[1]
    assert fit.beta_norm == 0.0
    rng = np.random.default_rng(11)
    B = rng.standard_normal((d - 1, d - 1))
    grad_cov = np.zeros((3, d, d))
    grad_cov[:, 1:, 1:] = B @ B.T
    mu = np.stack([X[qb == j, 1:].mean(0) for j in (1, 2, 3)])
    Sigma = np.stack([np.cov(X[qb == j, 1:].T) for j in (1, 2, 3)])
    _, shifts = model_shifts_full_cov(X, design, fit, fit, X[:, 0].copy(), None, buckets, mu, Sigma, runs, G,
                                      np.zeros((3, d)), grad_cov)
    for jj, j in enumerate((1, 2, 3)):
        for g in range(G):
            rows = X[(qb == j) & (ex != g), 1:]
            want = np.vdot(B @ B.T, np.cov(rows.T) - Sigma[jj])
            assert shifts[jj, g] == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("component", [0, 2])
def test_linear_diag_mean_and_variance_shifts_are_exact_refits(component):
    """dAP/dmean = e_c (or dAP/dresid_var = e_c) makes Delta_jg the exact change of the refit mean (variance)."""
    from plasticity.query_influence import model_shifts_linear_diag

    X, pos, qb, ex, design, fit, buckets, runs, G = _query_side_case(12)
    d = X.shape[1]
    e = np.zeros((3, d))
    e[:, component] = 1.0
    _, mean_shift = model_shifts_linear_diag(X, design, fit, fit, None, buckets, runs, G, e, np.zeros((3, d)))
    _, var_shift = model_shifts_linear_diag(X, design, fit, fit, None, buckets, runs, G, np.zeros((3, d)), e)
    for g in range(G):
        keep = ex != g
        ref = fit_position_regression(pos[keep], X[keep])
        for jj, j in enumerate((1, 2, 3)):
            tau_g = pos[keep & (qb == j)].mean()
            want = (ref.alpha + ref.beta * tau_g - fit.alpha - fit.beta * buckets.tau[jj])[component]
            assert mean_shift[jj, g] == pytest.approx(want, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(var_shift[:, g], (ref.resid_var - fit.resid_var)[component], rtol=1e-9)


def test_full_cov_component_zero_shift_is_the_exact_refit():
    """dAP/dm0 = 1 alone (rotation off: no positional direction in the data) gives the exact change of
    m0_j = alpha0 + beta0 tau_j; dAP/dsigma2 = 1 alone the exact change of resid_var[0]."""
    from plasticity.query_influence import model_shifts_full_cov

    X, pos, qb, ex, design, fit, buckets, runs, G = _query_side_case(13)
    d = X.shape[1]
    mu = np.stack([X[qb == j, 1:].mean(0) for j in (1, 2, 3)])
    Sigma = np.stack([np.cov(X[qb == j, 1:].T) for j in (1, 2, 3)])
    g = np.zeros((3, d))
    g[:, 0] = 1.0
    fixed = dataclasses.replace(fit, beta_norm=0.0)  # no rotation term: only the data effect on component 0
    _, m0_shift = model_shifts_full_cov(X, design, fixed, fit, X[:, 0].copy(), None, buckets, mu, Sigma, runs, G, g,
                                        np.zeros((3, d, d)))
    C = np.zeros((3, d, d))
    C[:, 0, 0] = 1.0
    _, s2_shift = model_shifts_full_cov(X, design, fixed, fit, X[:, 0].copy(), None, buckets, mu, Sigma, runs, G,
                                        np.zeros((3, d)), C)
    for gr in range(G):
        keep = ex != gr
        ref = fit_position_regression(pos[keep], X[keep, :1])
        for jj, j in enumerate((1, 2, 3)):
            tau_g = pos[keep & (qb == j)].mean()
            want = ref.alpha[0] + ref.beta[0] * tau_g - fit.alpha[0] - fit.beta[0] * buckets.tau[jj]
            assert m0_shift[jj, gr] == pytest.approx(want, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(s2_shift[:, gr], ref.resid_var[0] - fit.resid_var[0], rtol=1e-9)


def test_replicates_weight_each_bucket_by_the_queries_left_in_it():
    """One example holds nearly all queries of the late buckets (the others keep 3 per bucket):
    without it those buckets weigh far less in ap_overall, and the standard error follows the
    exact delete-a-group jackknife only if each replicate weights buckets by their remaining
    queries (with the full-data counts it comes out about three times too small)."""
    data = SyntheticSpec(num_layers=1, num_q_heads=2, num_k_heads=1, head_dim=8, num_examples=8, seq_len=256,
                         bucket_size=32, sliding_windows={}, noise_scales=(0.3,), seed=2)
    q, k = make_query_shard(data, 0, 0), make_key_shard(data, 0, 0)
    s = orientation_from_keys(k.bucket, k.vectors)
    keep = (q.bucket < 4) | (q.example_id == 0) | ((q.position % 32) < 3)
    q = TokenArrays(q.bucket[keep], q.example_id[keep], q.position[keep], q.vectors[keep])
    late = q.bucket >= 4
    assert (q.example_id[late] == 0).mean() > 0.5  # precondition: one example dominates the late buckets
    params = AnalysisParams(normality_max_dims=0)
    res = analyze_head(q, k, s, layer=0, q_head=0, params=params)
    ref = exact_jackknife(q, k, s, layer=0, q_head=0, params=params, refit_rotation=True)
    assert res.metrics["ap_overall_se"] == pytest.approx(reference_se(ref["ap_rep"]), rel=0.05)
