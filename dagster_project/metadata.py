"""Materialization metadata: row counts, markdown previews, embedded plots, check results."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import dagster as dg
import pandas as pd

from dagster_project.quality import CheckOutcome

MAX_EMBEDDED_PNG_BYTES = 2_000_000  # larger plots are shown by path only
MAX_CELL_CHARS = 160


def _cell(v) -> str:
    if v is None or v is pd.NA or v is pd.NaT:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.4g}"
    text = str(v)
    text = text.replace("|", "\\|").replace("\n", " ")
    if len(text) <= MAX_CELL_CHARS:
        return text
    half = (MAX_CELL_CHARS - 1) // 2  # keep both ends: paths end with the shard name, errors with the problem
    return text[:half] + "…" + text[-half:]


def md_table(df: pd.DataFrame | None, max_rows: int = 20) -> str:
    """A markdown table of the first rows of df (and how many were left out)."""
    if df is None or df.empty:
        return "_no rows_"
    shown = df.head(max_rows)
    cols = [str(c) for c in shown.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v.item() if hasattr(v, "item") else v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_… {len(df) - max_rows} more row(s)_")
    return "\n".join(lines)


def md_preview(df: pd.DataFrame | None, max_rows: int = 20) -> dg.MetadataValue:
    return dg.MetadataValue.md(md_table(df, max_rows))


def png_markdown(png: bytes, alt: str, path: Path | None = None) -> dg.MetadataValue:
    """The plot, embedded as a base64 PNG in markdown (the UI renders it), or its path when too large."""
    if len(png) > MAX_EMBEDDED_PNG_BYTES:
        return dg.MetadataValue.md(f"_plot too large to embed ({len(png) / 1e6:.1f} MB): `{path}`_")
    data = base64.b64encode(png).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def check_result(outcome: CheckOutcome, asset_key: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=outcome.name,
        passed=outcome.passed,
        # shards not profiled yet are not a violation: a warning until a later materialization checks them
        severity=dg.AssetCheckSeverity.WARN if outcome.n_not_profiled and not outcome.n_violations
        else dg.AssetCheckSeverity.ERROR,
        description=outcome.message,
        metadata={
            "rows_checked": outcome.n_checked,
            "violations": outcome.n_violations,
            "not_profiled_yet": outcome.n_not_profiled,
            "offending_rows": md_preview(outcome.violations),
        },
    )
