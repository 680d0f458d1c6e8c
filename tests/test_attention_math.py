"""Closed-form and brute-force checks of plasticity.attention (docs/method.md#attention-patterns)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plasticity import attention as att
from plasticity.attention import inputs, kernel, scan, summary
from plasticity.attention import (
    DEFAULT_SCALES,
    SUMMARY_COLUMNS,
    SWEEP_COLUMNS,
    TOKEN_COLUMNS,
    attention_class,
    attention_weights,
    gain_fit,
    gain_ratio,
    head_attention_metrics,
    query_variation,
    token_attention_metrics,
)
from plasticity.types import TokenArrays


def ta(vectors, positions, examples=None, window=None, tokens=None, bucket=None):
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim == 1:
        vectors = vectors[:, None]
    n = vectors.shape[0]
    positions = np.asarray(positions, dtype=np.float64)
    examples = np.zeros(n, np.int64) if examples is None else np.asarray(examples, np.int64)
    bucket = np.zeros(n, np.int64) if bucket is None else np.asarray(bucket, np.int64)
    tok = None if tokens is None else np.asarray(tokens, dtype=object)
    return TokenArrays(bucket=bucket, example_id=examples, position=positions, vectors=vectors,
                       sliding_window=window, token_str=tok)


def dense_head(rng, n_ex=3, n_pos=40, d=8, q_scale=1.5, window=None):
    ex = np.repeat(np.arange(n_ex), n_pos)
    pos = np.tile(np.arange(n_pos), n_ex)
    q = ta(rng.normal(size=(ex.size, d)) * q_scale, pos, ex, window, bucket=pos // 8)
    k = ta(rng.normal(size=(ex.size, d)), pos, ex, window, bucket=pos // 8)
    return q, k


# ----------------------------------------------------------------------------- brute force


def brute_rows(q: TokenArrays, k: TokenArrays, window, scale=1.0):
    """Per query (in the given order): list of (key position, weight), by plain loops."""
    out = []
    d = q.d
    for i in range(q.n):
        keys = []
        for j in range(k.n):
            if k.example_id[j] != q.example_id[i]:
                continue
            if k.position[j] > q.position[i]:
                continue
            if window is not None and k.position[j] <= q.position[i] - window:
                continue
            s = scale * sum(q.vectors[i, t] * k.vectors[j, t] for t in range(d)) / math.sqrt(d)
            keys.append((k.position[j], s))
        if keys:
            m = max(s for _, s in keys)
            z = sum(math.exp(s - m) for _, s in keys)
            keys = [(p, math.exp(s - m) / z) for p, s in keys]
        out.append(keys)
    return out


def brute_metrics(rows, positions):
    res = {"entropy": [], "max_attn": [], "k_eff": [], "n_keys": [], "row_std": []}
    for keys, pos in zip(rows, positions):
        w = np.array([x for _, x in keys])
        res["n_keys"].append(len(w))
        if len(w) == 0:
            res["entropy"].append(np.nan)
            res["max_attn"].append(np.nan)
            res["k_eff"].append(0)
            res["row_std"].append(np.nan)
            continue
        h = -sum(x * math.log(x) for x in w if x > 0)
        res["entropy"].append(np.nan if pos < 2 else h)
        res["max_attn"].append(w.max())
        c = np.cumsum(np.sort(w)[::-1])
        res["k_eff"].append(int(np.argmax(c >= 0.9 - 1e-12)) + 1)
        res["row_std"].append(float(np.std(w)))
    return {key: np.array(v, dtype=float) for key, v in res.items()}


# ----------------------------------------------------------------------------- closed forms


def test_identical_keys_give_uniform_attention():
    rng = np.random.default_rng(0)
    n = 40
    q = ta(rng.normal(size=(n, 4)) * 3, np.arange(n))
    k = ta(np.tile(rng.normal(size=(1, 4)), (n, 1)), np.arange(n))
    table, summ, sweep = head_attention_metrics(q, k)
    nk = np.arange(n) + 1
    assert np.array_equal(table["n_keys"], nk)
    late = np.arange(n) >= 2
    np.testing.assert_allclose(table["entropy"][late], np.log(nk[late]), rtol=0, atol=1e-13)
    np.testing.assert_allclose(table["entropy_ratio"][late], 1.0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(table["max_attn"], 1.0 / nk, rtol=1e-13)
    assert np.array_equal(table["k_eff"], np.ceil(0.9 * nk - 1e-9).astype(np.int64))
    assert np.all(table["row_std"] < 1e-15)
    assert summ["attn_class"] == "uniform"
    assert summ["local_bias_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert summ["qvar_l2_adjacent"] == pytest.approx(0.0, abs=1e-14)
    assert summ["qvar_l2_distant"] == pytest.approx(0.0, abs=1e-14)
    # scores are constant per row: scaling q changes nothing, so no sharpening and no gain
    assert summ["entropy_monotonic"] is False
    assert abs(summ["gain"]) < 1e-12
    np.testing.assert_allclose(sweep["mean_entropy"], sweep["mean_entropy"][0], rtol=1e-13)


def test_one_dominant_key():
    rng = np.random.default_rng(1)
    n, d = 30, 6
    u = np.ones(d) / math.sqrt(d)
    qv = u + 0.01 * rng.normal(size=(n, d))
    kv = 0.1 * rng.normal(size=(n, d))
    kv[0] = 1e4 * u  # key at position 0 dominates every row
    table, summ, _ = head_attention_metrics(ta(qv, np.arange(n)), ta(kv, np.arange(n)))
    np.testing.assert_allclose(table["max_attn"], 1.0, rtol=0, atol=1e-12)
    assert np.all(table["k_eff"] == 1)
    late = np.arange(n) >= 2
    assert np.all(np.isfinite(table["entropy"][late]))
    assert np.all(table["entropy"][late] < 1e-9)
    assert np.all(table["entropy"][late] >= 0)
    assert summ["attn_class"] == "sharp"
    assert summ["mean_k_eff"] == 1.0


def test_extreme_scores_are_stable():
    rng = np.random.default_rng(2)
    n, d = 25, 4
    q = ta(rng.normal(size=(n, d)) * 1e5, np.arange(n))
    k = ta(rng.normal(size=(n, d)) * 1e5, np.arange(n))
    table, summ, sweep = head_attention_metrics(q, k)
    for col in ("max_attn", "row_std", "key_coverage"):
        assert np.all(np.isfinite(table[col]))
    ent = table["entropy"][2:]
    assert np.all(np.isfinite(ent)) and np.all(ent >= -1e-12)
    assert summ["max_row_sum_error"] < 1e-12
    assert np.all(np.isfinite(sweep["mean_entropy"]))


def test_scale_equals_inverse_temperature():
    rng = np.random.default_rng(3)
    n, d = 35, 5
    q = ta(rng.normal(size=(n, d)), np.arange(n))
    k = ta(rng.normal(size=(n, d)), np.arange(n))
    scores = q.vectors @ k.vectors.T / math.sqrt(d)
    for s in (0.5, 1.3, 2.0):
        got = token_attention_metrics(q, k, scale=s)
        ent, mx, ke = [], [], []
        for i in range(n):
            z = s * scores[i, : i + 1]
            p = np.exp(z - z.max())
            p /= p.sum()
            ent.append(-(p * np.log(p)).sum() if i >= 2 else np.nan)
            mx.append(p.max())
            c = np.cumsum(np.sort(p)[::-1])
            ke.append(int(np.argmax(c >= 0.9 - 1e-12)) + 1)
        np.testing.assert_allclose(got["entropy"], ent, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["max_attn"], mx, rtol=1e-12, atol=1e-14)
        assert np.array_equal(got["k_eff"], ke)
        # and the weights themselves equal softmax(s * scores)
        w = attention_weights(q.vectors, q.position, k.vectors, k.position, scale=s)
        ref = np.where(np.tri(n, dtype=bool), s * scores, -np.inf)
        ref = np.exp(ref - ref.max(axis=1, keepdims=True))
        ref /= ref.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(w, ref, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- masking


def test_window_mask_by_hand():
    # window 3 covers the query's own position and the two before it (HF convention)
    m = att.visible_mask(np.array([0, 1, 5]), np.arange(7), 3)
    assert m[0].tolist() == [True] + [False] * 6
    assert m[1].tolist() == [True, True] + [False] * 5
    assert m[2].tolist() == [False, False, False, True, True, True, False]
    assert att.visible_mask(np.array([5]), np.arange(7), None)[0].tolist() == [True] * 6 + [False]


@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_causal_and_window_masking_match_brute_force(window):
    rng = np.random.default_rng(10 + (window or 0))
    # two examples, unsorted rows, keys subsampled (gaps), some queries without keys
    qpos = np.array([9, 0, 4, 7, 2, 13, 11, 3, 6, 1, 12, 0])
    qex = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    kpos = np.array([0, 2, 3, 5, 8, 9, 12, 1, 2, 4, 5, 9, 10])
    kex = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    q = ta(rng.normal(size=(qpos.size, 3)) * 2, qpos, qex, window)
    k = ta(rng.normal(size=(kpos.size, 3)), kpos, kex, window)
    table = token_attention_metrics(q, k, block_rows=2)
    qc = q.canonical()
    ref = brute_metrics(brute_rows(qc, k, window), qc.position)
    assert np.array_equal(table["position"], qc.position.astype(np.int64))
    assert np.array_equal(table["example_id"], qc.example_id)
    assert np.array_equal(table["n_keys"], ref["n_keys"].astype(np.int64))
    for col in ("entropy", "max_attn", "row_std"):
        np.testing.assert_allclose(table[col], ref[col], rtol=1e-12, atol=1e-15, equal_nan=True)
    assert np.array_equal(table["k_eff"], ref["k_eff"].astype(np.int64))
    n_vis = qc.position + 1 if window is None else np.minimum(qc.position + 1, window)
    np.testing.assert_allclose(table["key_coverage"], ref["n_keys"] / n_vis)
    # a query with no visible key: zero coverage, NaN metrics, k_eff 0
    none = table["n_keys"] == 0
    assert none.any()
    assert np.all(np.isnan(table["max_attn"][none])) and np.all(table["k_eff"][none] == 0)
    # exact exactly where every visible position was captured
    np.testing.assert_array_equal(table["exact"], table["key_coverage"] == 1.0)
    assert table["exact"].any() and not table["exact"].all()


def test_attention_weights_matrix_matches_brute_force_with_window():
    rng = np.random.default_rng(4)
    qpos, kpos = np.array([0, 3, 4, 8]), np.array([0, 1, 3, 4, 6, 7, 8])
    q = ta(rng.normal(size=(4, 2)), qpos, window=3)
    k = ta(rng.normal(size=(7, 2)), kpos, window=3)
    w = attention_weights(q.vectors, qpos, k.vectors, kpos, sliding_window=3)
    ref = brute_rows(q, k, 3)
    for i, keys in enumerate(ref):
        expect = np.zeros(kpos.size)
        for p, x in keys:
            expect[np.flatnonzero(kpos == p)[0]] = x
        np.testing.assert_allclose(w[i], expect, rtol=1e-13, atol=0)
    assert w[3, :4].sum() == 0.0 and w[0, 1:].sum() == 0.0


def test_entropy_nan_rules():
    rng = np.random.default_rng(5)
    q = ta(rng.normal(size=(5, 3)), [0, 1, 2, 3, 4], window=1)
    k = ta(rng.normal(size=(5, 3)), [0, 1, 2, 3, 4], window=1)
    t = token_attention_metrics(q, k)
    # positions < 2 -> NaN entropy; window 1 -> one key -> entropy 0 but ratio NaN
    assert np.isnan(t["entropy"][:2]).all()
    assert np.array_equal(t["entropy"][2:], np.zeros(3))
    assert np.isnan(t["entropy_ratio"]).all()
    assert np.array_equal(t["max_attn"], np.ones(5))
    assert np.array_equal(t["n_visible"], np.ones(5, np.int64))


# ----------------------------------------------------------------------------- chunking / sums


@pytest.mark.parametrize("window", [None, 14])
def test_block_size_does_not_change_a_bit(window):
    """Scores are computed per fixed tile of rows and each row's statistics by itself, so the
    number of rows per kernel call changes nothing, bit for bit."""
    rng = np.random.default_rng(6)
    q, k = dense_head(rng, n_ex=3, n_pos=300, d=8, window=window)
    # drop some keys so blocks are irregular (rows="all": every row is computed)
    keep = rng.random(k.n) > 0.3
    k = TokenArrays(k.bucket[keep], k.example_id[keep], k.position[keep], k.vectors[keep], window)
    t0, s0, w0 = head_attention_metrics(q, k)
    for block_rows in (1, 64, 128, 100_000):
        t1, s1, w1 = head_attention_metrics(q, k, block_rows=block_rows)
        for col in TOKEN_COLUMNS:
            np.testing.assert_array_equal(t1[col], t0[col], err_msg=col)
        for col in SWEEP_COLUMNS:
            np.testing.assert_array_equal(w1[col], w0[col], err_msg=col)
        assert s1 == pytest.approx(s0, nan_ok=True)


def test_default_block_respects_budget(monkeypatch):
    """With a small budget the rows go through the kernel in more, smaller blocks (each within
    the budget when one tile of rows allows it); the numbers stay the same."""
    blocks = []
    real = kernel.block_stats  # scan imports it when a block is computed, so the spy goes on kernel

    def spy(scores, *args):
        blocks.append(scores.shape)
        return real(scores, *args)

    rng = np.random.default_rng(7)
    q, k = dense_head(rng, n_ex=2, n_pos=400, d=4)
    monkeypatch.setattr(kernel, "block_stats", spy)
    ref = head_attention_metrics(q, k)
    big = list(blocks)
    blocks.clear()
    monkeypatch.setattr(scan, "BLOCK_BUDGET", 64 * 300)
    got = head_attention_metrics(q, k)
    assert len(blocks) > len(big)
    assert all(r % scan.TILE == 0 or r == 400 % scan.TILE for r, _ in blocks)
    assert all(r * w <= 64 * 300 or r == scan.TILE for r, w in blocks)
    for col in TOKEN_COLUMNS:
        np.testing.assert_array_equal(got[0][col], ref[0][col], err_msg=col)
    assert got[1]["qvar_pairs_distant"] == ref[1]["qvar_pairs_distant"] > 0


def test_rows_sum_to_one_and_no_future_weight():
    rng = np.random.default_rng(8)
    q, k = dense_head(rng, n_ex=2, n_pos=50, d=6, q_scale=4.0, window=12)
    w = attention_weights(q.vectors[:50], q.position[:50], k.vectors[:50], k.position[:50],
                          sliding_window=12)
    assert np.max(np.abs(w.sum(axis=1) - 1.0)) < 1e-12
    _, summ, _ = head_attention_metrics(q, k, block_rows=5)
    assert summ["max_row_sum_error"] < 1e-12
    assert summ["max_future_weight"] == 0.0
    assert summ["max_window_weight"] == 0.0


def test_future_weight_check_is_computed(monkeypatch):
    """Broken key ranges must show up in the checks: they read the keys' positions, not the
    ranges the rows were given."""
    rng = np.random.default_rng(9)
    q, k = dense_head(rng, n_ex=1, n_pos=20, d=4, window=4)
    _, ok, _ = head_attention_metrics(q, k)
    assert ok["max_future_weight"] == 0.0 and ok["max_window_weight"] == 0.0

    def every_key(index, q_pos, window):
        return np.zeros(q_pos.size, np.int64), np.full(q_pos.size, index.code.size, np.int64)

    monkeypatch.setattr(summary, "visible_ranges", every_key)
    _, summ, _ = head_attention_metrics(q, k)
    assert summ["max_future_weight"] > 0.0
    assert summ["max_window_weight"] > 0.0


# ----------------------------------------------------------------------------- head summary


def test_local_bias_by_hand():
    # one query at position 10; keys 5..10 (within 5) score log 2, keys 0..4 score 0
    kv = np.where(np.arange(11) >= 5, math.log(2.0), 0.0)
    q = ta([1.0], [10])
    k = ta(kv, np.arange(11))
    _, summ, _ = head_attention_metrics(q, k, local_window=5)
    assert summ["local_attn_near"] == pytest.approx(2.0 / 17.0, rel=1e-13)
    assert summ["local_attn_far"] == pytest.approx(1.0 / 17.0, rel=1e-13)
    assert summ["local_bias_ratio"] == pytest.approx(2.0, rel=1e-13)


def test_same_token_attention_by_hand():
    # query 'a' at 4; keys a b a c a(self, excluded). same tokens score log 3.
    tokens = ["a", "b", "a", "c", "a"]
    kv = np.array([math.log(3.0), 0.0, math.log(3.0), 0.0, 0.0])
    q = ta([1.0], [4], tokens=["a"])
    k = ta(kv, np.arange(5), tokens=tokens)
    _, summ, _ = head_attention_metrics(q, k)
    assert summ["same_token_attn"] == pytest.approx(3.0 / 9.0, rel=1e-13)
    assert summ["diff_token_attn"] == pytest.approx(1.0 / 9.0, rel=1e-13)
    assert summ["same_token_ratio"] == pytest.approx(3.0, rel=1e-13)
    _, summ2, _ = head_attention_metrics(ta([1.0], [4]), ta(kv, np.arange(5)))
    assert math.isnan(summ2["same_token_ratio"]) and math.isnan(summ2["same_token_attn"])


def test_query_variation_by_hand():
    # d = 1; keys k0=1, k1=0, k2=0. q@1 = 0 (uniform 0.5/0.5 over keys 0,1),
    # q@2 = log 3 (0.75/0.25 over the shared keys 0,1). q@0 pairs with q@1 on 1 key: skipped.
    q = ta([0.5, 0.0, math.log(3.0)], [0, 1, 2])
    k = ta([1.0, 0.0, 0.0], [0, 1, 2])
    mean, n = query_variation(q, k, 1)
    assert n == 1
    assert mean == pytest.approx(0.25 * math.sqrt(2.0), rel=1e-13)
    _, summ, _ = head_attention_metrics(q, k)
    assert summ["qvar_l2_adjacent"] == pytest.approx(0.25 * math.sqrt(2.0), rel=1e-13)
    assert summ["qvar_pairs_adjacent"] == 1
    assert math.isnan(summ["qvar_l2_distant"]) and summ["qvar_pairs_distant"] == 0
    # window 2: q@1 and q@2 share only key 1 -> no pair
    qw, kw = ta(q.vectors, [0, 1, 2], window=2), ta(k.vectors, [0, 1, 2], window=2)
    mean_w, n_w = query_variation(qw, kw, 1)
    assert n_w == 0 and math.isnan(mean_w)


def test_query_variation_matches_brute_force():
    rng = np.random.default_rng(11)
    q, k = dense_head(rng, n_ex=2, n_pos=30, d=3, window=15)
    mean, n = query_variation(q, k, 10, block_rows=4)
    dists = []
    for e in range(2):
        for p in range(30 - 10):
            i = np.flatnonzero((q.example_id == e) & (q.position == p))[0]
            j = np.flatnonzero((q.example_id == e) & (q.position == p + 10))[0]
            shared = np.flatnonzero((k.example_id == e) & (k.position <= p) & (k.position > p + 10 - 15))
            if shared.size < 2:
                continue
            rows = []
            for r in (i, j):
                s = k.vectors[shared] @ q.vectors[r] / math.sqrt(3)
                w = np.exp(s - s.max())
                rows.append(w / w.sum())
            dists.append(np.linalg.norm(rows[0] - rows[1]))
    assert n == len(dists) > 0
    assert mean == pytest.approx(np.mean(dists), rel=1e-13)


def test_summary_and_sweep_consistency():
    rng = np.random.default_rng(12)
    q, k = dense_head(rng, n_ex=2, n_pos=40, d=8)
    table, summ, sweep = head_attention_metrics(q, k)
    assert tuple(summ) == SUMMARY_COLUMNS
    assert tuple(table) == TOKEN_COLUMNS
    assert tuple(sweep) == SWEEP_COLUMNS
    assert np.array_equal(sweep["scale"], np.array(DEFAULT_SCALES))
    i1 = list(DEFAULT_SCALES).index(1.0)
    assert sweep["mean_entropy"][i1] == summ["mean_entropy"] == pytest.approx(np.nanmean(table["entropy"]))
    assert sweep["mean_max_attn"][i1] == summ["mean_max_attn"]
    assert summ["mean_k_eff"] == pytest.approx(table["k_eff"].mean())
    assert summ["row_std"] == pytest.approx(table["row_std"].mean())
    assert summ["mean_key_coverage"] == 1.0
    assert summ["n_queries"] == 80 and summ["n_examples"] == 2
    # softmax entropy falls and max weight rises with inverse temperature
    assert summ["entropy_monotonic"] is True
    assert np.all(np.diff(sweep["mean_max_attn"]) > 0)
    assert summ["gain"] > 0
    g, r2 = gain_fit(sweep["scale"], sweep["mean_max_attn"])
    assert (g, r2) == (summ["gain"], summ["gain_r2"])


def test_sweep_without_unit_scale_still_reports_scale_one():
    rng = np.random.default_rng(13)
    q, k = dense_head(rng, n_ex=1, n_pos=30, d=4)
    t_a, s_a, _ = head_attention_metrics(q, k, scales=(0.5, 2.0))
    t_b, s_b, sw = head_attention_metrics(q, k)
    assert s_a["mean_entropy"] == s_b["mean_entropy"]
    np.testing.assert_array_equal(t_a["entropy"], t_b["entropy"])
    _, _, sw2 = head_attention_metrics(q, k, scales=(2.0, 0.5))
    assert sw2["scale"].tolist() == [2.0, 0.5]


def test_gain_fit_known_line():
    s = np.array([0.5, 0.75, 1.0, 1.25, 1.5])
    y = 0.2 + 0.37 * np.log(s)
    g, r2 = gain_fit(s, y)
    assert g == pytest.approx(0.37, rel=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)
    y2 = y + np.array([0.01, -0.02, 0.0, 0.02, -0.01])
    g2, r22 = gain_fit(s, y2)
    assert r22 < 1.0 and g2 != pytest.approx(0.37, rel=1e-6)
    assert all(math.isnan(v) for v in gain_fit([1.0], [0.3]))
    assert gain_ratio(0.6, 0.3) == pytest.approx(2.0)
    assert math.isnan(gain_ratio(1.0, 0.0))
    assert math.isnan(gain_ratio(float("nan"), 1.0))


def test_attention_class_thresholds():
    assert attention_class(0.5) == "sharp"
    assert attention_class(0.51) == "medium"
    assert attention_class(0.95) == "uniform"
    assert attention_class(0.7, sharp_max=0.8) == "sharp"
    assert attention_class(float("nan")) == "unknown"


def test_input_validation():
    rng = np.random.default_rng(14)
    q = ta(rng.normal(size=(3, 4)), [0, 1, 2], window=4)
    with pytest.raises(ValueError, match="width"):
        head_attention_metrics(q, ta(rng.normal(size=(3, 5)), [0, 1, 2], window=4))
    with pytest.raises(ValueError, match="sliding_window"):
        head_attention_metrics(q, ta(rng.normal(size=(3, 4)), [0, 1, 2], window=8))
    with pytest.raises(ValueError, match="integer"):
        head_attention_metrics(ta(q.vectors, [0, 1.5, 2]), ta(q.vectors, [0, 1, 2]))
    with pytest.raises(ValueError, match="scales"):
        head_attention_metrics(q, q, scales=(1.0, -1.0))


def test_empty_and_keyless_heads():
    rng = np.random.default_rng(15)
    empty = ta(np.zeros((0, 3)), [])
    t, s, sw = head_attention_metrics(empty, ta(rng.normal(size=(2, 3)), [0, 1]))
    assert all(v.size == 0 for v in t.values())
    assert s["n_queries"] == 0 and math.isnan(s["mean_entropy"]) and s["attn_class"] == "unknown"
    # queries of an example that has no keys at all
    t, s, _ = head_attention_metrics(ta(rng.normal(size=(2, 3)), [3, 4], [7, 7]),
                                     ta(rng.normal(size=(2, 3)), [0, 1], [1, 1]))
    assert np.array_equal(t["n_keys"], [0, 0]) and s["n_queries_with_keys"] == 0
    assert math.isnan(s["max_row_sum_error"]) and np.array_equal(t["key_coverage"], [0.0, 0.0])


# ----------------------------------------------------------------------------- fast path


def test_example_alone_or_batched_gives_the_same_rows():
    rng = np.random.default_rng(22)
    q, k = dense_head(rng, n_ex=3, n_pos=70, d=5)
    t_all, _, _ = head_attention_metrics(q, k)
    for e in range(3):
        sel_q, sel_k = q.example_id == e, k.example_id == e
        qe = TokenArrays(q.bucket[sel_q], q.example_id[sel_q], q.position[sel_q], q.vectors[sel_q])
        ke = TokenArrays(k.bucket[sel_k], k.example_id[sel_k], k.position[sel_k], k.vectors[sel_k])
        t_e, _, _ = head_attention_metrics(qe, ke)
        rows = np.flatnonzero(t_all["example_id"] == e)
        for col in ("entropy", "max_attn", "row_std", "k_eff"):
            np.testing.assert_array_equal(t_e[col], t_all[col][rows], err_msg=col)


@pytest.mark.parametrize("scales", [(0.3, 1.0, 2.7), (1.0, 17.0, 0.125)])
def test_scales_outside_the_power_grid_match_brute_force(scales):
    """Scales that are not multiples of 1/4 (or need a power > 64) take the direct-exp path."""
    rng = np.random.default_rng(23)
    n, d = 30, 4
    q = ta(rng.normal(size=(n, d)), np.arange(n), window=9)
    k = ta(rng.normal(size=(n, d)), np.arange(n), window=9)
    _, _, sweep = head_attention_metrics(q, k, scales=scales)
    for i, s in enumerate(scales):
        ref = brute_metrics(brute_rows(q, k, 9, scale=s), q.position)
        assert sweep["mean_entropy"][i] == pytest.approx(np.nanmean(ref["entropy"]), rel=1e-12)
        assert sweep["mean_max_attn"][i] == pytest.approx(np.mean(ref["max_attn"]), rel=1e-12)
        assert sweep["mean_row_std"][i] == pytest.approx(np.mean(ref["row_std"]), rel=1e-12)
        assert sweep["mean_k_eff"][i] == pytest.approx(np.mean(ref["k_eff"]), rel=1e-15)


def test_query_variation_when_shared_keys_are_far_below_the_max():
    """The later query's own position key outweighs the shared keys by e^-3000: its
    renormalised row over the shared keys must still be exact (softmax of its scores)."""
    # d = 1; keys 0 and 1 score 0 and 1 * q, key 2 scores 3000 for the query at 2
    q = ta([0.0, 0.5, 1.0], [0, 1, 2])
    k = ta([0.0, 1.0, 3000.0], [0, 1, 2])
    mean, n = query_variation(q, k, 1)
    # early query (pos 1, q=0.5) over keys 0,1: softmax(0, 0.5); late (pos 2, q=1): softmax(0, 1)
    e = np.exp([0.0, 0.5]) / np.exp([0.0, 0.5]).sum()
    l_ = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    assert n == 1
    assert mean == pytest.approx(np.linalg.norm(e - l_), rel=1e-13)
    _, summ, _ = head_attention_metrics(q, k)
    assert summ["qvar_l2_adjacent"] == pytest.approx(np.linalg.norm(e - l_), rel=1e-13)


def test_token_codes_treat_missing_tokens_as_unknown():
    qc, kc = inputs.token_codes(np.array(["a", None, "b"], dtype=object),
                              np.array(["b", "a", float("nan"), "c"], dtype=object))
    assert qc.tolist()[1] == -1 and kc.tolist()[2] == -1
    assert qc[0] == kc[1] and qc[2] == kc[0] and kc[3] not in (qc[0], qc[2])


def test_query_variation_with_duplicate_positions_matches_brute_force():
    """Two captured queries at one position both pair with the first query D later; keys
    captured twice count once for coverage (every position 0..5 is there: rows are exact)."""
    q = ta([[0.3, -1.0], [1.2, 0.4], [-0.7, 0.9], [0.5, 0.5], [2.0, -0.3], [-1.1, 0.2]], [2, 3, 3, 4, 5, 5])
    k = ta([[0.1, 0.8], [-0.6, 0.3], [0.9, -0.2], [-0.5, 0.6], [1.0, 1.0], [0.2, -0.9], [0.7, 0.1], [0.3, 0.3],
            [-0.4, -0.4]], [0, 0, 1, 2, 3, 3, 3, 4, 5])
    assert token_attention_metrics(q, k)["exact"].all()
    dists = []
    for i, j in [(0, 1), (1, 3), (2, 3), (3, 4)]:  # late = first query at position + 1
        shared = np.flatnonzero(k.position <= q.position[i])
        rows = []
        for r in (i, j):
            s = k.vectors[shared] @ q.vectors[r] / math.sqrt(2)
            w = np.exp(s - s.max())
            rows.append(w / w.sum())
        dists.append(np.linalg.norm(rows[0] - rows[1]))
    mean, n = query_variation(q, k, 1)
    assert n == 4 and mean == pytest.approx(np.mean(dists), rel=1e-13)
    assert head_attention_metrics(q, k)[1]["qvar_l2_adjacent"] == pytest.approx(np.mean(dists), rel=1e-13)
