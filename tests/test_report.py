"""warehouse.present.validation_report: markers, counts and determinism of the validation report."""

from __future__ import annotations

import re

import numpy as np
import pytest

from plasticity.attention import head_attention_metrics
from warehouse.present.report_parts import gain_ratio_meaning
from warehouse.present.validation_report import validation_report
from plasticity.types import TokenArrays


def head(layer, q_head, k_head=None, **over):
    h = {
        "layer": layer,
        "q_head": q_head,
        "k_head": q_head if k_head is None else k_head,
        "n_queries": 1000,
        "n_queries_with_keys": 1000,
        "n_examples": 4,
        "head_dim": 64,
        "sliding_window": None,
        "mean_entropy": 2.0,
        "mean_entropy_ratio": 0.40,
        "mean_max_attn": 0.45,
        "mean_k_eff": 12.0,
        "mean_query_norm": 8.0,
        "mean_n_keys": 256.0,
        "mean_key_coverage": 1.0,
        "row_std": 0.08,
        "attn_class": "sharp",
        "local_window": 5,
        "local_attn_near": 0.02,
        "local_attn_far": 0.005,
        "local_bias_ratio": 4.0,
        "same_token_attn": 0.03,
        "diff_token_attn": 0.01,
        "same_token_ratio": 3.0,
        "qvar_l2_adjacent": 0.10,
        "qvar_l2_distant": 0.30,
        "qvar_pairs_adjacent": 990,
        "qvar_pairs_distant": 900,
        "max_row_sum_error": 4.4e-16,
        "max_future_weight": 0.0,
        "max_window_weight": 0.0,
        "gain": 0.25,
        "gain_r2": 0.99,
        "entropy_monotonic": True,
        "status": "exact",
        "status_reason": "all 1000 query rows see every key they may attend to",
        "n_exact_rows": 1000,
        "exact_row_frac": 1.0,
        "min_exact_rows": 100,
    }
    h.update(over)
    return h


def section(text, idx):
    """Lines of section [idx/7] (up to the next section or the summary)."""
    start = text.index(f"[{idx}/7]")
    nxt = text.find(f"[{idx + 1}/7]", start)
    end = nxt if nxt >= 0 else text.index("SUMMARY", start)
    return text[start:end]


def counts(text):
    m = re.search(r"Passed: (\d+)/(\d+) checks", text)
    w = re.search(r"Warnings: (\d+)", text)
    f = re.search(r"Failures: (\d+)", text)
    s = re.search(r"Skipped: (\d+)", text)
    return int(m[1]), int(m[2]), int(w[1]), int(f[1]), int(s[1])


def test_healthy_heads_pass_everything_but_window():
    text = validation_report("demo/model", [head(0, 0), head(0, 1), head(1, 0)])
    assert text.startswith("=" * 70 + "\nATTENTION VALIDATION REPORT")
    assert "model: demo/model" in text
    assert "[PASS] All rows sum to 1 within 1e-06" in text
    assert "[PASS] No future key has weight" in text
    assert "[SKIP] Sliding window: no windowed head" in text
    assert "[PASS] Local bias" in section(text, 2)
    assert "[PASS] Repeated tokens attract" in section(text, 3)
    assert "[PASS] Attention departs from uniform" in section(text, 4)
    assert "[PASS] Different queries attend differently" in section(text, 6)
    assert "Positional structure detected" in section(text, 6)
    assert "[PASS] Entropy falls monotonically" in section(text, 7)
    assert "3/3 sharp (100%)" in text
    assert "[PASS] Keys captured densely in every head" in text
    assert "heads: 3 (3 estimable from this capture)" in text
    assert counts(text) == (9, 9, 0, 0, 1)
    assert "[FAIL]" not in text and "[WARN]" not in text
    assert "shows structure" in text


def test_reconstruction_failures_are_flagged_with_head():
    bad = head(2, 5, 1, max_row_sum_error=3e-3, max_future_weight=0.0078)
    text = validation_report("m", [head(0, 0), bad])
    sec = section(text, 1)
    assert "[FAIL] 1/2 heads have rows not summing to 1" in sec
    assert "L2 H5 (kv 1)" in sec
    assert "[FAIL] Non-causal attention in 1/2 heads (max future weight: 0.0078)" in sec
    _, _, _, n_fail, _ = counts(text)
    assert n_fail == 2
    assert "reconstruction is wrong" in text


def test_row_sum_tolerance_boundary():
    ok = validation_report("m", [head(0, 0, max_row_sum_error=1e-6)])
    bad = validation_report("m", [head(0, 0, max_row_sum_error=1.1e-6)])
    assert "[PASS] All rows sum to 1" in ok
    assert "[FAIL]" in section(bad, 1) and "[FAIL]" not in section(ok, 1)


def test_uniform_heads_fail_and_are_labelled():
    uni = dict(mean_entropy_ratio=0.983, attn_class="uniform", row_std=0.024,
               local_attn_near=0.0082, local_attn_far=0.0079, local_bias_ratio=1.04,
               same_token_attn=0.0078, diff_token_attn=0.0078, same_token_ratio=1.0,
               qvar_l2_adjacent=0.012, qvar_l2_distant=0.010)
    text = validation_report("m", [head(0, i, 0, **uni) for i in range(3)] + [head(1, 0, 0, **dict(uni, mean_entropy_ratio=0.94, attn_class="medium"))])
    # three uniform heads and a medium one: the interval of the mean over heads reaches across 0.95
    assert "[WARN] Uniformity not decided by these heads (H/H_max: 0.972, threshold 0.95" in section(text, 4)
    assert "[FAIL] Nearly uniform" in section(validation_report("m", [head(0, i, 0, **uni) for i in range(3)]), 4)
    assert text.count("[UNIFORM]") == 3 and text.count("[MEDIUM]") == 1
    assert "0/4 sharp (0%), 1/4 medium (25%), 3/4 uniform (75%)" in text
    assert "[WARN] No local bias" in section(text, 2)
    assert "[WARN] Repeated tokens do not attract" in section(text, 3)
    assert "[FAIL] Queries attend alike" in section(text, 6)
    assert "No evidence of positional structure: adjacent queries differ more" in section(text, 6)
    n_pass, n_total, n_warn, n_fail, _ = counts(text)
    assert (n_warn, n_fail) == (3, 1) and n_pass + n_warn + n_fail == n_total
    assert "correctly but may not carry meaningful patterns" in text


def test_windows_tokens_coverage_and_sweep_warnings():
    hs = [
        head(0, 0, sliding_window=128, max_window_weight=0.0, status="partial", exact_row_frac=0.25, n_exact_rows=250,
             status_reason="250 of 1000 query rows (25.0%) see every key they may attend to, at positions 0-40",
             same_token_attn=float("nan"), diff_token_attn=float("nan")),
        head(0, 1, sliding_window=128, max_window_weight=0.2, same_token_attn=None, diff_token_attn=None,
             entropy_monotonic=False, gain=0.0),
    ]
    text = validation_report("m", hs, unicode=True)
    assert "[FAIL] \u274c Keys outside the sliding window have weight in 1/2" in text
    assert "[WARN] \u26a0 1/2 heads are partial: their summaries use only the query rows that see every key " \
           "(25.0% of rows on average)" in text
    assert "L0 H0 (kv 0): 250 of 1000 query rows (25.0%)" in section(text, 1)
    assert "[SKIP] \u2013 Repeated tokens: token_str not captured" in text
    assert "[WARN] \u26a0 Entropy does not fall monotonically with query scale in 1/2 heads" in text
    assert "[WARN] \u26a0 1/2 heads do not sharpen" in text
    assert "sliding windows: 128" in text
    assert "entropy falls monotonically: NO" in text
    assert "exact rows=250/1000 [SHARP]" in section(text, 5)


def test_gain_ratio_interpretation_states_its_threshold():
    hs = [head(0, 0, gain=0.1), head(0, 1, gain=0.1), head(0, 2, gain=0.25)]
    text = validation_report("m", hs)
    # the largest gain is picked after the fact: described, never called evidence
    assert ("Most sensitive: L0 H2 (kv 2) gain=0.2500; median gain=0.1000; ratio to the median 2.50x (the largest "
            "of 3 gains, chosen after seeing them: a description, no evidence of head-specific exploitation "
            "either way)") in text
    assert "strong evidence" not in text
    # two heads named beforehand: the fixed reading, its threshold, and that it is not a statistical test
    assert gain_ratio_meaning(2.50).startswith("head-specific by the fixed reading (ratio >= 2x; no standard error")
    assert gain_ratio_meaning(1.6).startswith("higher sensitivity than the control by the fixed reading "
                                              "(ratio >= 1.5x, < 2x;")
    assert gain_ratio_meaning(1.1).startswith("no distinction by the fixed reading (ratio < 1.5x;")
    assert all("not statistical evidence" in gain_ratio_meaning(r) for r in (1.1, 1.5, 2.0))


def test_monotonicity_is_not_applicable_where_entropy_is_undefined():
    nan = float("nan")
    undefined = [head(0, i, entropy_monotonic=None, mean_entropy=nan) for i in range(3)]
    text = validation_report("m", undefined)
    sweep = section(text, 7)
    assert "[SKIP] Entropy monotonicity: not applicable (mean entropy undefined in all 3 heads)" in sweep
    assert "does not fall monotonically" not in text
    mixed = validation_report("m", undefined[:1] + [head(0, 5), head(0, 6, entropy_monotonic=False)])
    assert "[WARN] Entropy does not fall monotonically with query scale in 1/2 heads" in mixed
    assert "[INFO] Entropy monotonicity not applicable in 1/3 heads (mean entropy undefined)" in mixed


def test_t_interval_of_mean_against_scipy():
    from scipy import stats

    from plasticity.mean_interval import t_interval_of_mean

    x = [0.31, 0.27, 0.44, 0.18, 0.35]
    m, lo, hi = t_interval_of_mean(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert m == pytest.approx(np.mean(x), rel=1e-15)
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert t_interval_of_mean([2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        t_interval_of_mean([1.0])


def test_a_check_whose_interval_reaches_across_its_threshold_is_not_decided():
    from scipy import stats

    ratios = [0.2, 0.4, 1.3, 1.6]  # mean 0.875 below 0.95, but the heads disagree widely
    hs = [head(0, i, mean_entropy_ratio=r) for i, r in enumerate(ratios)]
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(ratios), scale=stats.sem(ratios))
    assert lo < 0.95 < hi
    text = section(validation_report("m", hs), 4)
    assert (f"[WARN] Uniformity not decided by these heads (H/H_max: 0.875, threshold 0.95; per-head mean 0.8750, "
            f"95% t-interval [{lo:.4f}, {hi:.4f}] over 4 heads; the interval includes 0.95)") in text
    decided = section(validation_report("m", [head(0, i, mean_entropy_ratio=r) for i, r in enumerate([0.3, 0.35])]), 4)
    assert "[PASS] Attention departs from uniform (H/H_max: 0.325 < 0.95; per-head mean 0.3250" in decided


def test_positional_structure_rests_on_a_t_interval_over_heads():
    from scipy import stats

    adjacent = [0.2200, 0.2230, 0.2190, 0.2205]
    distant = [0.2215, 0.2220, 0.2210, 0.2215]  # means 0.22065 vs 0.2215: a hair apart, heads disagree
    hs = [head(0, i, qvar_l2_adjacent=a, qvar_l2_distant=d) for i, (a, d) in enumerate(zip(adjacent, distant))]
    text = section(validation_report("m", hs), 6)
    diff = np.subtract(distant, adjacent)
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert lo < 0 < hi  # the data's property the sentence must follow
    floor = 0.05 * np.mean(adjacent)
    assert (f"No evidence of positional structure (mean per-head difference distant - adjacent {diff.mean():.4f}, "
            f"95% t-interval [{lo:.4f}, {hi:.4f}] over 4 heads; threshold 5% of the adjacent distance = "
            f"{floor:.4f}; the interval reaches below it)") in text
    # a difference every head shows, yet 0.4% of the distance (the demo's 0.2215 against 0.2206): no evidence
    tiny = [head(0, i, qvar_l2_adjacent=0.2206 + 0.001 * i, qvar_l2_distant=0.2215 + 0.001 * i) for i in range(4)]
    assert "No evidence of positional structure" in section(validation_report("m", tiny), 6)
    shifted = [head(0, i, qvar_l2_adjacent=a, qvar_l2_distant=a + 0.03 + 0.001 * i) for i, a in enumerate(adjacent)]
    assert "Positional structure detected: distant queries differ more than adjacent ones" in section(
        validation_report("m", shifted), 6)
    one = section(validation_report("m", hs[:1]), 6)
    assert "Positional structure: not applicable (needs both distances in at least 2 heads)" in one


def test_labels_are_descriptions_and_the_summary_counts_the_marked_checks():
    """Per-head lines say what a head is (never PASS/WARN/FAIL), and every
    [PASS]/[WARN]/[FAIL] marker in the text is one counted check of the SUMMARY."""
    uni = dict(mean_entropy_ratio=0.983, attn_class="uniform")
    hs = [head(0, 0), head(0, 1, **uni), head(0, 2, attn_class="medium", mean_entropy_ratio=0.7),
          head(1, 0, status="not_estimable", mean_entropy_ratio=float("nan"), attn_class="unknown",
               status_reason="not estimable from this capture: 3 of 900 query rows see every key")]
    text = validation_report("m", hs)
    per_head = [ln for ln in section(text, 5).splitlines() if ln.startswith("  L")]
    assert len(per_head) == 4
    assert not any(w in ln for ln in per_head for w in ("PASS", "WARN", "FAIL"))
    assert [ln.rsplit("[", 1)[1] for ln in per_head] == ["SHARP]", "UNIFORM]", "MEDIUM]", "NOT ESTIMABLE]"]
    body = text[: text.index("SUMMARY")]
    n_pass, n_total, n_warn, n_fail, _ = counts(text)
    assert (body.count("[PASS]"), body.count("[WARN]"), body.count("[FAIL]")) == (n_pass, n_warn, n_fail)
    assert n_pass + n_warn + n_fail == n_total


def test_not_estimable_heads_are_left_out_and_said_so():
    good = [head(0, 0), head(0, 1)]
    gone = dict(status="not_estimable", mean_key_coverage=0.125, n_exact_rows=2, exact_row_frac=0.001,
                status_reason="not estimable from this capture: 2 of 2000 query rows see every key they may "
                              "attend to (min_exact_rows = 100); mean key coverage 0.125",
                # the numbers of a not-estimable head are NaN; poison them to prove they are not read
                mean_entropy_ratio=0.99, local_attn_near=1.0, local_attn_far=1e-9, gain=-5.0,
                qvar_l2_distant=0.0, entropy_monotonic=None)
    text = validation_report("m", good + [head(1, 0, **gone), head(1, 1, **dict(gone, status="skipped"))])
    assert "heads: 4 (2 estimable from this capture; 2 not estimable from this capture)" in text
    assert ("[WARN] Attention is not estimable from this capture in 2/4 heads: too few query rows see every "
            "key they may attend to (mean key coverage 0.125)") in section(text, 1)
    assert "2 of 2000 query rows" in section(text, 1)
    assert "[PASS] Attention departs from uniform" in section(text, 4)  # 0.40 over the estimable heads
    assert "[PASS] Every head sharpens" in section(text, 7) and "gain=-5" not in text
    assert "2/2 sharp (100%), 0/2 medium (0%), 0/2 uniform (0%); 2 head(s) not estimable" in text
    assert "2 of 4 heads are not estimable from this capture and are left out." in text
    # nothing estimable: every pattern check is skipped and the conclusion says why
    none = validation_report("m", [head(1, 0, **gone)])
    assert "reconstructed correctly" not in none
    assert "CONCLUSION:\n" + "-" * 70 + "\nAttention is not estimable from this capture" in none
    for idx in (2, 3, 4, 6, 7):
        assert "not estimable from this capture (no head has enough exact query rows)" in section(none, idx)


def test_summaries_without_status_count_by_their_coverage():
    """Rows written before the status column: dense ones are exact, sparse ones are left out."""
    old = [head(0, 0, status=None), head(0, 1, status=None, mean_key_coverage=0.5)]
    text = validation_report("m", old)
    assert "heads: 2 (1 estimable from this capture; 1 not estimable from this capture)" in text


def test_deterministic_and_order_independent():
    hs = [head(3, 1), head(0, 2), head(0, 0, max_future_weight=0.5)]
    a = validation_report("m", hs)
    b = validation_report("m", list(reversed(hs)))
    assert a == b
    lines = [ln for ln in a.splitlines() if ln.startswith("  L") and "H/Hmax" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == ["L0 H0 (kv 0)", "L0 H2 (kv 2)", "L3 H1 (kv 1)"]
    assert a.isascii()


def test_empty_report():
    text = validation_report("m", [])
    assert "heads: 0" in text
    assert counts(text) == (0, 0, 0, 0, 9)
    assert "No check could be computed." in text


def test_report_from_real_head_metrics():
    rng = np.random.default_rng(0)
    n, d = 40, 8
    pos = np.tile(np.arange(n), 2).astype(float)
    ex = np.repeat([0, 1], n)
    q = TokenArrays(np.zeros(2 * n, np.int64), ex, pos, rng.normal(size=(2 * n, d)) * 2)
    k = TokenArrays(np.zeros(2 * n, np.int64), ex, pos, rng.normal(size=(2 * n, d)))
    _, summ, _ = head_attention_metrics(q, k)
    text = validation_report("real", [dict(summ, layer=0, q_head=0, k_head=0)])
    assert "[PASS] All rows sum to 1" in text and "[PASS] No future key has weight" in text
    assert "[PASS] Entropy falls monotonically" in text
