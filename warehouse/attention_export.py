"""CSV exports of the SPEC 4 attention tables of one model's run.

``ATTENTION_EXPORTS`` has the shape of `warehouse.export.EXPORTS` (table -> (columns,
order)), so the two can be merged (``EXPORTS.update(ATTENTION_EXPORTS)``);
`export_attention_csvs` writes them on its own. Columns are the plasticity.attention
ones after the head key; ``position`` is written as an integer (the attention code only
accepts integral positions). NaN is written as ``nan``.
"""

from __future__ import annotations

import os
from pathlib import Path

from plasticity.attention import SUMMARY_COLUMNS, SWEEP_COLUMNS, TOKEN_COLUMNS

__all__ = ["ATTENTION_EXPORTS", "export_attention_csvs"]

_KEY = "layer, q_head, k_head"
_TOKEN_COLS = ", ".join("CAST(position AS BIGINT) AS position" if c == "position" else c for c in TOKEN_COLUMNS)

ATTENTION_EXPORTS = {
    "token_attention": (f"{_KEY}, {_TOKEN_COLS}", "layer, q_head, example_id, position, bucket"),
    "head_attention_summary": (f"{_KEY}, {', '.join(SUMMARY_COLUMNS)}", "layer, q_head"),
    "query_scale_sweep": (f"{_KEY}, {', '.join(SWEEP_COLUMNS)}", "layer, q_head, scale"),
}


def export_attention_csvs(warehouse: str | os.PathLike, model: str, run_id: str | None, out_dir: str | os.PathLike,
                          tables=tuple(ATTENTION_EXPORTS), timeout_s: float = 60.0) -> dict[str, Path]:
    """Write <table>.csv for each attention table of the run (latest unless ``run_id``) into
    ``out_dir``; returns {table: path}."""
    from warehouse.export import export_csvs

    return export_csvs(warehouse, model, run_id, out_dir, timeout_s=timeout_s, tables=tuple(tables))
