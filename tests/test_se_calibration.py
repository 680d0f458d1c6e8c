"""Calibration of the example-jackknife standard errors on synthetic heads with known truth (
(ap_overall - truth) / se has unit spread), and the exactness of that truth."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from plasticity.pair_ap import ap_from_moments
from plasticity.rotation import householder_matrix
from plasticity.synthetic import (
    SyntheticSpec,
    bucket_scale,
    head_truth,
    key_vocabulary,
    make_key_shard,
    population_plasticity,
    token_ids,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibrate_se  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def checks():
    # 3 designs (isotropic, mildly and strongly anisotropic) x 5 layers x 8 heads = 120 heads per estimator
    return calibrate_se.check_heads(layers=5, seed=0)


@pytest.mark.parametrize("estimator", calibrate_se.ESTIMATORS)
def test_standard_errors_are_calibrated(checks, estimator):
    mine = [c for c in checks if c.estimator == estimator]
    cal = calibrate_se.calibration(mine)
    assert cal.n_heads >= 100
    assert cal.truth_min < 0.1 and cal.truth_max > 0.95  # a range of true AP
    assert 0.8 <= cal.rms_z <= 1.25, cal
    assert 0.90 <= cal.coverage <= 0.98, cal
    assert cal.rms_z_pairs > 1.5 * cal.rms_z  # the pair-only SE is far too small
    n, rms, cover = calibrate_se.bucket_calibration(mine)
    assert n > 500 and 0.8 <= rms <= 1.25 and 0.90 <= cover <= 0.98, (n, rms, cover)


def test_population_truth_is_the_spec_formula_over_all_token_pairs():
    """population_plasticity against a plain loop over token pairs with the true parameters."""
    spec = SyntheticSpec(num_layers=1, num_q_heads=2, num_k_heads=1, head_dim=6, num_examples=4, seq_len=64,
                         bucket_size=16, vocab_size=9, token_keys=True, noise_scales=(0.3, 0.3), noise_condition=4.0,
                         position_noise=0.1)
    k = make_key_shard(spec, 0, 0)
    np.testing.assert_array_equal(k.vectors, key_vocabulary(spec, 0, 0)[token_ids(spec, k.example_id, k.position.astype(int))])
    s = np.where(np.arange(6) % 2 == 0, 1.0, -1.0)
    t = head_truth(spec, 0, 1)
    vocab = key_vocabulary(spec, 0, 0)
    buckets, tau, weight = np.array([1, 2, 3]), np.array([23.5, 39.5, 55.5]), np.array([3.0, 1.0, 2.0])
    for est in ("bucket_full_cov", "linear_diag"):
        ap, ap_j = population_plasticity(spec, 0, 1, s, est, buckets, tau, weight)
        want = []
        for j, tj in zip(buckets, tau):
            mean_y = np.r_[t.a + t.b * tj / spec.seq_len, t.mu]
            if est == "bucket_full_cov":
                mean = t.basis @ mean_y  # raw basis
                cov_y = np.zeros((6, 6))
                cov_y[0, 0] = t.sigma0**2
                cov_y[1:, 1:] = t.sigma**2 * bucket_scale(np.array([j]))[0] ** 2 * t.mixing @ t.mixing.T
                cov = t.basis @ cov_y @ t.basis.T
            else:  # rotated basis of the true positional axis; pooled residual covariance's diagonal
                H = householder_matrix(s * t.basis[:, 0])
                to_rot = H @ np.diag(s)
                mean = to_rot.T @ (to_rot @ t.basis @ mean_y)
                resid = np.zeros((6, 6))
                resid[0, 0] = t.sigma0**2
                resid[1:, 1:] = t.sigma**2 * np.mean(bucket_scale(np.arange(64) // 16) ** 2) * t.mixing @ t.mixing.T
                rot_cov = to_rot @ t.basis @ resid @ t.basis.T @ to_rot.T
                cov = to_rot.T @ np.diag(np.diag(rot_cov)) @ to_rot
            vals = [ap_from_moments((vocab[a] - vocab[b]) @ mean, (vocab[a] - vocab[b]) @ cov @ (vocab[a] - vocab[b]))
                    for a in range(9) for b in range(9)]
            want.append(np.mean(vals))
        np.testing.assert_allclose(ap_j, want, rtol=1e-12)
        assert ap == pytest.approx(np.sum(weight * np.array(want)) / weight.sum(), rel=1e-12)
    with pytest.raises(ValueError, match="token_keys"):
        population_plasticity(SyntheticSpec(), 0, 0, s, "bucket_full_cov", buckets, tau, weight)
