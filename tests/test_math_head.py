"""analyze_head: orientation to attention plasticity chained; agreement with the reference functions, determinism, invariance."""

import numpy as np
import pytest

from plasticity.estimators import aggregate_cells, bucket_full_cov, linear_diag
from plasticity.head import METRIC_KEYS, analyze_head, canonical_order, canonicalize, pair_rng_seed
from plasticity.normality import first_component_residual_stats, noise_normality_stats
from plasticity.orientation import orientation_from_keys
from plasticity.regression import fit_position_regression, scalar_position_predictability
from plasticity.rotation import householder_apply
from plasticity.types import AnalysisParams, TokenArrays
from plasticity.weights import component_weights


def make_head(seed=0, n_q=3000, n_k=2500, d=12, n_ex=8, n_buckets=6, bsize=64, window=None, noise=1.0,
              slope=1.0, heavy=False):
    rng = np.random.default_rng(seed)
    L = n_buckets * bsize

    def shard(n, kind):
        flat = rng.choice(n_ex * L, size=n, replace=False)
        ex, pos = flat // L, flat % L
        base = rng.standard_normal(d) * 0.5
        dirn = rng.standard_normal(d)
        V = base + slope * np.outer(pos / L, dirn)
        eps = rng.standard_t(4, (n, d)) if heavy else rng.standard_normal((n, d))
        V = V + noise * eps * rng.uniform(0.3, 2.0, d)
        return TokenArrays(bucket=(pos // bsize).astype(np.int64), example_id=ex.astype(np.int64),
                           position=pos.astype(np.float64), vectors=V, sliding_window=window if kind == "q" else None)

    return shard(n_q, "q"), shard(n_k, "k")


def permuted(t, rng):
    o = rng.permutation(t.n)
    return TokenArrays(bucket=t.bucket[o], example_id=t.example_id[o], position=t.position[o], vectors=t.vectors[o],
                       sliding_window=t.sliding_window)


def reference(q, k, s, layer, q_head, params):
    """Orientation to attention plasticity with the plain reference functions (materialised rotation of Q and K)."""
    q, k = canonicalize(q), canonicalize(k)
    p = q.position
    Xq = q.vectors * s
    fit = fit_position_regression(p, Xq)
    scal = scalar_position_predictability(p, Xq, fit.beta)
    Xr = householder_apply(Xq, fit.beta)
    fr = fit_position_regression(p, Xr)
    scale = float(np.sqrt(np.mean(np.sum(Xq * Xq, axis=1))))
    sk, ku, kp = first_component_residual_stats(p, Xr[:, 0], scale=scale)
    noise = noise_normality_stats(Xr[:, 1:], params.normality_max_dims, params.p_alpha, params.seed, scale=scale)
    Xk = householder_apply(k.vectors * s, fit.beta)
    est = bucket_full_cov if params.estimator == "bucket_full_cov" else linear_diag
    table = est(q.bucket, p, Xr, fr.alpha, fr.beta, fr.resid_var, k.bucket, k.example_id, k.position, Xk,
                sliding_window=q.sliding_window, num_pairs_per_bucket=params.num_pairs_per_bucket,
                rng=np.random.default_rng(pair_rng_seed(params.seed, layer, q_head)))
    ap, se = aggregate_cells(table)
    metrics = dict(q_R2_pos=fit.r2_overall, q_beta_norm=fit.beta_norm, **scal, q_resid0_skew=sk, q_resid0_kurt=ku,
                   q_resid0_ks_p=kp, **noise, ap_overall=ap, ap_overall_se_pairs=se)
    return metrics, table, fit


@pytest.mark.parametrize("estimator", ["bucket_full_cov", "linear_diag"])
@pytest.mark.parametrize("window", [None, 100])
def test_analyze_head_equals_reference_chain(estimator, window):
    q, k = make_head(seed=1, window=window, heavy=True)
    s = orientation_from_keys(k.bucket, k.vectors)
    params = AnalysisParams(estimator=estimator, normality_max_dims=7, num_pairs_per_bucket=64, seed=3)
    res = analyze_head(q, k, s, layer=2, q_head=5, params=params)
    ref, table, fit = reference(q, k, s, 2, 5, params)
    for key, val in ref.items():
        assert res.metrics[key] == pytest.approx(val, rel=1e-8, abs=1e-12), key
    np.testing.assert_array_equal(res.bucket_rows["q_bucket"], table.q_bucket)
    np.testing.assert_array_equal(res.bucket_rows["k_bucket"], table.k_bucket)
    np.testing.assert_array_equal(res.bucket_rows["n_pairs"], table.n_pairs)
    np.testing.assert_allclose(res.bucket_rows["plasticity"], table.plasticity, rtol=1e-9)
    np.testing.assert_allclose(res.component_rows["component_r2"], fit.r2, rtol=1e-12)
    np.testing.assert_allclose(res.component_rows["weight"], component_weights(fit.r2), rtol=1e-12)
    np.testing.assert_array_equal(res.component_rows["component"], np.arange(q.d))
    assert res.metrics["estimator"] == estimator
    assert res.metrics["n_q_tokens"] == q.n and res.metrics["n_k_tokens"] == k.n and res.metrics["d_model"] == q.d
    assert 0.0 < res.metrics["ap_overall"] < 1.0 and res.metrics["ap_overall_se"] > 0.0


def test_metric_keys_and_python_types():
    q, k = make_head(seed=2)
    res = analyze_head(q, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert tuple(res.metrics) == METRIC_KEYS
    for key, val in res.metrics.items():
        ints = ("n_q_tokens", "n_k_tokens", "d_model", "ap_se_df", "n_examples")
        want = str if key == "estimator" else int if key in ints else bool if key == "ap_ci_calibrated" else float
        assert type(val) is want, key
    assert res.bucket_rows["q_bucket"].dtype == np.int64 and res.bucket_rows["n_pairs"].dtype == np.int64
    assert res.bucket_rows["plasticity"].dtype == np.float64
    assert not np.any(res.bucket_rows["q_bucket"] == 0)
    assert res.component_rows["weight"].sum() == pytest.approx(1.0, abs=1e-12)


def _same(a, b):
    for key in METRIC_KEYS:
        x, y = a.metrics[key], b.metrics[key]
        assert x == y or (isinstance(x, float) and np.isnan(x) and np.isnan(y)), key
    for rows in ("bucket_rows", "component_rows", "bucket_summary_rows"):
        ra, rb = getattr(a, rows), getattr(b, rows)
        assert ra.keys() == rb.keys()
        for col in ra:
            np.testing.assert_array_equal(ra[col], rb[col])


def test_bit_identical_twice_and_under_row_permutation():
    q, k = make_head(seed=3, window=150, heavy=True)
    s = orientation_from_keys(k.bucket, k.vectors)
    params = AnalysisParams(num_pairs_per_bucket=50)
    a = analyze_head(q, k, s, layer=1, q_head=3, params=params)
    b = analyze_head(q, k, s, layer=1, q_head=3, params=params)
    _same(a, b)
    rng = np.random.default_rng(0)
    c = analyze_head(permuted(q, rng), permuted(k, rng), s, layer=1, q_head=3, params=params)
    _same(a, c)


def test_permutation_invariance_with_tied_rows():
    q, k = make_head(seed=4)
    # duplicate (bucket, example, position) with different vectors in both shards
    dup = TokenArrays(bucket=np.r_[q.bucket, q.bucket[:50]], example_id=np.r_[q.example_id, q.example_id[:50]],
                      position=np.r_[q.position, q.position[:50]], vectors=np.vstack([q.vectors, q.vectors[:50] + 1.0]))
    kdup = TokenArrays(bucket=np.r_[k.bucket, k.bucket[:80]], example_id=np.r_[k.example_id, k.example_id[:80]],
                       position=np.r_[k.position, k.position[:80]], vectors=np.vstack([k.vectors, k.vectors[:80] * 2]))
    rng = np.random.default_rng(1)
    params = AnalysisParams(num_pairs_per_bucket=40)
    a = analyze_head(dup, kdup, np.ones(q.d), layer=0, q_head=1, params=params)
    b = analyze_head(permuted(dup, rng), permuted(kdup, rng), np.ones(q.d), layer=0, q_head=1, params=params)
    _same(a, b)
    o1 = canonical_order(dup)
    o2 = canonical_order(permuted(dup, np.random.default_rng(2)))
    assert o1.shape == o2.shape


def test_canonical_order_matches_tokenarrays_canonical():
    q, _ = make_head(seed=5)
    rng = np.random.default_rng(3)
    t = permuted(q, rng)
    o = canonical_order(t)
    c = t.canonical()
    np.testing.assert_array_equal(t.bucket[o], c.bucket)
    np.testing.assert_array_equal(t.position[o], c.position)
    np.testing.assert_array_equal(t.vectors[o], c.vectors)
    # float positions that are not integral fall back to lexsort
    t2 = TokenArrays(bucket=t.bucket, example_id=t.example_id, position=t.position + 0.5, vectors=t.vectors)
    np.testing.assert_array_equal(t2.position[canonical_order(t2)], t2.canonical().position)


def test_seed_layer_and_head_change_the_pair_stream():
    q, k = make_head(seed=6)
    base = analyze_head(q, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams(num_pairs_per_bucket=16))
    other = analyze_head(q, k, np.ones(q.d), layer=0, q_head=1, params=AnalysisParams(num_pairs_per_bucket=16))
    assert base.metrics["q_R2_pos"] == other.metrics["q_R2_pos"]
    assert not np.array_equal(base.bucket_rows["plasticity"], other.bucket_rows["plasticity"])
    assert pair_rng_seed(3, 2, 5) == 3 + 10007 * 2 + 379 * 5


def test_sliding_window_restricts_cells():
    q, k = make_head(seed=7)
    qw = TokenArrays(q.bucket, q.example_id, q.position, q.vectors, sliding_window=70)
    full = analyze_head(q, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    win = analyze_head(qw, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert len(win.bucket_rows["q_bucket"]) < len(full.bucket_rows["q_bucket"])
    # with buckets of 64 positions and a window of 70 only the two preceding buckets can be reached
    gap = win.bucket_rows["q_bucket"] - win.bucket_rows["k_bucket"]
    assert set(gap.tolist()) <= {1, 2} and 1 in gap


def test_pure_noise_queries_have_ap_near_one_and_deterministic_near_zero():
    q, k = make_head(seed=8, slope=0.0, n_q=6000, n_ex=20)
    Vq = np.random.default_rng(0).standard_normal(q.vectors.shape)  # zero-mean, position-free queries
    qn = TokenArrays(q.bucket, q.example_id, q.position, Vq)
    res = analyze_head(qn, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert res.metrics["ap_overall"] > 0.99
    Vd = np.tile(np.linspace(1.0, 3.0, q.d), (q.n, 1)) + 1e-6 * Vq  # deterministic, nonzero mean
    qd = TokenArrays(q.bucket, q.example_id, q.position, Vd)
    res = analyze_head(qd, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert res.metrics["ap_overall"] < 0.01
    assert np.all((res.bucket_rows["plasticity"] >= 0) & (res.bucket_rows["plasticity"] <= 1))


def test_exactly_linear_queries_r2_one():
    q, k = make_head(seed=9, noise=0.0)
    res = analyze_head(q, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert res.metrics["q_R2_pos"] == pytest.approx(1.0, abs=1e-9)
    assert res.metrics["q_resid0_ks_p"] == 1.0  # zero-spread residual


def test_single_dimension_head():
    q, k = make_head(seed=10, d=1)
    res = analyze_head(q, k, np.array([-1.0]), layer=0, q_head=0, params=AnalysisParams())
    m = res.metrics
    assert (m["q_noise_med_abs_skew"], m["q_noise_med_abs_kurt"], m["q_noise_med_ks_p"], m["q_noise_frac_ks_p_lt_alpha"]) == (0.0, 0.0, 1.0, 0.0)
    assert 0.0 <= m["ap_overall"] <= 1.0
    np.testing.assert_array_equal(res.component_rows["weight"], [1.0])


def test_only_bucket_zero_queries_give_nan():
    q, k = make_head(seed=11)
    sel = q.bucket == 0
    q0 = TokenArrays(q.bucket[sel], q.example_id[sel], q.position[sel], q.vectors[sel])
    res = analyze_head(q0, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert np.isnan(res.metrics["ap_overall"]) and np.isnan(res.metrics["ap_overall_se"])
    assert res.bucket_rows["q_bucket"].shape == (0,)


def test_input_errors():
    q, k = make_head(seed=12)
    k3 = TokenArrays(k.bucket, k.example_id, k.position, k.vectors[:, :3])
    with pytest.raises(ValueError, match="width"):
        analyze_head(q, k3, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    with pytest.raises(ValueError, match="orientation"):
        analyze_head(q, k, np.ones(q.d + 1), layer=0, q_head=0, params=AnalysisParams())
    empty = TokenArrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, q.d)))
    with pytest.raises(ValueError, match="no rows"):
        analyze_head(empty, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("n_q", [1, 2, 3, 5])
def test_tiny_heads_agree_with_reference(d, n_q):
    q, k = make_head(seed=d * 10 + n_q, n_q=n_q, n_k=50, d=d, n_ex=2, n_buckets=3, bsize=20)
    for est in ("bucket_full_cov", "linear_diag"):
        params = AnalysisParams(estimator=est, normality_max_dims=1)
        res = analyze_head(q, k, np.ones(d), layer=0, q_head=0, params=params)
        ref, _, _ = reference(q, k, np.ones(d), 0, 0, params)
        for key, val in ref.items():
            got = res.metrics[key]
            assert (np.isnan(got) and np.isnan(val)) or got == pytest.approx(val, rel=1e-9, abs=1e-12), key


def test_constant_query_positions():
    q, k = make_head(seed=13)
    qc = TokenArrays(np.full(q.n, 3), q.example_id, np.full(q.n, 200.0), q.vectors)
    m = analyze_head(qc, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams()).metrics
    assert (m["q_R2_pos"], m["q_beta_norm"], m["q_R2_scalar"], m["q_mae_baseline"], m["q_mae_ratio"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert 0.0 < m["ap_overall"] < 1.0


@pytest.mark.parametrize("side,fill,reason", [
    ("q", 0.0, "every query vector is zero"),
    ("q", 0.7, "every query vector is the same vector"),
    ("k", 0.7, "every key vector is the same"),
])
def test_rows_without_spread_are_a_degenerate_head_not_a_perfect_score(side, fill, reason):
    """Constant queries make every component's R2 = 1 - 0/1e-12 = 1, and zero queries every pair's
    m = v = 0, AP = 4 Phi(0)(1 - Phi(0)) = 1 with SE 0: numbers of the floors, not of the data."""
    from plasticity.head import DegenerateHead, degenerate_reason

    q, k = make_head(seed=3)
    const = q if side == "q" else k
    const.vectors[:] = fill
    with pytest.raises(DegenerateHead, match=reason) as err:
        analyze_head(q, k, np.ones(q.d), layer=0, q_head=0, params=AnalysisParams())
    assert err.value.side == side
    const.vectors[5, 2] += 1e-6  # one row that differs: a head with (tiny) spread is analysed
    assert degenerate_reason(q.vectors, k.vectors) is None
