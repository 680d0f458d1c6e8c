"""The debiased pair AP: its closed form, its expectation, its slopes, its bounds, and the calibration
near AP = 1 that it exists for (heads in the shape of real captures, with known truth)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtr, owens_t

from plasticity.jackknife import calibrated_intervals
from plasticity.pair_ap import (
    ap_from_moments,
    debiased_ap,
    debiased_ap_with_slopes,
    fitted_mean_variance,
    mean_noise_variance,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibrate_regimes  # noqa: E402

sys.path.pop(0)


def test_closed_form_is_owens_t_and_plain_ap_without_noise():
    rng = np.random.default_rng(0)
    m = np.r_[rng.standard_normal(4000) * 3, 0.0, 1e-9, 40.0]
    v = np.r_[rng.exponential(size=4000) + 0.05, 1.0, 1.0, 1.0]
    for s2 in (1e-4, 1e-3, 1e-2, 0.1):
        w = s2 * v
        want = 8 * owens_t(m / np.sqrt(v - w), 1 / np.sqrt(1 - 2 * s2))
        np.testing.assert_allclose(debiased_ap(m, v, w), want, rtol=0, atol=2e-14)
    np.testing.assert_allclose(debiased_ap(m, v, 0 * v), ap_from_moments(m, v), rtol=0, atol=1e-15)
    np.testing.assert_allclose(debiased_ap(m, v, v / 4), 8 * owens_t(m / np.sqrt(0.75 * v), np.sqrt(2.0)), atol=1e-8)


@pytest.mark.parametrize("z", [0.0, 0.02, 0.1, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("s2", [1 / 3000, 1 / 200, 1 / 20])
def test_expectation_over_the_sampled_mean_is_the_true_ap(z, s2):
    """E[AP_w(m_hat)] for m_hat ~ N(m, w) by 80-point Gauss-Hermite quadrature equals 4 Phi(z)(1 - Phi(z))
    to rounding, while the plain formula reads low by about (2/pi) s2 near z = 0."""
    x, wts = np.polynomial.hermite_e.hermegauss(80)
    wts = wts / wts.sum()
    v = 2.3
    m = z * np.sqrt(v)
    m_hat = m + np.sqrt(s2 * v) * x
    truth = 4 * ndtr(z) * (1 - ndtr(z))
    assert wts @ debiased_ap(m_hat, v, s2 * v) == pytest.approx(truth, abs=1e-12)
    plain_bias = wts @ ap_from_moments(m_hat, v) - truth
    if z == 0.0:
        assert plain_bias == pytest.approx(-(2 / np.pi) * s2, rel=0.05)


def test_slopes_are_the_partial_derivatives_and_bits_match():
    rng = np.random.default_rng(1)
    m = rng.standard_normal(500) * 2
    v = rng.exponential(size=500) + 0.1
    w = v * rng.uniform(0, 0.2, 500)
    w[:20] = v[:20] * 0.4  # clipped to v / 4: w moves with v
    ap, dm, dv, dw = debiased_ap_with_slopes(m, v, w)
    np.testing.assert_array_equal(ap, debiased_ap(m, v, w))
    h = 1e-6
    for got, (up, down) in ((dm, ((m + h, v, w), (m - h, v, w))), (dv, ((m, v + h, w + h * (w > v / 4) * 0.25),
                                                                      (m, v - h, w - h * (w > v / 4) * 0.25))),
                            (dw, ((m, v, w + h), (m, v, w - h)))):
        fd = (debiased_ap(*up) - debiased_ap(*down)) / (2 * h)
        np.testing.assert_allclose(got[20:], fd[20:], rtol=1e-5, atol=1e-8)
    assert np.all(dw[:20] == 0.0)
    fd_clipped = (debiased_ap(m, v + h, 0.4 * (v + h)) - debiased_ap(m, v - h, 0.4 * (v - h))) / (2 * h)
    np.testing.assert_allclose(dv[:20], fd_clipped[:20], rtol=1e-5, atol=1e-8)
    _, _, dv0, dw0 = debiased_ap_with_slopes(np.ones(3), np.array([0.0, -1.0, 1e-30]) * 0, np.zeros(3))
    assert np.all(dv0 == 0) and np.all(dw0 == 0)  # floored variances have no slope


def test_exact_cases_and_bounds():
    # deterministic queries: v = 0 (floored), m far from 0 -> exactly 0; D = 0 -> m = 0, v floored -> 1
    assert debiased_ap(3.0, 0.0, 0.0) == 0.0
    assert debiased_ap(0.0, 0.0, 0.0) == 1.0
    # a single value may pass 1 near m = 0 (by at most (2/pi) asin(rho)), never go below 0
    rng = np.random.default_rng(2)
    m, v = rng.standard_normal(10000), rng.exponential(size=10000) + 1e-3
    ap = debiased_ap(m, v, v / 50)
    assert ap.min() >= 0.0 and ap.max() <= 1 + (2 / np.pi) * np.arcsin(1 / 49) + 1e-12


def test_noise_of_the_mean_by_hand():
    p = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    # a line fitted to p at tau: 1/N + (tau - mean p)^2 / Sxx; constant positions: 1/N
    assert fitted_mean_variance(np.array([3.2]), 2.0, p)[0] == pytest.approx(2.0 * (1 / 5 + (3.2 - 3.2) ** 2 / 62.8))
    assert fitted_mean_variance(np.array([10.0]), 1.0, p)[0] == pytest.approx(1 / 5 + 6.8**2 / 62.8)
    assert fitted_mean_variance(np.array([4.0]), 3.0, np.full(4, 7.0))[0] == pytest.approx(3.0 / 4)
    # w = semantic part / n_j + component 0 through the fitted line
    v, D0 = np.array([5.0, 1.0]), np.array([1.0, 2.0])
    np.testing.assert_allclose(mean_noise_variance(v, D0, 0.5, 10, 0.01),
                               [(5.0 - 0.5) / 10 + 0.5 * 0.01, 0.0 / 10 + 4 * 0.5 * 0.01])


def test_calibrated_interval_flag():
    n = np.array([5000, 5000, 60])
    head, buckets = calibrated_intervals(n, n, 20, 1e-3, np.array([1e-3, np.nan, 1e-3]))
    assert head and list(buckets) == [True, False, False]  # 60 of 10060 queries: under 10% of the weight
    assert not calibrated_intervals(n, np.array([1, 1, 1]), 20, 1e-3, np.ones(3))[0]  # a third of the cells
    assert not calibrated_intervals(n, n, 6, 1e-3, np.ones(3))[0]  # 7 example groups
    assert not calibrated_intervals(n, n, 20, float("nan"), np.ones(3))[0]


#: Heads near AP = 1 in a real shape (d = 64, 7 query buckets of ~1500 queries, 24 examples), where
#: the plain formula read low by 3-8 standard errors.
NEAR_ONE = ("d64 8x1536 near AP = 1", dict(head_dim=64, seq_len=512, bucket_size=64, num_examples=24,
                                            capture_fraction=1.0, mixing_scale=0.3))


def test_intervals_hold_near_ap_one(monkeypatch):
    monkeypatch.setattr(calibrate_regimes, "AP_TARGETS", (0.99, 0.995, 0.997, 0.998, 0.999, 0.9993, 0.9995, 0.9998))
    out = calibrate_regimes.check_regime(*NEAR_ONE, layers=2, seed=3)
    for est in calibrate_regimes.ESTIMATORS:
        mine = [o for o in out if o.estimator == est]
        assert len(mine) == 16 and min(o.truth for o in mine) > 0.98 and all(o.calibrated for o in mine)
        heads = calibrate_regimes.head_line(mine)
        assert abs(heads.mean_z) < 0.75 and heads.rms_z < 1.6 and heads.coverage >= 0.8, (est, heads)
        buckets = calibrate_regimes.bucket_line(mine)
        assert abs(buckets.mean_z) < 0.3 and 0.8 <= buckets.rms_z <= 1.25 and buckets.coverage >= 0.9, (est, buckets)
