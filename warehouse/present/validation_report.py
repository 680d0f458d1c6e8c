"""Plain-text attention validation report, built from per-head summaries.

Pure string building: no I/O, no clock, no randomness. Input dicts carry the keys of
``plasticity.attention.SUMMARY_COLUMNS`` plus ``layer``, ``q_head``, ``k_head``; missing
keys and ``None`` read as NaN. Heads are sorted by (layer, q_head, k_head), so the text
does not depend on the order of ``head_summaries``.

Only heads whose attention is estimable from the capture (``status`` 'exact' or 'partial':
enough query rows see every key they may attend to) enter the pattern checks, the per-head
classes and the sweep; the others are listed as "not estimable from this capture" with their
reason, and the conclusion says so. A summary without ``status`` (a warehouse written before
it existed) counts as exact when its mean key coverage is 1 and as not estimable otherwise.
The reconstruction checks (rows sum to 1, no future or out-of-window weight) test the
arithmetic, so they cover every head where rows were computed.

Every counted check ends in exactly one status:

    [PASS]  the property holds
    [WARN]  legal but worth a look (no local bias, partial or no coverage, flat gain, ...)
    [FAIL]  wrong reconstruction, or attention indistinguishable from uniform/constant
    [SKIP]  not computable from these summaries (no windowed head, no token_str, ...)

``[INFO]`` lines are context and are not counted. The per-head table labels each head with
what it is -- its class (``[SHARP]``, ``[MEDIUM]``, ``[UNIFORM]``) or ``[NOT ESTIMABLE]`` --
never with a PASS/WARN/FAIL word, so the SUMMARY counts are exactly the checks marked above.
With ``unicode=True`` a symbol follows each marker (check mark, warning sign, cross, info
sign); the ASCII markers are always present.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any, Sequence

from plasticity.attention import (
    ESTIMABLE_STATUSES, STATUS_EXACT, STATUS_NOT_ESTIMABLE, STATUS_PARTIAL, attention_class, gain_ratio,
)

__all__ = ["validation_report", "report_counts", "gain_ratio_meaning", "head_status", "estimable",
           "GAIN_RATIO_HIGHER", "GAIN_RATIO_STRONG", "PASS", "WARN", "FAIL", "SKIP", "INFO"]

#: The reading of a gain ratio: at least this much is higher sensitivity / strong evidence.
GAIN_RATIO_HIGHER = 1.5
GAIN_RATIO_STRONG = 2.0
NOT_ESTIMABLE = "not estimable from this capture"

PASS, WARN, FAIL, SKIP, INFO = "PASS", "WARN", "FAIL", "SKIP", "INFO"
_SYMBOL = {PASS: "\u2713", WARN: "\u26a0", FAIL: "\u274c", SKIP: "\u2013", INFO: "\u2139"}
_RULE = "=" * 70
_SUB = "-" * 70
_N_SECTIONS = 7


def _num(x: Any) -> float:
    if x is None:
        return float("nan")
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _fin(x: Any) -> bool:
    return math.isfinite(_num(x))


def _f(x: Any, fmt: str = ".4f") -> str:
    v = _num(x)
    return format(v, fmt) if math.isfinite(v) else "nan"


def _mean(values) -> float:
    vals = [_num(v) for v in values]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _label(h: dict) -> str:
    return f"L{_int(h.get('layer'))} H{_int(h.get('q_head'))} (kv {_int(h.get('k_head'))})"


def _int(x: Any) -> str:
    v = _num(x)
    return str(int(v)) if math.isfinite(v) else "?"


def head_status(h: dict) -> str:
    """The head's ``status``; for summaries without one, 'exact' when its mean key coverage is 1
    and 'not_estimable' otherwise."""
    status = h.get("status")
    if status:
        return str(status)
    return STATUS_EXACT if _num(h.get("mean_key_coverage")) == 1.0 else STATUS_NOT_ESTIMABLE


def estimable(h: dict) -> bool:
    """Whether the head's attention is estimable from its capture (exact or partial)."""
    return head_status(h) in ESTIMABLE_STATUSES


def _sort_key(h: dict):
    def k(name):
        v = _num(h.get(name))
        return (0, v) if math.isfinite(v) else (1, 0.0)

    return (k("layer"), k("q_head"), k("k_head"))


class _Builder:
    def __init__(self, use_unicode: bool, max_listed: int):
        self.lines: list[str] = []
        self.results: list[tuple[str, str, str]] = []  # (status, section, message)
        self.use_unicode = use_unicode
        self.max_listed = max_listed
        self.section = ""

    def mark(self, status: str) -> str:
        m = f"[{status}]"
        return f"{m} {_SYMBOL[status]}" if self.use_unicode else m

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def check(self, status: str, message: str) -> None:
        self.results.append((status, self.section, message))
        self.add(f"{self.mark(status)} {message}")

    def info(self, message: str) -> None:
        self.add(f"{self.mark(INFO)} {message}")

    def listing(self, heads: list[dict], fmt) -> None:
        for h in heads[: self.max_listed]:
            self.add(f"    - {_label(h)}: {fmt(h)}")
        if len(heads) > self.max_listed:
            self.add(f"    ... and {len(heads) - self.max_listed} more")

    def start(self, idx: int, title: str) -> None:
        self.section = title
        self.add("")
        self.add(f"[{idx}/{_N_SECTIONS}] {title}")
        self.add(_SUB)


def validation_report(
    model: str,
    head_summaries: Sequence[dict],
    *,
    run_id: str | None = None,
    row_sum_tol: float = 1e-6,
    future_tol: float = 0.0,
    local_bias_min: float = 1.1,
    same_token_min: float = 1.05,
    sharp_max: float = 0.5,
    uniform_min: float = 0.95,
    qvar_pass: float = 0.05,
    qvar_fail: float = 0.02,
    gain_min: float = 0.0,
    unicode: bool = False,
    max_listed: int = 10,
) -> str:
    """The validation report of one model as text (ends with a newline).

    Thresholds:
      row_sum_tol     FAIL when any row sum differs from 1 by more (default 1e-6)
      future_tol      FAIL when any future / out-of-window key weighs more (default 0)
      local_bias_min  PASS when mean near/far attention ratio >= this, else WARN
      same_token_min  PASS when same/different-token attention ratio >= this, else WARN
      sharp_max, uniform_min
                      classes for heads without ``attn_class``; FAIL "nearly uniform"
                      when the mean entropy_ratio over heads >= uniform_min
      qvar_pass, qvar_fail
                      distant-query (dpos=10) L2 variation: PASS >= qvar_pass,
                      FAIL < qvar_fail, WARN in between (defaults 0.05 / 0.02)
      gain_min        PASS when every head's gain > gain_min, else WARN
    """
    heads = sorted((dict(h) for h in head_summaries), key=_sort_key)
    usable = [h for h in heads if estimable(h)]
    b = _Builder(bool(unicode), int(max_listed))
    b.add(_RULE)
    b.add("ATTENTION VALIDATION REPORT")
    b.add(_RULE)
    b.add(f"model: {model}")
    if run_id is not None:
        b.add(f"run: {run_id}")
    n_partial = sum(1 for h in usable if head_status(h) == STATUS_PARTIAL)
    b.add(f"heads: {len(heads)} ({len(usable)} estimable from this capture"
          + (f", {n_partial} of them partial" if n_partial else "")
          + (f"; {len(heads) - len(usable)} {NOT_ESTIMABLE}" if len(usable) < len(heads) else "") + ")")
    windows = sorted({int(_num(h.get('sliding_window'))) for h in heads if _fin(h.get("sliding_window"))})
    b.add(f"sliding windows: {', '.join(map(str, windows)) if windows else 'none (full causal)'}")

    _sanity(b, heads, row_sum_tol, future_tol)
    _coverage(b, heads)
    _positional(b, usable, local_bias_min)
    _tokens(b, usable, same_token_min)
    _statistical(b, usable, uniform_min)
    _per_head(b, heads, sharp_max, uniform_min)
    _query_variation(b, usable, qvar_pass, qvar_fail)
    _sweep(b, usable, gain_min)
    _summary(b, heads, usable)
    b.add(_RULE)
    return "\n".join(b.lines) + "\n"


# --------------------------------------------------------------------------- sections


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


def _ratio_check(b: _Builder, ratio: float, minimum: float, pass_msg: str, warn_msg: str) -> None:
    """PASS when ``ratio`` is finite and at least ``minimum``, WARN otherwise."""
    if math.isfinite(ratio) and ratio >= minimum:
        b.check(PASS, pass_msg)
    else:
        b.check(WARN, warn_msg)


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
    msg = f"(nearby <= {lw_txt} positions: {near:.4f}, far: {far:.4f}, ratio: {_f(ratio, '.2f')}x)"
    _ratio_check(b, ratio, local_bias_min, f"Local bias {msg}", f"No local bias {msg}")
    n_local = sum(1 for h in ok if _num(h.get("local_bias_ratio")) >= local_bias_min)
    b.info(f"{n_local}/{len(ok)} heads have a local bias ratio >= {local_bias_min:.2f}x")


def _tokens(b: _Builder, heads, same_token_min) -> None:
    ok = _section(b, 3, "Token-Level Patterns", heads, "Repeated tokens", ("same_token_attn", "diff_token_attn"),
                  "token_str not captured (or no repeated token seen)")
    if ok is None:
        return
    same, diff, ratio = _mean_ratio(ok, "same_token_attn", "diff_token_attn")
    msg = f"(same: {same:.4f}, diff: {diff:.4f}, ratio: {_f(ratio, '.2f')}x)"
    _ratio_check(b, ratio, same_token_min, f"Repeated tokens attract {msg}", f"Repeated tokens do not attract {msg}")
    b.info(f"computed over {len(ok)}/{len(heads)} heads")


def _statistical(b: _Builder, heads, uniform_min) -> None:
    ok = _section(b, 4, "Statistical Tests (vs Uniform)", heads, "Entropy", ("mean_entropy_ratio",),
                  "no head has a finite entropy ratio")
    if ok is None:
        return
    ratio = _mean(h["mean_entropy_ratio"] for h in ok)
    if ratio >= uniform_min:
        b.check(FAIL, f"Nearly uniform (H/H_max: {ratio:.3f} >= {uniform_min:.2f})")
    else:
        b.check(PASS, f"Attention departs from uniform (H/H_max: {ratio:.3f} < {uniform_min:.2f})")
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
    if far_m >= qvar_pass:
        b.check(PASS, f"Different queries attend differently (L2={far_m:.4f} >= {qvar_pass:.2f})")
    elif far_m < qvar_fail:
        b.check(FAIL, f"Queries attend alike (L2={far_m:.4f} < {qvar_fail:.2f})")
    else:
        b.check(WARN, f"Weak query variation (L2={far_m:.4f}, between {qvar_fail:.2f} and {qvar_pass:.2f})")
    if math.isfinite(adj_m):
        if far_m > adj_m:
            b.info("Positional structure detected (distant > adjacent)")
        else:
            b.info("No positional structure (distant <= adjacent)")


def _sweep(b: _Builder, heads, gain_min) -> None:
    ok = _section(b, 7, "Query-Scale Sweep (gain = d mean max_attn / d log scale)", heads, "Query-scale sweep",
                  ("gain",), "no head has a gain")
    if ok is None:
        return
    for h in ok:
        mono = {True: "yes", False: "NO"}.get(h.get("entropy_monotonic"), "n/a")
        b.add(f"  {_label(h)}: gain={_f(h['gain'])} (R2={_f(h.get('gain_r2'), '.3f')}) "
              f"entropy falls monotonically: {mono}")
    not_mono = [h for h in ok if h.get("entropy_monotonic") is not True]
    if not_mono:
        b.check(WARN, f"Entropy does not fall monotonically with query scale in "
                      f"{len(not_mono)}/{len(ok)} heads")
        b.listing(not_mono, lambda h: f"gain={_f(h['gain'])}")
    else:
        b.check(PASS, f"Entropy falls monotonically with query scale in all {len(ok)} heads")
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
        b.info(f"Most sensitive: {_label(top)} gain={_f(top['gain'])}; median gain={med:.4f}; "
               f"ratio to the median {r:.2f}x -> {gain_ratio_meaning(r)}")
    else:
        b.info(f"Most sensitive: {_label(top)} gain={_f(top['gain'])}; median gain={med:.4f}")


def gain_ratio_meaning(ratio: float) -> str:
    """The reading of a target/control gain ratio, naming the threshold it applies."""
    if not math.isfinite(ratio):
        return "undefined (a gain is missing or the control's gain is 0)"
    if ratio >= GAIN_RATIO_STRONG:
        return f"strong evidence of head-specific exploitation (ratio >= {GAIN_RATIO_STRONG:g}x)"
    if ratio >= GAIN_RATIO_HIGHER:
        return (f"higher sensitivity than the typical head (ratio >= {GAIN_RATIO_HIGHER:g}x, "
                f"< {GAIN_RATIO_STRONG:g}x)")
    return f"no functional distinction (universal mechanism; ratio < {GAIN_RATIO_HIGHER:g}x)"


_COUNT_LINES = {"passed": "Passed: ", "warnings": "Warnings: ", "failures": "Failures: ", "skipped": "Skipped: "}


def report_counts(text: str) -> dict[str, int]:
    """Counts from the SUMMARY of a report: passed, checks (counted), warnings, failures, skipped."""
    out: dict[str, int] = {}
    for line in text[text.rindex("SUMMARY"):].splitlines():
        for key, prefix in _COUNT_LINES.items():
            if line.startswith(prefix) and key not in out:
                value = line[len(prefix):].split()[0]
                if key == "passed":
                    passed, total = value.split("/")
                    out["passed"], out["checks"] = int(passed), int(total)
                else:
                    out[key] = int(value)
    return out


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
