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

The markers, thresholds and the builder are in `warehouse.present.report_parts`, the sections in
`warehouse.present.report_sections`.
"""

from __future__ import annotations

from typing import Sequence

from plasticity.attention import STATUS_PARTIAL
from warehouse.present.report_parts import (NOT_ESTIMABLE, _RULE, _Builder, _fin, _num, _sort_key, estimable,
                                            head_status)
from warehouse.present.report_sections import (_coverage, _per_head, _positional, _query_variation, _sanity,
                                               _statistical, _summary, _sweep, _tokens)

__all__ = ["validation_report", "report_counts"]


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
