"""Normality diagnostics: vectorised skew / kurtosis / KS equal scipy's."""

import numpy as np
import pytest
from scipy import stats

from plasticity.normality import (
    column_moments,
    first_component_residual_stats,
    ks_columns,
    ks_norm_pvalues,
    ks_statistic,
    kstwo_sf,
    noise_normality_stats,
    skew_kurtosis_from_moments,
)


def _std(x):
    return (x - x.mean()) / x.std(ddof=1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 30, 1000])
def test_skew_kurtosis_equal_scipy_small_and_large_n(n):
    rng = np.random.default_rng(n)
    X = rng.gamma(2.0, size=(n, 6)) * rng.uniform(0.5, 3, 6) + rng.standard_normal(6)
    _, m2, m3, m4 = column_moments(X)
    sk, ku = skew_kurtosis_from_moments(m2, m3, m4, n)
    ref_s = stats.skew(X, axis=0, bias=False)
    ref_k = stats.kurtosis(X, axis=0, fisher=True, bias=False)
    np.testing.assert_allclose(sk, ref_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ku, ref_k, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 50, 140, 141, 500, 3000, 10001, 30000])
def test_ks_pvalues_equal_scipy_kstest(n):
    rng = np.random.default_rng(1000 + n)
    rows = [rng.standard_normal(n), _std(rng.exponential(size=n)) if n > 1 else rng.standard_normal(n),
            rng.standard_normal(n) * 1.3 + 0.2, rng.uniform(-2, 2, n)]
    Z = np.vstack(rows)
    p = ks_norm_pvalues(Z)
    ref = np.array([stats.kstest(z, "norm").pvalue for z in Z])
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=0)
    assert np.all((p >= 0) & (p <= 1))


def test_ks_statistic_pruned_search_is_exact():
    rng = np.random.default_rng(5)
    for n in (129, 1000, 4097, 25000):
        Z = np.vstack([rng.standard_normal(n), rng.standard_t(3, n), rng.standard_normal(n) + 0.05])
        S = np.sort(Z, axis=1)
        F = stats.norm.cdf(S)
        full = np.maximum((np.arange(1.0, n + 1) / n - F).max(1), (F - np.arange(0.0, n) / n).max(1))
        np.testing.assert_array_equal(ks_statistic(Z), full)  # rows in any order: no sort needed
        np.testing.assert_array_equal(ks_statistic(S), [stats.kstest(s, "norm").statistic for s in S])


def test_kstwo_sf_equals_scipy_on_a_grid():
    # every branch of scipy's _kolmogn for small n; for large n the typical and tail range
    # (the slow Durbin-matrix branch for tiny D is delegated to scipy itself)
    # (scipy's own smirnov is O(n) double-double work per value, so the large-n grids are short)
    for n, m in ((1, 60), (5, 60), (60, 60), (141, 60), (1000, 60), (20000, 12), (100001, 6)):
        lo = 0.3 / n if n <= 1000 else 0.5 / np.sqrt(n)
        D = np.concatenate([np.geomspace(lo, 0.999, m), np.linspace(0.4, 3.0, m) / np.sqrt(n)])
        D = D[(D > 0) & (D < 1)]
        np.testing.assert_allclose(kstwo_sf(D, n), stats.kstwo.sf(D, n), rtol=1e-12, atol=1e-300)


def test_first_component_stats_match_scipy_chain():
    rng = np.random.default_rng(6)
    n = 4000
    p = rng.integers(0, 8000, n).astype(float)
    x0 = 2.0 + 1e-3 * p + rng.gamma(3.0, size=n)
    sk, ku, kp = first_component_residual_stats(p, x0)
    lr = stats.linregress(p, x0)
    z = _std(x0 - lr.intercept - lr.slope * p)
    assert sk == pytest.approx(stats.skew(z, bias=False), rel=1e-9)
    assert ku == pytest.approx(stats.kurtosis(z, bias=False), rel=1e-9)
    assert kp == pytest.approx(stats.kstest(z, "norm").pvalue, rel=1e-9)
    assert kp < 1e-6  # gamma residuals are clearly not normal


def test_first_component_small_n_and_zero_spread():
    # n = 3 (kurtosis falls back to the biased value as in scipy)
    p = np.array([0.0, 0.0, 0.0])
    x0 = np.array([1.0, 2.0, 4.0])
    sk, ku, kp = first_component_residual_stats(p, x0)
    z = _std(x0)
    assert sk == pytest.approx(stats.skew(z, bias=False), rel=1e-12)
    assert ku == pytest.approx(stats.kurtosis(z, bias=False), rel=1e-12)
    assert kp == pytest.approx(stats.kstest(z, "norm").pvalue, rel=1e-12)
    assert first_component_residual_stats(np.arange(5.0), 3.0 + 0.5 * np.arange(5.0)) == (0.0, 0.0, 1.0)
    assert first_component_residual_stats(np.arange(4.0), np.full(4, 0.1)) == (0.0, 0.0, 1.0)
    assert first_component_residual_stats(np.array([1.0]), np.array([1.0])) == (0.0, 0.0, 1.0)


def test_noise_stats_match_per_column_scipy_loop():
    rng = np.random.default_rng(7)
    n, m = 2500, 20
    X = rng.standard_normal((n, m)) * rng.uniform(0.1, 5, m) + rng.standard_normal(m) * 10
    X[:, :5] = rng.exponential(size=(n, 5))
    out = noise_normality_stats(X, normality_max_dims=8, p_alpha=0.01, seed=3)
    sel = np.random.default_rng(3).choice(m, size=8, replace=False)
    np.testing.assert_array_equal(ks_columns(m, 8, 3), sel)
    Z = np.column_stack([_std(X[:, c]) for c in range(m)])
    sk = np.abs(stats.skew(Z, axis=0, bias=False))
    ku = np.abs(stats.kurtosis(Z, axis=0, bias=False))
    ps = np.array([stats.kstest(Z[:, c], "norm").pvalue for c in sel])
    assert out["q_noise_med_abs_skew"] == pytest.approx(np.median(sk), rel=1e-9)
    assert out["q_noise_med_abs_kurt"] == pytest.approx(np.median(ku), rel=1e-9)
    assert out["q_noise_med_ks_p"] == pytest.approx(np.median(ps), rel=1e-9)
    assert out["q_noise_frac_ks_p_lt_alpha"] == np.mean(ps < 0.01)


def test_noise_stats_degenerate_cases():
    rng = np.random.default_rng(8)
    want = {"q_noise_med_abs_skew": 0.0, "q_noise_med_abs_kurt": 0.0, "q_noise_med_ks_p": 1.0,
            "q_noise_frac_ks_p_lt_alpha": 0.0}
    assert noise_normality_stats(np.zeros((100, 0)), 64, 0.01, 0) == want
    assert noise_normality_stats(rng.standard_normal((2, 5)), 64, 0.01, 0) == want
    # all columns zero-spread: skew 0, kurtosis 0, p 1
    assert noise_normality_stats(np.tile([1.0, -2.0, 3.0], (50, 1)), 64, 0.01, 0) == want
    # no KS columns requested
    out = noise_normality_stats(rng.standard_normal((50, 3)), 0, 0.01, 0)
    assert np.isnan(out["q_noise_med_ks_p"]) and np.isnan(out["q_noise_frac_ks_p_lt_alpha"])


def test_zero_spread_column_counts_as_normal_in_medians():
    rng = np.random.default_rng(9)
    X = np.column_stack([rng.exponential(size=400), np.full(400, 2.0), np.full(400, 2.0)])
    out = noise_normality_stats(X, 64, 0.01, 0)
    assert out["q_noise_med_abs_skew"] == 0.0 and out["q_noise_med_abs_kurt"] == 0.0
    assert out["q_noise_med_ks_p"] == 1.0
    assert out["q_noise_frac_ks_p_lt_alpha"] == pytest.approx(1 / 3)


def test_smirnov_sf_matches_scipy_special():
    from scipy.special import smirnov

    from plasticity.normality import smirnov_sf

    for n in (141, 1013, 20000, 100001):
        for nx2 in (2.2, 2.65, 9.0, 60.0, 300.0):
            x = np.sqrt(nx2 / n) * 1.0003
            if x >= 0.5:
                continue
            assert smirnov_sf(n, x) == pytest.approx(smirnov(n, x), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 1e-8])
def test_median_and_fraction_equal_full_computation(alpha):
    from plasticity.normality import ks_median_and_fraction

    rng = np.random.default_rng(11)
    for n, k in ((300, 9), (5000, 16), (5000, 15), (141, 64), (20000, 12)):
        # statistics spread around the alpha boundary
        D = np.abs(rng.normal(1.6, 0.8, k)) / np.sqrt(n)
        p = np.clip(stats.kstwo.sf(D, n), 0, 1)
        med, frac = ks_median_and_fraction(D, n, alpha)
        assert med == pytest.approx(np.median(p), rel=1e-12)
        assert frac == np.mean(p < alpha)
    assert np.isnan(ks_median_and_fraction(np.zeros(0), 10, alpha)[0])
