"""Orientation, Householder rotation, component weights."""

import numpy as np
import pytest

from plasticity.orientation import (
    bucket_sums,
    merge_bucket_sums,
    orientation_from_bucket_sums,
    orientation_from_keys,
)
from plasticity.rotation import householder_apply, householder_matrix, householder_vector
from plasticity.weights import component_weights

# ---------------------------------------------------------------- orientation


def test_bucket_sums_match_manual_groupby():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 6, 500)
    X = rng.standard_normal((500, 3))
    u, sums, counts = bucket_sums(b, X)
    assert u.dtype == np.int64 and counts.dtype == np.int64 and sums.dtype == np.float64
    np.testing.assert_array_equal(u, np.unique(b))
    for i, bb in enumerate(u):
        np.testing.assert_allclose(sums[i], X[b == bb].sum(0), rtol=1e-12)
        assert counts[i] == np.sum(b == bb)


@pytest.mark.parametrize("n_buckets", [3, 400])  # the per-bucket loop and the single reduceat
@pytest.mark.parametrize("sorted_rows", [True, False])
def test_bucket_sums_add_rows_in_order_in_float64(n_buckets, sorted_rows):
    # every bucket's sum is the float64 running sum of its rows in their order (cumsum is
    # sequential), bit for bit, whether the rows are float32 or already float64
    rng = np.random.default_rng(7)
    b = rng.integers(0, n_buckets, 4000)
    if sorted_rows:
        b = np.sort(b)
    X32 = (rng.standard_normal((4000, 5)) * 10.0 ** rng.integers(-3, 4, (4000, 1))).astype(np.float32)
    for X in (X32, X32.astype(np.float64)):
        u, sums, counts = bucket_sums(b, X)
        np.testing.assert_array_equal(u, np.unique(b))
        ref = np.stack([np.cumsum(X32[b == bb].astype(np.float64), axis=0)[-1] for bb in u])
        np.testing.assert_array_equal(sums, ref)
        np.testing.assert_array_equal(counts, [np.sum(b == bb) for bb in u])


def test_merge_of_batches_equals_whole():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 9, 1000)
    X = rng.standard_normal((1000, 4))
    whole = bucket_sums(b, X)
    parts = [bucket_sums(b[i : i + 137], X[i : i + 137]) for i in range(0, 1000, 137)]
    merged = merge_bucket_sums(parts)
    np.testing.assert_array_equal(merged[0], whole[0])
    np.testing.assert_allclose(merged[1], whole[1], rtol=1e-12)
    np.testing.assert_array_equal(merged[2], whole[2])


def test_orientation_is_sign_of_equal_weight_bucket_mean_average():
    # bucket 0: 1 row with mean +10 in dim 0; bucket 1: 99 rows with mean -1 -> equal weight: +4.5
    X = np.vstack([[[10.0, -3.0, 0.0]], np.tile([-1.0, 1.0, 0.0], (99, 1))])
    b = np.r_[0, np.ones(99, int)]
    u, sums, counts = bucket_sums(b, X)
    s = orientation_from_bucket_sums(sums, counts)
    np.testing.assert_array_equal(s, [1.0, -1.0, 1.0])  # row-weighted mean of dim 0 would be negative
    np.testing.assert_array_equal(orientation_from_keys(b, X), s)


def test_orientation_zero_maps_to_plus_one_and_empty_buckets_ignored():
    sums = np.array([[0.0, -2.0], [5.0, 5.0]])
    counts = np.array([4, 0])
    np.testing.assert_array_equal(orientation_from_bucket_sums(sums, counts), [1.0, -1.0])
    np.testing.assert_array_equal(orientation_from_bucket_sums(np.zeros((0, 2)), np.zeros(0, int)), [1.0, 1.0])


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_householder_apply_equals_explicit_matrix(d):
    rng = np.random.default_rng(d)
    beta = rng.standard_normal(d)
    X = rng.standard_normal((40, d))
    H = householder_matrix(beta)
    u = beta / np.linalg.norm(beta)
    np.testing.assert_allclose(H @ np.eye(d)[0], u, atol=1e-14)
    np.testing.assert_allclose(H @ H, np.eye(d), atol=1e-14)
    np.testing.assert_allclose(H, H.T, atol=0)
    Y = householder_apply(X, beta)
    np.testing.assert_allclose(Y, X @ H, atol=1e-13)
    np.testing.assert_allclose(Y[:, 0], X @ u, atol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), np.linalg.norm(X, axis=1), rtol=1e-13)


def test_householder_identity_cases():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((10, 4))
    for beta in (np.zeros(4), np.full(4, 1e-13), np.array([3.0, 0.0, 0.0, 0.0])):
        assert householder_vector(beta) is None
        Y = householder_apply(X, beta)
        np.testing.assert_array_equal(Y, X)
        assert not np.shares_memory(Y, X)
        np.testing.assert_array_equal(householder_matrix(beta), np.eye(4))


def test_householder_minus_e1_and_nearly_e1():
    X = np.random.default_rng(10).standard_normal((6, 3))
    Y = householder_apply(X, np.array([-2.0, 0.0, 0.0]))
    np.testing.assert_allclose(Y[:, 0], -X[:, 0], atol=1e-15)
    np.testing.assert_allclose(Y[:, 1:], X[:, 1:], atol=1e-15)
    beta = np.array([1.0, 1e-9, -2e-9])
    H = householder_matrix(beta)
    np.testing.assert_allclose(H[:, 0], beta / np.linalg.norm(beta), atol=1e-16)
    np.testing.assert_allclose(H @ H, np.eye(3), atol=1e-15)


def test_householder_in_place_and_single_row():
    rng = np.random.default_rng(11)
    beta = rng.standard_normal(8)
    X = rng.standard_normal((5000, 8))
    ref = X @ householder_matrix(beta)
    Z = X.copy()
    out = householder_apply(Z, beta, out=Z)
    assert out is Z
    np.testing.assert_allclose(Z, ref, atol=1e-13)
    np.testing.assert_allclose(householder_apply(X[3], beta), ref[3], atol=1e-13)


# ---------------------------------------------------------------- weights


def test_weights_proportional_to_positive_r2_and_sum_to_one():
    w = component_weights(np.array([0.5, -0.2, 0.25, np.nan, 0.25]))
    np.testing.assert_allclose(w, [0.5, 0.0, 0.25, 0.0, 0.25], rtol=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-15)


def test_weights_uniform_when_no_positive_r2():
    np.testing.assert_array_equal(component_weights(np.array([-0.1, 0.0, -3.0, 0.0])), np.full(4, 0.25))
    np.testing.assert_array_equal(component_weights(np.zeros(3)), np.full(3, 1 / 3))
