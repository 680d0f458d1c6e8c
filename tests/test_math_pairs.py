"""Key-pair sampling and sliding-window eligibility."""

import numpy as np
import pytest
from scipy import stats

from plasticity.pairs import (
    KeyPairIndex,
    decode_pair_index,
    eligibility_mask,
    eligible_key_buckets,
    sample_key_pairs,
)


def test_decode_pair_index_is_the_triangular_bijection():
    m = 300
    t = np.arange(m * (m - 1) // 2)
    a, b = decode_pair_index(t)
    assert np.all((0 <= a) & (a < b) & (b < m))
    np.testing.assert_array_equal(b * (b - 1) // 2 + a, t)
    # large indices (float sqrt needs the integer correction)
    t = np.array([10**12, 10**12 + 1, 2**52 - 3, 49999 * 50000 // 2 - 1])
    a, b = decode_pair_index(t)
    np.testing.assert_array_equal(b * (b - 1) // 2 + a, t)
    assert np.all((0 <= a) & (a < b))


def test_pairs_are_distinct_same_example_and_total_is_right():
    ex = np.repeat([3, 5, 8, 9], [4, 1, 3, 2])  # pairs: 6 + 0 + 3 + 1 = 10
    i1, i2, total = sample_key_pairs(ex, 1000, np.random.default_rng(0))
    assert total == 10
    assert i1.shape == (10,) and i2.shape == (10,)  # n_pairs = min(1000, 10)
    assert np.all(i1 < i2)
    np.testing.assert_array_equal(ex[i1], ex[i2])
    i1, i2, total = sample_key_pairs(ex, 7, np.random.default_rng(0))
    assert total == 10 and i1.shape == (7,)


def test_no_pairs_no_draw():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    i1, i2, total = sample_key_pairs(np.array([1, 2, 3]), 256, rng)
    assert total == 0 and i1.shape == (0,) and i2.shape == (0,)
    assert rng.bit_generator.state == state  # the stream is untouched
    assert sample_key_pairs(np.zeros(0, int), 5, rng)[2] == 0


def test_sampler_is_uniform_over_all_pairs():
    ex = np.repeat([0, 1, 2], [6, 3, 2])  # 15 + 3 + 1 = 19 pairs
    i1, i2, total = sample_key_pairs(ex, 10**6, np.random.default_rng(42))
    assert total == 19 and i1.shape == (19,)  # capped at total...
    # ...so draw the large sample through the index, which shares the decoder
    idx = KeyPairIndex.build(np.zeros(11, int), ex, np.arange(11.0))
    a, b, sizes = idx.draw(np.array([0]), 19, np.random.default_rng(42))
    np.testing.assert_array_equal(a, i1)
    np.testing.assert_array_equal(b, i2)
    rng = np.random.default_rng(7)
    counts = np.zeros((11, 11))
    for _ in range(3000):
        a, b, _ = idx.draw(np.array([0]), 19, rng)
        np.add.at(counts, (a, b), 1)
    obs = counts[counts > 0]
    assert obs.shape == (19,)  # every same-example pair and nothing else
    assert set(zip(*np.nonzero(counts))) == {(i, j) for i in range(11) for j in range(i + 1, 11) if ex[i] == ex[j]}
    chi2 = stats.chisquare(obs)
    assert chi2.pvalue > 1e-3


def test_index_draw_equals_per_bucket_sampler_in_stream_order():
    rng0 = np.random.default_rng(5)
    bucket = np.sort(rng0.integers(0, 5, 400))
    ex = np.concatenate([np.sort(rng0.integers(0, 7, np.sum(bucket == b))) for b in range(5)])
    pos = np.arange(400.0)
    idx = KeyPairIndex.build(bucket, ex, pos)
    np.testing.assert_array_equal(idx.buckets, np.unique(bucket))
    cells = np.array([0, 2, 3, 4])
    a, b, sizes = idx.draw(cells, 50, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    off = 0
    for c, sz in zip(cells, sizes):
        rows = np.flatnonzero(bucket == idx.buckets[c])
        r1, r2, total = sample_key_pairs(ex[rows], 50, rng)
        assert total == idx.total_pairs[c] and sz == r1.shape[0]
        np.testing.assert_array_equal(a[off : off + sz], rows[r1])
        np.testing.assert_array_equal(b[off : off + sz], rows[r2])
        off += sz
    assert off == a.shape[0]
    np.testing.assert_array_equal(idx.maxpos, [pos[bucket == u].max() for u in idx.buckets])


def test_index_rejects_unsorted_keys():
    with pytest.raises(ValueError):
        KeyPairIndex.build(np.array([1, 0]), np.array([0, 0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError):
        KeyPairIndex.build(np.array([0, 0]), np.array([2, 1]), np.array([0.0, 1.0]))


def test_eligibility_without_window_is_every_lower_bucket():
    m = eligibility_mask(np.array([1, 3, 6]), np.array([8.0, 24, 48]), np.array([0, 1, 2, 5]), np.array([7.0, 15, 23, 47]))
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


def test_sliding_window_uniform_buckets():
    # buckets of 100 positions; the first query of bucket 5 is at position 510
    kb = np.array([0, 1, 2, 3, 4])
    kmax = np.array([99.0, 199, 299, 399, 499])
    got = eligible_key_buckets(5, 510.0, kb, kmax, sliding_window=110)
    np.testing.assert_array_equal(got, [4])  # 399 < 510 - 110 = 400
    got = eligible_key_buckets(5, 510.0, kb, kmax, sliding_window=111)
    np.testing.assert_array_equal(got, [3, 4])  # boundary: 399 >= 399
    got = eligible_key_buckets(5, 510.0, kb, kmax, sliding_window=311)
    np.testing.assert_array_equal(got, [1, 2, 3, 4])  # 199 >= 199


def test_previous_bucket_with_keys_always_eligible():
    # tiny window; key bucket 4 has no keys, so bucket 3 is "the immediately preceding bucket that holds keys"
    kb = np.array([0, 1, 3])
    kmax = np.array([9.0, 19, 39])
    np.testing.assert_array_equal(eligible_key_buckets(5, 50.0, kb, kmax, sliding_window=1), [3])
    np.testing.assert_array_equal(eligible_key_buckets(5, 50.0, kb, kmax, sliding_window=0), [3])
    # without a window all lower buckets
    np.testing.assert_array_equal(eligible_key_buckets(5, 50.0, kb, kmax), [0, 1, 3])
    # nothing below
    assert eligible_key_buckets(0, 0.0, kb, kmax, sliding_window=10).shape == (0,)


def test_sliding_window_log_buckets():
    # log buckets: b = floor(log2(pos + 1)); observed key ranges
    kpos = np.arange(0, 1023)
    kb_all = np.floor(np.log2(kpos + 1)).astype(int)
    kb = np.unique(kb_all)
    kmax = np.array([kpos[kb_all == b].max() for b in kb], dtype=float)
    # query bucket 9 holds positions 511..1022; window 200 -> keys >= 311 reachable: buckets 8 (255..510)
    np.testing.assert_array_equal(eligible_key_buckets(9, 511.0, kb, kmax, sliding_window=200), [8])
    # window 300: 211 -> bucket 7 (127..254) reaches 254 >= 211
    np.testing.assert_array_equal(eligible_key_buckets(9, 511.0, kb, kmax, sliding_window=300), [7, 8])
    # window 1000: everything below
    np.testing.assert_array_equal(eligible_key_buckets(9, 511.0, kb, kmax, sliding_window=1000), np.arange(9))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_key_differences_are_the_widened_vectors_subtracted(dtype):
    """D = float64(K[i1]) - float64(K[i2]), bit for bit, rows mapped through a permutation or not:
    subtracting in float32 first would round twice (values of different binades make it visible)."""
    from plasticity.kernels.pairs import key_differences

    rng = np.random.default_rng(7)
    K = (rng.standard_normal((300, 13)) * np.exp(rng.uniform(-8, 8, (300, 13)))).astype(dtype)
    i1, i2 = rng.integers(0, 300, 500), rng.integers(0, 300, 500)
    wide = K.astype(np.float64)
    np.testing.assert_array_equal(key_differences(K, i1, i2, np.zeros(0, np.int64)), wide[i1] - wide[i2])
    rows = rng.permutation(300).astype(np.int64)
    np.testing.assert_array_equal(key_differences(K, i1, i2, rows), wide[rows[i1]] - wide[rows[i2]])
    assert key_differences(K, i1[:0], i2[:0], rows).shape == (0, 13)
