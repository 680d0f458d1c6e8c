"""Every base table of a warehouse file as rows that two runs can be compared by: the tests that say
"this run stored what that run stored" (a streamed Hub run and a local copy, an option that must
change nothing)."""

from __future__ import annotations

import datetime
from typing import Any, Callable

import duckdb


def comparable(value: Any) -> Any:
    """NaN as a value that equals itself; a time as "a time" (when, not what)."""
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, datetime.datetime):
        return "a time"
    return value


def stored_rows(path, *, drop: tuple[str, ...] = (),
                normalise: Callable[[str, Any], Any] | None = None) -> dict[str, list[tuple]]:
    """Every base table's rows, sorted, each value `comparable`; columns named in `drop` left out, and
    `normalise(column, value)` applied first where two runs differ by construction (e.g. their folders)."""
    out = {}
    with duckdb.connect(str(path), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        for table in tables:
            cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = $t "
                                              "ORDER BY ordinal_position", {"t": table}).fetchall() if c not in drop]
            rows = con.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY ALL").fetchall()
            out[table] = [tuple(comparable(normalise(c, v) if normalise else v) for c, v in zip(cols, r)) for r in rows]
    return out
