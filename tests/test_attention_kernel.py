"""The compiled kernel's arithmetic against references: exp, scale powers, k_eff selection,
entropy precision on sharp rows, and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plasticity.attention import head_attention_metrics, token_attention_metrics
from plasticity.attention.kernel import EXP_FLOOR, N_BINS, exp_nonpositive
from plasticity.attention.scale_plan import power_of_scale, scale_plan
from plasticity.types import TokenArrays


def one_row_head(scores: np.ndarray) -> tuple[TokenArrays, TokenArrays]:
    """A query at position n-1 whose raw scores over keys 0..n-1 are exactly ``scores``
    (d = 1, key vectors = scores, query 1: q . k / sqrt(1))."""
    n = scores.size
    q = TokenArrays(np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([n - 1.0]), np.ones((1, 1)))
    k = TokenArrays(np.zeros(n, np.int64), np.zeros(n, np.int64), np.arange(n, dtype=float),
                    np.asarray(scores, dtype=float)[:, None])
    return q, k


def k_eff_by_sort(scores: np.ndarray, scale: float) -> int:
    """Fewest keys, largest first, holding 0.9 of the mass (1e-12 tolerance): a full sort."""
    w = np.exp(scale * (scores - scores.max()))
    c = np.cumsum(np.sort(w)[::-1]) / w.sum()
    return int(np.argmax(c >= 0.9 - 1e-12)) + 1


def test_exp_is_within_one_and_a_half_ulp_of_a_float80_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([[0.0, -0.0, -1e-300, -5e-324, EXP_FLOOR, -1e-8, -0.5 * math.log(2)],
                        -rng.random(20000) * 708, -rng.exponential(2.0, 20000)])
    x = x[x >= EXP_FLOOR]
    got = np.array([exp_nonpositive(v) for v in x])
    ref = np.exp(x.astype(np.longdouble))
    ulps = np.abs(got - ref) / np.spacing(ref.astype(float))
    assert float(ulps.max()) < 1.5  # measured 1.09 ulp at most (a correctly rounded exp: 0.5)
    assert exp_nonpositive(0.0) == 1.0  # the top key weighs exactly 1 at every scale


def test_scale_plan_builds_the_documented_powers():
    plan = scale_plan((0.5, 0.75, 1.0, 1.25, 1.5, 0.3, 17.0))
    assert [power_of_scale(s) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 0.3, 17.0, 16.0)] == [2, 3, 4, 5, 6, None, None, 64]
    assert plan.one == 2 and list(plan.scale_slot[-2:]) == [-1, -1]
    r = np.concatenate([[0.3, 0.9, 1.0, 1e-80], np.random.default_rng(1).random(2000)])  # last bits differ by tree
    slots = [r] + [None] * (plan.n_slots - 1)
    for dst, s1, s2 in plan.prog:
        slots[dst] = slots[s1] * slots[s2]
    # R**m by the fixed multiplication tree: R^3 = R^2 * R, R^6 = R^3 * R^3, R^5 = R^4 * R
    r2 = r * r
    want = {2: r2, 3: r2 * r, 4: r2 * r2, 5: (r2 * r2) * r, 6: (r2 * r) * (r2 * r)}
    for s, m in zip((0.5, 0.75, 1.0, 1.25, 1.5), (2, 3, 4, 5, 6)):
        np.testing.assert_array_equal(slots[plan.scale_slot[plan.scales.tolist().index(s)]], want[m])


@pytest.mark.parametrize("case", ["ties", "tenths", "dynamic_range", "clustered", "random", "two_levels"])
def test_k_eff_equals_a_full_sort(case):
    """k_eff by score bins (and re-binned boundary bins) equals the sorted cumulative sum."""
    rng = np.random.default_rng(hash(case) % 2**32)
    n = 3000
    if case == "ties":  # every score equal: the 90% boundary falls inside one bin of equal weights
        scores = np.zeros(n)
    elif case == "tenths":  # ten equal top weights hold exactly 0.9 with the rest negligible
        scores = np.concatenate([np.full(10, 50.0), rng.normal(size=n - 10) - 1000.0])
    elif case == "dynamic_range":
        scores = rng.normal(size=n) * 300.0
    elif case == "clustered":  # most keys in a narrow band, a few far apart: deep refinement
        scores = np.concatenate([rng.normal(size=n - 5) * 1e-6, [40.0, -40.0, 30.0, -300.0, 5.0]])
    elif case == "two_levels":
        scores = np.concatenate([np.full(n // 2, 1.0), np.full(n // 2, 0.0)])
    else:
        scores = rng.standard_t(3, size=n) * 2.0
    q, k = one_row_head(scores)
    scales = (0.5, 0.75, 1.0, 1.25, 1.5, 0.3, 2.7)
    _, _, sweep = head_attention_metrics(q, k, scales=scales)
    for s, got in zip(scales, sweep["mean_k_eff"]):
        assert got == k_eff_by_sort(scores, s), (case, s)


def test_sharp_rows_keep_full_relative_precision_in_entropy():
    """Entropy is log1p(mass of the non-top keys) + the score term, so a row with one dominant
    key (entropy ~1e-9..1e-20) is exact to ~1e-14 relative, against a float80 reference."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for gap in (15.0, 25.0, 35.0, 45.0):
        scores = np.concatenate([[gap], rng.normal(size=500)])
        q, k = one_row_head(scores)
        got = token_attention_metrics(q, k)["entropy"][0]
        a = scores.astype(np.longdouble) - np.longdouble(gap)
        z = np.exp(a)
        ref = float(np.log1p(z[1:].sum()) - (z * a).sum() / z.sum())
        assert 0 < ref < 1e-2
        worst = max(worst, abs(got - ref) / ref)
    assert worst < 1e-13


def test_rows_mode_and_repeats_do_not_change_a_bit():
    """The exact rows get the same bits whether every row is computed or only the exact
    ones, and a second call repeats every bit."""
    rng = np.random.default_rng(5)
    n_ex, n_pos, d = 3, 200, 8
    ex = np.repeat(np.arange(n_ex), n_pos)
    pos = np.tile(np.arange(n_pos), n_ex).astype(float)
    q = TokenArrays(ex * 0, ex, pos, rng.normal(size=(ex.size, d)) * 2)
    keep = ~((ex == 1) & (pos == 120))  # one missing key: rows of example 1 from 120 on are not exact
    k = TokenArrays(ex[keep] * 0, ex[keep], pos[keep], rng.normal(size=(ex.size, d))[keep])
    t_all, s_all, w_all = head_attention_metrics(q, k, rows="all")
    t_ex, s_ex, w_ex = head_attention_metrics(q, k, rows="exact")
    exact = t_all["exact"]
    assert exact.sum() == n_ex * n_pos - 80 and s_all["status"] == s_ex["status"] == "partial"
    for col in ("entropy", "max_attn", "row_std", "k_eff"):
        np.testing.assert_array_equal(t_ex[col][exact], t_all[col][exact], err_msg=col)
    assert np.isnan(t_ex["max_attn"][~exact]).all() and np.isfinite(t_all["max_attn"][~exact]).all()
    for col in w_all:
        np.testing.assert_array_equal(w_ex[col], w_all[col])
    assert {c: v for c, v in s_ex.items() if c != "status_reason"} == \
        pytest.approx({c: v for c, v in s_all.items() if c != "status_reason"}, nan_ok=True)
    again = head_attention_metrics(q, k, rows="exact")
    for col in t_ex:
        np.testing.assert_array_equal(again[0][col], t_ex[col])


def test_a_fresh_process_loads_the_compiled_kernel_from_the_cache(tmp_path):
    """Spawned workers are fresh interpreters: the second one must load the kernel numba cached
    (``cache=True``) instead of compiling it again."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from plasticity.attention import head_attention_metrics\n"
            "from plasticity.attention.kernel import block_stats\n"
            "from plasticity.types import TokenArrays\n"
            "q = TokenArrays(np.zeros(40, np.int64), np.zeros(40, np.int64), np.arange(40.0),"
            " np.random.default_rng(0).normal(size=(40, 4)))\n"
            "head_attention_metrics(q, q)\n"
            "print(block_stats.stats.cache_hits.total(), block_stats.stats.cache_misses.total())\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    (hits1, misses1), (hits2, misses2) = [tuple(map(int, r.stdout.split())) for r in runs]
    assert (hits1, misses1) == (0, 1)  # an empty cache: compiled once
    assert (hits2, misses2) == (1, 0)  # then loaded
    assert any(p.suffix == ".nbi" for p in (tmp_path / "numba").rglob("*"))


def test_vector_sums_add_each_lane_in_the_order_of_the_scalar_partial_sums():
    # the kernel's reductions are explicit vector loops (numba keeps LLVM's SLP vectoriser off);
    # lane c adds elements c, c + lanes, ... in order, so the sums are the bits of the scalar code
    from numba import njit

    from plasticity.attention.kernel import _bin_sums, _distance_sums, _shared_sums, _std_sums

    @njit
    def run(p, a, e, start, stop, n4, mu, e_off, ratio):
        return (_bin_sums(p, a, start, stop), _std_sums(p, n4, mu), _shared_sums(e, e_off, p, n4),
                _distance_sums(e, e_off, p, ratio, n4))

    rng = np.random.default_rng(3)
    p, a, e = rng.random(203) ** 8, -rng.exponential(3.0, 203), rng.random(300) ** 8
    start, stop, n4, mu, e_off, ratio = 3, 3 + 2 * 97, 200, 0.37, 7, 1.3
    got = run(p, a, e, start, stop, n4, mu, e_off, ratio)

    def lanes(values, n_lanes):
        acc = [0.0] * n_lanes
        for j, v in enumerate(values):
            acc[j % n_lanes] += v
        return acc

    pb, ab = p[start:stop], a[start:stop]
    assert got[0] == tuple(lanes(pb, 2) + lanes([x * y for x, y in zip(pb, ab)], 2))
    assert got[1] == tuple(lanes(p[:n4], 4) + lanes([(x - mu) * (x - mu) for x in p[:n4]], 4))
    assert got[2] == tuple(lanes(e[e_off:e_off + n4], 4) + lanes(p[:n4], 4))
    assert got[3] == tuple(lanes([(x - y * ratio) * (x - y * ratio) for x, y in zip(e[e_off:e_off + n4], p[:n4])], 4))


def _lane_sums(values, n_lanes):
    acc = [0.0] * n_lanes
    for j, v in enumerate(values):
        acc[j % n_lanes] += v
    return acc


def _row_std_in_the_documented_order(scores: np.ndarray) -> float:
    """row_std of one row at scale 1, written out in plain Python in the order the kernel documents:
    R = exp(a / 4) by the kernel's exp, P = R**4 by the scale plan, the bin masses by 2-lane sums
    (the top key, weight 1, left out), then the squared deviations by 4-lane sums combined as
    ``(d0 + d1) + (d2 + d3)``. Scores must be strictly decreasing, so each key's place in its bin
    is its own index."""
    n = scores.size
    top = float(scores.max())
    a = scores - top
    plan = scale_plan((1.0,))
    slots = [np.array([exp_nonpositive(max(x * 0.25, EXP_FLOOR)) for x in a])] + [None] * (plan.n_slots - 1)
    for dst, s1, s2 in plan.prog:
        slots[dst] = slots[s1] * slots[s2]
    p = slots[plan.scale_slot[0]]
    nb = min(N_BINS, max(1, int(math.sqrt(n))))
    to_bin = nb / (top - float(scores.min()))
    bins = [min(int((top - s) * to_bin), nb - 1) for s in scores]
    assert bins == sorted(bins)  # precondition: the bins keep the keys in their order
    off = np.searchsorted(bins, np.arange(nb + 1))
    rest = 0.0
    for b in range(nb):
        start, end = (1 if b == 0 else int(off[b])), int(off[b + 1])
        end2 = end - (end - start) % 2
        t = _lane_sums(p[start:end2], 2)
        if end2 < end:
            t[0] += p[end2]
        rest += t[0] + t[1]
    tot = 1.0 + rest
    mu = tot / n
    n4 = n - n % 4
    d = _lane_sums([(x - mu) * (x - mu) for x in p[:n4]], 4)
    for x in p[n4:]:
        d[0] += (x - mu) * (x - mu)
    return math.sqrt(((d[0] + d[1]) + (d[2] + d[3])) / n) * (1.0 / tot)


def test_row_std_has_the_bits_of_the_documented_summation_order():
    """The kernel promises fixed-order sums (so the same bits on every CPU); row_std written out
    in that order in plain Python must give the kernel's bits on every row, not just close values.
    Another way of combining the four lanes changes the last bit on about one row in ten."""
    rng = np.random.default_rng(29)
    for _ in range(120):
        n = int(rng.integers(20, 400))
        scores = -np.sort(-rng.normal(size=n) * 3.0)
        q, k = one_row_head(scores)
        got = token_attention_metrics(q, k)["row_std"][0]
        assert got == _row_std_in_the_documented_order(scores), n
