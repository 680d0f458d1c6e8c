"""Position regression and scalar position predictability."""

import numpy as np
import pytest
from scipy import stats

from plasticity.head import oriented_rows
from plasticity.regression import (
    PositionDesign,
    fit_position_regression,
    fit_rows,
    scalar_position_predictability,
)


def test_exact_linear_data_gives_known_beta_and_r2_one():
    rng = np.random.default_rng(0)
    p = rng.permutation(5000).astype(float)
    alpha = rng.standard_normal(6)
    beta = rng.standard_normal(6) * 1e-2
    X = alpha + np.outer(p, beta)
    fit = fit_position_regression(p, X)
    np.testing.assert_allclose(fit.beta, beta, rtol=1e-10)
    np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-10)
    assert fit.r2_overall == pytest.approx(1.0, abs=1e-10)
    assert fit.beta_norm == pytest.approx(np.linalg.norm(beta), rel=1e-10)
    np.testing.assert_allclose(fit.residuals(p, X), 0.0, atol=1e-9)


def test_matches_scipy_linregress_per_column():
    rng = np.random.default_rng(1)
    n, d = 3000, 7
    p = rng.integers(0, 4000, n).astype(float)
    X = 3.0 + np.outer(p, rng.standard_normal(d) * 1e-3) + rng.standard_normal((n, d)) * rng.uniform(0.1, 3, d)
    fit = fit_position_regression(p, X)
    for c in range(d):
        ref = stats.linregress(p, X[:, c])
        assert fit.beta[c] == pytest.approx(ref.slope, rel=1e-10)
        assert fit.alpha[c] == pytest.approx(ref.intercept, rel=1e-10)
        assert fit.r2[c] == pytest.approx(ref.rvalue**2, rel=1e-9, abs=1e-13)
    assert fit.r2_overall == pytest.approx(np.mean(fit.r2), rel=1e-14)
    R = fit.residuals(p, X)
    np.testing.assert_allclose(fit.ss_res, (R**2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(fit.resid_var, R.var(axis=0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(fit.ss_tot, ((X - X.mean(0)) ** 2).sum(0), rtol=1e-12)


def test_r2_uses_floored_total_sum_of_squares():
    # the position regression: R2 = 1 - SS_res / max(SS_tot, 1e-12); a constant column has SS_res = SS_tot = 0
    rng = np.random.default_rng(2)
    p = np.arange(100.0)
    X = np.column_stack([rng.standard_normal(100), np.full(100, 0.25)])
    fit = fit_position_regression(p, X)
    assert fit.r2[1] == 1.0
    ref = stats.linregress(p, X[:, 0])
    assert fit.r2[0] == pytest.approx(ref.rvalue**2, rel=1e-9)


def test_constant_positions_give_zero_beta_mean_alpha_zero_r2():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 4)) + 7.0
    p = np.full(50, 0.1)
    fit = fit_position_regression(p, X)
    assert np.all(fit.beta == 0.0)
    np.testing.assert_allclose(fit.alpha, X.mean(0), rtol=1e-14)
    assert np.all(fit.r2 == 0.0)
    assert fit.r2_overall == 0.0
    assert fit.beta_norm == 0.0
    np.testing.assert_allclose(fit.resid_var, X.var(0, ddof=1), rtol=1e-12)
    assert not fit.positions_vary


def test_single_row_resid_var_is_one():
    fit = fit_position_regression(np.array([3.0]), np.array([[1.0, 2.0]]))
    np.testing.assert_array_equal(fit.resid_var, [1.0, 1.0])
    np.testing.assert_array_equal(fit.alpha, [1.0, 2.0])


def test_nearly_deterministic_column_keeps_precision():
    # R2 > 0.99 triggers the explicit residual pass: tiny residual variance is exact
    rng = np.random.default_rng(4)
    p = np.arange(20000, dtype=float)
    noise = rng.standard_normal(20000) * 1e-6
    X = (5.0 + 0.01 * p + noise)[:, None]
    fit = fit_position_regression(p, X)
    ref = stats.linregress(p, X[:, 0])
    resid = X[:, 0] - ref.intercept - ref.slope * p
    assert fit.resid_var[0] == pytest.approx(resid.var(ddof=1), rel=1e-6)


def test_oriented_rows_equal_the_reordered_signed_rows_and_fit_like_scipy():
    rng = np.random.default_rng(5)
    V = (rng.standard_normal((3000, 9)) + np.arange(9)).astype(np.float32)
    order = rng.permutation(3000)
    s = np.where(rng.random(9) < 0.5, -1.0, 1.0)
    p = rng.random(3000) * 100
    X = oriented_rows(V, order, s)
    assert X.dtype == np.float64 and X.flags.c_contiguous
    np.testing.assert_array_equal(X, V.astype(np.float64)[order] * s)  # widening is exact
    np.testing.assert_array_equal(oriented_rows(V, np.arange(3000), s), V.astype(np.float64) * s)
    a = fit_rows(PositionDesign.build(p), X)
    for c in (0, 4, 8):
        ref = stats.linregress(p, X[:, c])
        assert a.beta[c] == pytest.approx(ref.slope, rel=1e-10)
        assert a.alpha[c] == pytest.approx(ref.intercept, rel=1e-10)
        assert a.r2[c] == pytest.approx(ref.rvalue**2, rel=1e-8, abs=1e-12)


def test_scalar_predictability_matches_linregress():
    rng = np.random.default_rng(6)
    n, d = 4000, 5
    p = rng.integers(0, 10000, n).astype(float)
    beta = rng.standard_normal(d)
    X = np.outer(np.log2(p + 1), beta / np.linalg.norm(beta)) * 0.7 + rng.standard_normal((n, d))
    out = scalar_position_predictability(p, X, beta)
    s = X @ (beta / np.linalg.norm(beta))
    y = np.log2(p + 1)
    ref = stats.linregress(s, y)
    assert out["q_R2_scalar"] == pytest.approx(ref.rvalue**2, rel=1e-10)
    yhat = ref.intercept + ref.slope * s
    assert out["q_mae_proj"] == pytest.approx(np.mean(np.abs(y - yhat)), rel=1e-10)
    assert out["q_mae_baseline"] == pytest.approx(np.mean(np.abs(y - y.mean())), rel=1e-12)
    assert out["q_mae_ratio"] == pytest.approx(out["q_mae_proj"] / out["q_mae_baseline"], rel=1e-14)
    assert 0.0 < out["q_mae_ratio"] < 1.0


def test_scalar_predictability_zero_beta():
    rng = np.random.default_rng(7)
    p = np.arange(200.0)
    X = rng.standard_normal((200, 3))
    out = scalar_position_predictability(p, X, np.zeros(3))
    y = np.log2(p + 1)
    base = np.mean(np.abs(y - y.mean()))
    assert out == {"q_R2_scalar": 0.0, "q_mae_baseline": pytest.approx(base), "q_mae_proj": pytest.approx(base), "q_mae_ratio": 1.0}
    assert out["q_mae_proj"] == out["q_mae_baseline"]


def test_scalar_predictability_constant_positions_ratio_one():
    rng = np.random.default_rng(8)
    out = scalar_position_predictability(np.full(30, 5.0), rng.standard_normal((30, 2)), np.array([1.0, 0.5]))
    assert out["q_mae_baseline"] == 0.0
    assert out["q_mae_ratio"] == 1.0
    assert out["q_R2_scalar"] == 0.0


def test_fit_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fit_position_regression(np.arange(3.0), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        fit_position_regression(np.zeros(0), np.zeros((0, 2)))
