"""The sections of the validation report, in order: reconstruction sanity, key coverage, positional and
token patterns, statistics, the per-head table, query-side variation, the query-scale sweep, and the
summary with its counts. Each writes its lines and checks through the report's builder.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Sequence

from plasticity.attention import STATUS_EXACT, STATUS_PARTIAL, attention_class, gain_ratio
from plasticity.mean_interval import t_interval_of_mean
from warehouse.present.report_parts import (FAIL, NOT_ESTIMABLE, PASS, SKIP, WARN, _RULE, _SUB, _Builder, _f, _fin,
                                            _int, _label, _mean, _num, _sort_key, estimable, head_status)

def _ceiling_check(b: _Builder, heads, key: str, tol: float, *, none: str, fail, ok, item) -> None:
    """One reconstruction check: PASS when every head that has ``key`` is within ``tol``, FAIL
    (listing the heads above it, ``item(h)`` a line each) otherwise, SKIP when no head has it.
    ``fail(n_bad, n, worst)`` and ``ok(n, worst)`` word the verdict."""
    have = [h for h in heads if _fin(h.get(key))]
    if not have:
        b.check(SKIP, none)
        return
    worst = max(_num(h[key]) for h in have)
    bad = [h for h in have if _num(h[key]) > tol]
    if bad:
        b.check(FAIL, fail(len(bad), len(have), worst))
        b.listing(bad, item)
    else:
        b.check(PASS, ok(len(have), worst))


def _sanity(b: _Builder, heads, row_sum_tol, future_tol) -> None:
    b.start(1, "Sanity Checks (Reconstruction and Key Coverage)")
    _ceiling_check(
        b, heads, "max_row_sum_error", row_sum_tol,
        none="Row sums: no attention row was computed",
        fail=lambda nb, n, worst: f"{nb}/{n} heads have rows not summing to 1 within "
                                  f"{row_sum_tol:.0e} (max error: {worst:.2e})",
        ok=lambda n, worst: f"All rows sum to 1 within {row_sum_tol:.0e} (max error: {worst:.2e})",
        item=lambda h: f"max |row sum - 1| = {_f(h['max_row_sum_error'], '.2e')}",
    )
    _ceiling_check(
        b, heads, "max_future_weight", future_tol,
        none="Causality: no attention row was computed",
        fail=lambda nb, n, worst: f"Non-causal attention in {nb}/{n} heads (max future weight: {worst:.3g})",
        ok=lambda n, worst: f"No future key has weight (max future weight: {worst:.3g})",
        item=lambda h: f"max future weight = {_f(h['max_future_weight'], '.3g')}",
    )
    _ceiling_check(
        b, [h for h in heads if _fin(h.get("sliding_window"))], "max_window_weight", future_tol,
        none="Sliding window: no windowed head",
        fail=lambda nb, n, worst: f"Keys outside the sliding window have weight in {nb}/{n} heads (max: {worst:.3g})",
        ok=lambda n, worst: f"No key outside the sliding window has weight in {n} windowed heads (max: {worst:.3g})",
        item=lambda h: f"max out-of-window weight = {_f(h['max_window_weight'], '.3g')}",
    )


def _coverage(b: _Builder, heads) -> None:
    """Whether the capture holds every key the queries attend to (end of section 1)."""
    if not heads:
        b.check(SKIP, "Key coverage: no head")
        return
    by = {s: [h for h in heads if head_status(h) == s] for s in (STATUS_EXACT, STATUS_PARTIAL)}
    out = [h for h in heads if not estimable(h)]
    if len(by[STATUS_EXACT]) == len(heads):
        b.check(PASS, "Keys captured densely in every head: every query row sees all its keys, attention is exact")
        return
    if by[STATUS_PARTIAL]:
        frac = _mean(h.get("exact_row_frac") for h in by[STATUS_PARTIAL])
        b.check(WARN, f"{len(by[STATUS_PARTIAL])}/{len(heads)} heads are partial: their summaries use only the "
                      f"query rows that see every key ({_f(100 * frac, '.1f')}% of rows on average)")
        b.listing(by[STATUS_PARTIAL], lambda h: str(h.get("status_reason") or ""))
    if out:
        cov = _mean(h.get("mean_key_coverage") for h in out)
        b.check(WARN, f"Attention is {NOT_ESTIMABLE} in {len(out)}/{len(heads)} heads: too few query rows see "
                      f"every key they may attend to (mean key coverage {_f(cov, '.3f')}); they are left out "
                      "of every check below")
        b.listing(out, lambda h: str(h.get("status_reason") or f"status {head_status(h)}"))


def _mean_ratio(heads, num_key: str, den_key: str) -> tuple[float, float, float]:
    """Means of two per-head values over ``heads`` and their ratio (NaN unless the second is > 0)."""
    num = _mean(h[num_key] for h in heads)
    den = _mean(h[den_key] for h in heads)
    return num, den, (num / den if den > 0 else float("nan"))


def _ratio_check(b: _Builder, ratio: float, minimum: float, pass_msg: str, warn_msg: str,
                 undecided_msg: str | None = None) -> None:
    """PASS when ``ratio`` is finite and at least ``minimum``, WARN otherwise; WARN with
    ``undecided_msg`` when the heads' interval reaches across ``minimum``."""
    if undecided_msg is not None:
        b.check(WARN, undecided_msg)
    elif math.isfinite(ratio) and ratio >= minimum:
        b.check(PASS, pass_msg)
    else:
        b.check(WARN, warn_msg)


def _spread(values, thresholds: Sequence[float]) -> tuple[str, bool]:
    """The uncertainty of a mean over heads: (text with its 95% t-interval (`t_interval_of_mean`),
    whether the interval reaches across one of the thresholds: then these heads do not decide)."""
    vals = [_num(v) for v in values if _fin(v)]
    if len(vals) < 2:
        return "; uncertainty not applicable (one head)", False
    m, lo, hi = t_interval_of_mean(vals)
    across = [t for t in thresholds if lo < t < hi]
    tail = f"; the interval includes {', '.join(f'{t:g}' for t in across)}" if across else ""
    return f"; per-head mean {m:.4f}, 95% t-interval [{lo:.4f}, {hi:.4f}] over {len(vals)} heads{tail}", bool(across)


def _section(b: _Builder, idx: int, title: str, heads, what: str, keys: tuple[str, ...], none: str):
    """Open section ``idx``; the heads with every ``keys`` finite, or None after a SKIP line (no
    estimable head at all, or ``none`` when no head has the values)."""
    b.start(idx, title)
    if not heads:
        b.check(SKIP, f"{what}: {NOT_ESTIMABLE} (no head has enough exact query rows)")
        return None
    ok = [h for h in heads if all(_fin(h.get(k)) for k in keys)]
    if not ok:
        b.check(SKIP, f"{what}: {none}")
        return None
    return ok


def _positional(b: _Builder, heads, local_bias_min) -> None:
    ok = _section(b, 2, "Positional Patterns", heads, "Local bias", ("local_attn_near", "local_attn_far"),
                  "no query has both near and far keys")
    if ok is None:
        return
    lw = sorted({int(_num(h.get("local_window"))) for h in heads if _fin(h.get("local_window"))})
    lw_txt = "/".join(map(str, lw)) if lw else "?"
    near, far, ratio = _mean_ratio(ok, "local_attn_near", "local_attn_far")
    spread, undecided = _spread([h.get("local_bias_ratio") for h in ok], [local_bias_min])
    msg = (f"(nearby <= {lw_txt} positions: {near:.4f}, far: {far:.4f}, ratio: {_f(ratio, '.2f')}x, threshold "
           f"{local_bias_min:g}x{spread})")
    _ratio_check(b, ratio, local_bias_min, f"Local bias {msg}", f"No local bias {msg}",
                 f"Local bias not decided by these heads {msg}" if undecided else None)
    n_local = sum(1 for h in ok if _num(h.get("local_bias_ratio")) >= local_bias_min)
    b.info(f"{n_local}/{len(ok)} heads have a local bias ratio >= {local_bias_min:.2f}x")


def _tokens(b: _Builder, heads, same_token_min) -> None:
    ok = _section(b, 3, "Token-Level Patterns", heads, "Repeated tokens", ("same_token_attn", "diff_token_attn"),
                  "token_str not captured (or no repeated token seen)")
    if ok is None:
        return
    same, diff, ratio = _mean_ratio(ok, "same_token_attn", "diff_token_attn")
    spread, undecided = _spread([h.get("same_token_ratio") for h in ok], [same_token_min])
    msg = f"(same: {same:.4f}, diff: {diff:.4f}, ratio: {_f(ratio, '.2f')}x, threshold {same_token_min:g}x{spread})"
    _ratio_check(b, ratio, same_token_min, f"Repeated tokens attract {msg}", f"Repeated tokens do not attract {msg}",
                 f"Repeated-token attraction not decided by these heads {msg}" if undecided else None)
    b.info(f"computed over {len(ok)}/{len(heads)} heads")


def _statistical(b: _Builder, heads, uniform_min) -> None:
    ok = _section(b, 4, "Statistical Tests (vs Uniform)", heads, "Entropy", ("mean_entropy_ratio",),
                  "no head has a finite entropy ratio")
    if ok is None:
        return
    ratio = _mean(h["mean_entropy_ratio"] for h in ok)
    spread, undecided = _spread([h["mean_entropy_ratio"] for h in ok], [uniform_min])
    if undecided:
        b.check(WARN, f"Uniformity not decided by these heads (H/H_max: {ratio:.3f}, threshold {uniform_min:.2f}"
                      f"{spread})")
    elif ratio >= uniform_min:
        b.check(FAIL, f"Nearly uniform (H/H_max: {ratio:.3f} >= {uniform_min:.2f}{spread})")
    else:
        b.check(PASS, f"Attention departs from uniform (H/H_max: {ratio:.3f} < {uniform_min:.2f}{spread})")
    b.info(f"mean row_std: {_f(_mean(h.get('row_std') for h in heads))}, "
           f"mean max_attn: {_f(_mean(h.get('mean_max_attn') for h in heads))}, "
           f"mean k_eff: {_f(_mean(h.get('mean_k_eff') for h in heads), '.2f')} of "
           f"{_f(_mean(h.get('mean_n_keys') for h in heads), '.1f')} keys")


def _per_head(b: _Builder, heads, sharp_max, uniform_min) -> None:
    """One line per head labelled with what it is (class or not estimable); not a check."""
    b.start(5, "Per-Head Analysis")
    counts = {"sharp": 0, "medium": 0, "uniform": 0, "unknown": 0}
    n_out = 0
    for h in heads:
        if not estimable(h):
            n_out += 1
            b.add(f"  {_label(h)}: cov={_f(h.get('mean_key_coverage'), '.3f')} "
                  f"exact rows={_int(h.get('n_exact_rows'))}/{_int(h.get('n_queries'))} [NOT ESTIMABLE]")
            continue
        cls = h.get("attn_class")
        if cls not in counts:
            cls = attention_class(_num(h.get("mean_entropy_ratio")), sharp_max, uniform_min)
        counts[cls] += 1
        part = f" exact rows={_int(h.get('n_exact_rows'))}/{_int(h.get('n_queries'))}" \
            if head_status(h) == STATUS_PARTIAL else ""
        b.add(f"  {_label(h)}: H/Hmax={_f(h.get('mean_entropy_ratio'), '.3f')} "
              f"row_std={_f(h.get('row_std'))} max_attn={_f(h.get('mean_max_attn'), '.3f')} "
              f"k_eff={_f(h.get('mean_k_eff'), '.1f')} cov={_f(h.get('mean_key_coverage'), '.3f')}{part} "
              f"[{cls.upper()}]")
    n = len(heads) - n_out

    def pct(c):
        return f"{100.0 * c / n:.0f}%" if n else "n/a"

    line = (f"  Summary: {counts['sharp']}/{n} sharp ({pct(counts['sharp'])}), "
            f"{counts['medium']}/{n} medium ({pct(counts['medium'])}), "
            f"{counts['uniform']}/{n} uniform ({pct(counts['uniform'])})")
    if counts["unknown"]:
        line += f", {counts['unknown']}/{n} unknown"
    if n_out:
        line += f"; {n_out} head(s) {NOT_ESTIMABLE}"
    b.add("")
    b.add(line)
    b.info(f"classes by mean entropy ratio: sharp <= {sharp_max:g}, uniform >= {uniform_min:g} "
           "(labels describe the heads; they are not checks)")


def _query_variation(b: _Builder, heads, qvar_pass, qvar_fail) -> None:
    if _section(b, 6, "Query-Side Variation (Do different queries attend differently?)", heads, "Query variation",
                (), "") is None:
        return
    adj = [h for h in heads if _fin(h.get("qvar_l2_adjacent"))]
    far = [h for h in heads if _fin(h.get("qvar_l2_distant"))]
    adj_m = _mean(h["qvar_l2_adjacent"] for h in adj)
    far_m = _mean(h["qvar_l2_distant"] for h in far)
    n_adj = sum(int(_num(h.get("qvar_pairs_adjacent"))) for h in adj if _fin(h.get("qvar_pairs_adjacent")))
    n_far = sum(int(_num(h.get("qvar_pairs_distant"))) for h in far if _fin(h.get("qvar_pairs_distant")))
    b.add(f"  Adjacent queries (dpos=1):  L2={_f(adj_m)} over {n_adj} pairs in {len(adj)} heads")
    b.add(f"  Distant queries (dpos=10):  L2={_f(far_m)} over {n_far} pairs in {len(far)} heads")
    if not far:
        b.check(SKIP, "Query variation: no query pair 10 positions apart with >= 2 shared keys")
        return
    spread, undecided = _spread([h["qvar_l2_distant"] for h in far], [qvar_fail, qvar_pass])
    if undecided:
        b.check(WARN, f"Query variation not decided by these heads (L2={far_m:.4f}, thresholds {qvar_fail:.2f} "
                      f"and {qvar_pass:.2f}{spread})")
    elif far_m >= qvar_pass:
        b.check(PASS, f"Different queries attend differently (L2={far_m:.4f} >= {qvar_pass:.2f}{spread})")
    elif far_m < qvar_fail:
        b.check(FAIL, f"Queries attend alike (L2={far_m:.4f} < {qvar_fail:.2f}{spread})")
    else:
        b.check(WARN, f"Weak query variation (L2={far_m:.4f}, between {qvar_fail:.2f} and {qvar_pass:.2f}{spread})")
    _positional_structure(b, heads)


#: Smallest difference (distant - adjacent, relative to the adjacent distance) read as positional structure.
POSITIONAL_MIN_REL = 0.05


def _positional_structure(b: _Builder, heads) -> None:
    """Whether queries 10 positions apart differ more than adjacent ones: per head the difference of
    the two mean L2 distances, and the 95% t-interval of its mean over heads. Structure is reported
    only when the whole interval lies above POSITIONAL_MIN_REL of the mean adjacent distance (a
    difference that is there, and not negligible); otherwise the line says there is no evidence."""
    both = [h for h in heads if _fin(h.get("qvar_l2_adjacent")) and _fin(h.get("qvar_l2_distant"))]
    if len(both) < 2:
        b.info("Positional structure: not applicable (needs both distances in at least 2 heads)")
        return
    m, lo, hi = t_interval_of_mean([_num(h["qvar_l2_distant"]) - _num(h["qvar_l2_adjacent"]) for h in both])
    floor = POSITIONAL_MIN_REL * _mean(h["qvar_l2_adjacent"] for h in both)
    stats = (f"mean per-head difference distant - adjacent {m:.4f}, 95% t-interval [{lo:.4f}, {hi:.4f}] "
             f"over {len(both)} heads; threshold {POSITIONAL_MIN_REL:.0%} of the adjacent distance = {floor:.4f}")
    if lo > floor:
        b.info(f"Positional structure detected: distant queries differ more than adjacent ones ({stats}; "
               "the interval lies above it)")
    elif hi < -floor:
        b.info(f"No evidence of positional structure: adjacent queries differ more than distant ones ({stats}; "
               "the interval lies below minus it)")
    else:
        b.info(f"No evidence of positional structure ({stats}; the interval reaches below it)")


def _sweep(b: _Builder, heads, gain_min) -> None:
    ok = _section(b, 7, "Query-Scale Sweep (gain = d mean max_attn / d log scale)", heads, "Query-scale sweep",
                  ("gain",), "no head has a gain")
    if ok is None:
        return
    for h in ok:
        mono = {True: "yes", False: "NO"}.get(h.get("entropy_monotonic"), "n/a")
        b.add(f"  {_label(h)}: gain={_f(h['gain'])} (R2={_f(h.get('gain_r2'), '.3f')}) "
              f"entropy falls monotonically: {mono}")
    # monotonicity is a property of the mean entropies; a head whose mean entropy is undefined (no
    # exact row at position >= 2) has none, and is not counted either way
    judged = [h for h in ok if h.get("entropy_monotonic") in (True, False)]
    if not judged:
        b.check(SKIP, f"Entropy monotonicity: not applicable (mean entropy undefined in all {len(ok)} heads)")
    elif any(h.get("entropy_monotonic") is False for h in judged):
        not_mono = [h for h in judged if h.get("entropy_monotonic") is False]
        b.check(WARN, f"Entropy does not fall monotonically with query scale in "
                      f"{len(not_mono)}/{len(judged)} heads")
        b.listing(not_mono, lambda h: f"gain={_f(h['gain'])}")
    else:
        b.check(PASS, f"Entropy falls monotonically with query scale in all {len(judged)} heads")
    if judged and len(judged) < len(ok):
        b.info(f"Entropy monotonicity not applicable in {len(ok) - len(judged)}/{len(ok)} heads "
               "(mean entropy undefined)")
    flat = [h for h in ok if _num(h["gain"]) <= gain_min]
    if flat:
        b.check(WARN, f"{len(flat)}/{len(ok)} heads do not sharpen with query scale (gain <= {gain_min:g})")
        b.listing(flat, lambda h: f"gain={_f(h['gain'])}")
    else:
        b.check(PASS, f"Every head sharpens with query scale (gain > {gain_min:g})")
    gains = [_num(h["gain"]) for h in ok]
    top = max(ok, key=lambda h: (_num(h["gain"]), [-x[1] for x in _sort_key(h)]))
    med = median(gains)
    r = gain_ratio(_num(top["gain"]), med)
    if math.isfinite(r):
        # the top head is picked after seeing every gain, so its ratio to the median is a description,
        # not a test: the largest of n values always stands above their median
        b.info(f"Most sensitive: {_label(top)} gain={_f(top['gain'])}; median gain={med:.4f}; "
               f"ratio to the median {r:.2f}x (the largest of {len(ok)} gains, chosen after seeing them: "
               "a description, no evidence of head-specific exploitation either way)")
    else:
        b.info(f"Most sensitive: {_label(top)} gain={_f(top['gain'])}; median gain={med:.4f}")


def _summary(b: _Builder, heads, usable) -> None:
    b.add("")
    b.add(_RULE)
    b.add("SUMMARY")
    b.add(_RULE)
    counted = [r for r in b.results if r[0] != SKIP]
    n_pass = sum(1 for r in counted if r[0] == PASS)
    n_warn = sum(1 for r in counted if r[0] == WARN)
    n_fail = sum(1 for r in counted if r[0] == FAIL)
    n_skip = len(b.results) - len(counted)
    b.add(f"Passed: {n_pass}/{len(counted)} checks")
    b.add(f"Warnings: {n_warn}")
    for status, section, msg in counted:
        if status == WARN:
            b.add(f"   - {section}: {msg}")
    b.add(f"Failures: {n_fail}")
    for status, section, msg in counted:
        if status == FAIL:
            b.add(f"   - {section}: {msg}")
    b.add(f"Skipped: {n_skip}")
    b.add("")
    b.add(_SUB)
    b.add("CONCLUSION:")
    b.add(_SUB)
    sanity_fail = any(s == FAIL and sec.startswith("Sanity") for s, sec, _ in counted)
    n_out = len(heads) - len(usable)
    if not heads:
        b.add("No check could be computed.")
    elif sanity_fail:
        b.add("The attention reconstruction is wrong (row sums or masking); do not trust the")
        b.add("other numbers until it is fixed.")
    elif not usable:
        b.add(f"Attention is {NOT_ESTIMABLE}: no head has enough query rows that see every")
        b.add("key they may attend to, so no pattern, class or gain is reported.")
        if any(sec.startswith("Sanity") and st == PASS for st, sec, _ in counted):
            b.add("(The reconstruction checks above cover the arithmetic of the computed rows only.)")
    else:
        others = [r for r in counted if not r[1].startswith("Sanity")]
        if any(r[0] == FAIL for r in others):
            b.add("Attention is reconstructed correctly but may not carry meaningful patterns")
            b.add("(see failures above).")
        elif any(r[0] == WARN for r in others):
            b.add("Attention is reconstructed correctly; see warnings above.")
        else:
            b.add("Attention is reconstructed correctly and shows structure.")
        n_partial = sum(1 for h in usable if head_status(h) == STATUS_PARTIAL)
        if n_partial:
            b.add(f"{n_partial} of {len(heads)} heads are partial: their numbers come from the query rows")
            b.add("that see every key only.")
        if n_out:
            b.add(f"{n_out} of {len(heads)} heads are {NOT_ESTIMABLE} and are left out.")
