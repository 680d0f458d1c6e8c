"""`plasticity validate`: the attention validation report of one model's run.

Reads the per-head attention summaries (table ``head_attention_summary``)
of a model's run through a read-only connection -- the latest run unless a run
id is given -- and renders them with `warehouse.present.validation_report.validation_report`:
reconstruction sanity checks, key coverage, positional and token patterns, uniformity,
the per-head classes, query-side variation and the query-scale sweep, each check
marked PASS / WARN / FAIL (or SKIP). Heads whose attention is not estimable from the
capture (too few query rows see every key) are left out of every pattern check and
said so.

On request it adds the gain ratio of pairs of heads (a target/control
comparison: gain = slope of mean max_attn against log(query scale)).

No Dagster, no plotting; the command-line glue is `add_validate_parser`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from plasticity.attention import SUMMARY_COLUMNS, gain_ratio
from warehouse.store import db
from warehouse.settings.config import warehouse_option
from warehouse.settings.options import add_arguments, option
from warehouse.present.report_parts import (GAIN_RATIO_HIGHER, GAIN_RATIO_STRONG, NOT_ESTIMABLE, estimable,
                                            gain_ratio_meaning)
from warehouse.present.validation_report import report_counts, validation_report

__all__ = [
    "ValidationResult",
    "GainComparison",
    "load_head_summaries",
    "resolve_run_id",
    "parse_head",
    "compare_gains",
    "model_report",
    "add_validate_parser",
    "cmd_validate",
]

KEY_COLUMNS = ("layer", "q_head", "k_head")


@dataclass(frozen=True)
class GainComparison:
    """gain(target) / gain(control) for two heads, and the reading of it (`report_parts.gain_ratio_meaning`)."""

    target: tuple[int, int]
    control: tuple[int, int]
    gain_target: float
    gain_control: float
    ratio: float
    meaning: str

    def line(self) -> str:
        t, c = self.target, self.control
        return (f"gain ratio L{t[0]} H{t[1]} / L{c[0]} H{c[1]}: {_fmt(self.gain_target)} / "
                f"{_fmt(self.gain_control)} = {_fmt(self.ratio, '.2f')}x -> {self.meaning}")


@dataclass
class ValidationResult:
    model: str
    run_id: str
    text: str  # the full report, ending with a newline
    heads: list[dict]  # the summaries it was built from, sorted by (layer, q_head)
    counts: dict[str, int]  # passed, checks, warnings, failures, skipped
    gains: list[GainComparison] = field(default_factory=list)

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def failed(self) -> bool:
        return self.counts.get("failures", 0) > 0


def _fmt(x: float, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "nan"


def resolve_run_id(con, model: str, run_id: str | None = None) -> str:
    """``run_id`` if the model has that run, else the model's latest run; LookupError otherwise."""
    from warehouse.store.export import latest_run_id

    if run_id is None:
        return latest_run_id(con, model)
    row = con.execute("SELECT 1 FROM runs WHERE model = $m AND run_id = $r", {"m": model, "r": run_id}).fetchone()
    if row is None:
        known = [r[0] for r in con.execute(
            "SELECT run_id FROM runs WHERE model = $m ORDER BY started_at DESC", {"m": model}).fetchall()]
        raise LookupError(f"model {model!r} has no run {run_id!r} (runs: {', '.join(known) or 'none'})")
    return run_id


def load_head_summaries(con, model: str, run_id: str) -> list[dict]:
    """The run's rows of head_attention_summary as dicts, sorted by (layer, q_head); NULL -> None."""
    cols = ", ".join(KEY_COLUMNS + SUMMARY_COLUMNS)
    cur = con.execute(
        f"SELECT {cols} FROM head_attention_summary WHERE model = $m AND run_id = $r ORDER BY layer, q_head",
        {"m": model, "r": run_id},
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


_HEAD_RE = re.compile(r"^\s*L?(\d+)\s*[:,/ ]\s*[HQ]?(\d+)\s*$", re.IGNORECASE)


def parse_head(spec: str) -> tuple[int, int]:
    """'12:0' (also 'L12:H0', '12,0') -> (layer 12, query head 0)."""
    m = _HEAD_RE.match(str(spec))
    if not m:
        raise ValueError(f"bad head {spec!r}: expected LAYER:QHEAD, e.g. 12:0")
    return int(m[1]), int(m[2])


def compare_gains(heads: list[dict], pairs) -> list[GainComparison]:
    """One GainComparison per (target, control) pair of (layer, q_head); LookupError for an unknown head."""
    by_key = {(int(h["layer"]), int(h["q_head"])): h for h in heads}
    out = []
    for target, control in pairs:
        target, control = tuple(map(int, target)), tuple(map(int, control))
        for key in (target, control):
            if key not in by_key:
                known = ", ".join(f"{a}:{b}" for a, b in sorted(by_key)) or "none"
                raise LookupError(f"no attention summary for head {key[0]}:{key[1]} (heads: {known})")
        g_t, g_c = by_key[target].get("gain"), by_key[control].get("gain")
        g_t = float("nan") if g_t is None else float(g_t)
        g_c = float("nan") if g_c is None else float(g_c)
        r = gain_ratio(g_t, g_c)
        out_of_reach = [f"L{k[0]} H{k[1]}" for k in (target, control) if not estimable(by_key[k])]
        meaning = (f"undefined: {' and '.join(out_of_reach)} {'is' if len(out_of_reach) == 1 else 'are'} "
                   f"{NOT_ESTIMABLE}" if out_of_reach
                   else gain_ratio_meaning(r))
        out.append(GainComparison(target, control, g_t, g_c, r, meaning))
    return out


def _gain_section(gains: list[GainComparison]) -> str:
    rule = "=" * 70
    lines = [rule, f"GAIN RATIOS (target / control; >= {GAIN_RATIO_HIGHER:g}x higher sensitivity, "
                   f">= {GAIN_RATIO_STRONG:g}x head-specific)", rule]
    lines += [g.line() for g in gains]
    lines.append(rule)
    return "\n".join(lines) + "\n"


def model_report(
    warehouse: str | os.PathLike,
    model: str,
    run_id: str | None = None,
    *,
    gain_pairs=(),
    unicode: bool = False,
    timeout_s: float = 60.0,
    **thresholds,
) -> ValidationResult:
    """The validation report of ``model`` (latest run unless ``run_id``) from the warehouse.

    ``gain_pairs``: ((layer, q_head), (layer, q_head)) pairs whose gain ratio is appended.
    ``thresholds``: keyword arguments of `warehouse.present.validation_report.validation_report`.
    Raises LookupError when the model, the run or its attention summaries are missing.
    """
    with db.reader(warehouse, timeout_s) as con:
        run_id = resolve_run_id(con, model, run_id)
        heads = load_head_summaries(con, model, run_id)
    if not heads:
        raise LookupError(
            f"run {run_id} of model {model!r} has no attention summaries (table head_attention_summary); "
            "was it analysed with `attention: false`? Re-run the analysis with attention enabled.")
    text = validation_report(model, heads, run_id=run_id, unicode=unicode, **thresholds)
    counts = report_counts(text)
    gains = compare_gains(heads, gain_pairs) if gain_pairs else []
    if gains:
        text += _gain_section(gains)
    return ValidationResult(model, run_id, text, heads, counts, gains)


# --------------------------------------------------------------------------- command line


@dataclass
class ValidateOptions:
    """Options of `plasticity validate` (declared once: `warehouse.settings.options`)."""

    model: str = option(None, required=True, help="model in the warehouse")
    run_id: str | None = option(None, help="run of the model", default_text="its latest run")
    warehouse: str | None = warehouse_option()
    gain_ratio: list[str] | None = option(
        None, help="also print gain(TARGET) / gain(CONTROL) for two heads given as LAYER:QHEAD "
                   "(e.g. --gain-ratio 12:0 12:15); repeatable", accepts="two LAYER:QHEAD heads",
        cli_kwargs={"nargs": 2, "action": "append", "metavar": ("TARGET", "CONTROL")})
    unicode: bool = option(False, switch=True, help="add symbols after the PASS/WARN/FAIL markers")
    out: str | None = option(None, help="also write the report to this file", accepts="a file")


def add_validate_parser(sub) -> argparse.ArgumentParser:
    """`plasticity validate --model M [--run-id R] [--warehouse W] [--gain-ratio L:Q L:Q]... [--unicode]`."""
    p = sub.add_parser(
        "validate", help="print the attention validation report of a model's run",
        description="Sanity checks of the rebuilt attention (rows sum to 1, no future or out-of-window weight), "
                    "positional and token patterns, uniformity, per-head classes, query-side variation and the "
                    "query-scale sweep of one model's run, each marked PASS/WARN/FAIL. Exit status 0 when no "
                    "check failed, 1 when one did, 2 on an error.",
    )
    add_arguments(p, ValidateOptions)
    p.set_defaults(func=cmd_validate)
    return p


def cmd_validate(args: argparse.Namespace) -> int:
    pairs = [(parse_head(a), parse_head(b)) for a, b in (args.gain_ratio or [])]
    from warehouse.store.db import reading_warehouse

    warehouse = reading_warehouse(args.warehouse, args.model)
    res = model_report(warehouse, args.model, args.run_id, gain_pairs=pairs, unicode=args.unicode)
    out = sys.stdout
    try:
        out.write(res.text)
    except UnicodeEncodeError:  # a terminal that cannot show the symbols
        out.write(res.text.encode(out.encoding or "ascii", "replace").decode(out.encoding or "ascii"))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(res.text, encoding="utf-8")
    return 1 if res.failed else 0
