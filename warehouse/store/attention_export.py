"""Exports of the attention tables of one model's run.

``ATTENTION_EXPORTS`` has the shape of `warehouse.store.export.EXPORTS` (table -> (columns,
order)), so the two merge (``{**EXPORTS, **ATTENTION_EXPORTS}``); `warehouse.store.export.export_attention`
writes them on their own. Columns are the plasticity.attention ones after the head key;
``position`` is written as an integer (the attention code only accepts integral positions).

The per-token table (one row per captured query: ~200x the other tables together) is
written as Parquet with zstd compression (``token_attention.parquet``, the table's SQL
types); the per-head summary and the sweep as CSV (NaN written as ``nan``), like the three
upstream-compatible files.
"""

from __future__ import annotations

from plasticity.attention import SUMMARY_COLUMNS, SWEEP_COLUMNS, TOKEN_COLUMNS

__all__ = ["ATTENTION_EXPORTS", "PARQUET_EXPORTS", "export_file_name", "copy_options"]

_KEY = "layer, q_head, k_head"
_TOKEN_COLS = ", ".join("CAST(position AS BIGINT) AS position" if c == "position" else c for c in TOKEN_COLUMNS)

ATTENTION_EXPORTS = {
    "token_attention": (f"{_KEY}, {_TOKEN_COLS}", "layer, q_head, example_id, position, bucket"),
    "head_attention_summary": (f"{_KEY}, {', '.join(SUMMARY_COLUMNS)}", "layer, q_head"),
    "query_scale_sweep": (f"{_KEY}, {', '.join(SWEEP_COLUMNS)}", "layer, q_head, scale"),
}
#: Tables exported as Parquet (zstd) instead of CSV.
PARQUET_EXPORTS = ("token_attention",)


def export_file_name(table: str) -> str:
    """<table>.parquet for the PARQUET_EXPORTS, <table>.csv otherwise."""
    return f"{table}.parquet" if table in PARQUET_EXPORTS else f"{table}.csv"


def copy_options(table: str) -> str:
    """DuckDB COPY options of a table's export file."""
    return "(FORMAT parquet, COMPRESSION zstd)" if table in PARQUET_EXPORTS else "(HEADER, DELIMITER ',')"

