"""The parts the validation report is built from: the check markers and thresholds, how a head's
summary reads (`head_status`, `estimable`, NaN-tolerant numbers and formats), and the builder that
counts every marked check as it is written.
"""

from __future__ import annotations

import math
from typing import Any

from plasticity.attention import ESTIMABLE_STATUSES, STATUS_EXACT, STATUS_NOT_ESTIMABLE

#: Fixed reading of a target/control gain ratio: at least this much is higher sensitivity / head-specific.
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


def gain_ratio_meaning(ratio: float) -> str:
    """The fixed reading of a target/control gain ratio, naming the threshold it applies."""
    if not math.isfinite(ratio):
        return "undefined (a gain is missing or the control's gain is 0)"
    # a gain carries no standard error here, so a ratio is read against fixed thresholds only
    caveat = "; no standard error of a gain is computed, so this is a reading, not statistical evidence"
    if ratio >= GAIN_RATIO_STRONG:
        return f"head-specific by the fixed reading (ratio >= {GAIN_RATIO_STRONG:g}x{caveat})"
    if ratio >= GAIN_RATIO_HIGHER:
        return (f"higher sensitivity than the control by the fixed reading (ratio >= {GAIN_RATIO_HIGHER:g}x, "
                f"< {GAIN_RATIO_STRONG:g}x{caveat})")
    return f"no distinction by the fixed reading (ratio < {GAIN_RATIO_HIGHER:g}x{caveat})"
