"""Connections to the warehouse file.

DuckDB lets one process at a time hold a file read-write, and while it does no
other process can open it at all. So every writer holds its connection only for
the few milliseconds of one transaction (`writer()`), readers open read-only
(`reader()`), and both wait, with back-off, for a lock held elsewhere, then fail
with a message naming the file and the holder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

import sql

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


class WarehouseBusy(RuntimeError):
    """Another process held the warehouse lock for longer than we were willing to wait."""


class ReadOnlyViolation(RuntimeError):
    """A statement given to the read-only SQL entry point tried to change the warehouse."""


def _is_lock_error(exc: Exception) -> bool:
    return any(m in str(exc) for m in _LOCK_MARKERS)


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.Error) as exc:  # lock errors are IOExceptions
            if not _is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                mode = "read-only" if read_only else "read-write"
                raise WarehouseBusy(
                    f"warehouse {path} is locked by another process; gave up opening it {mode} "
                    f"after {timeout_s:g}s. DuckDB said: {exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def ensure_schema(path: str | os.PathLike, timeout_s: float = 60.0) -> None:
    """Create the warehouse file, its tables and views if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer(path, timeout_s) as con:
        con.execute(sql.load("schema"))
        con.execute(sql.load("head_samples_schema"))
        con.execute(sql.load("views"))
        con.execute(sql.load("comments"))


@contextlib.contextmanager
def writer(path: str | os.PathLike, timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection; the body runs inside one transaction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False, timeout_s=timeout_s)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


@contextlib.contextmanager
def reader(path: str | os.PathLike, timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection; DuckDB itself refuses any write through it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist yet: run `plasticity analyze` or `plasticity demo`")
    con = _connect(path, read_only=True, timeout_s=timeout_s)
    try:
        yield con
    finally:
        con.close()


#: Statement types `read_only_query` runs (SHOW, DESCRIBE, SUMMARIZE, FROM ... and WITH ... parse as SELECT).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def check_read_only(query: str) -> None:
    """Raise ReadOnlyViolation unless every statement of `query` is a SELECT (or a plain EXPLAIN).

    Decided by DuckDB's own parser, so comments, case, whitespace and several statements in one
    string cannot hide a write; COPY ... TO, ATTACH, EXPORT, INSTALL/LOAD, SET and PRAGMA are
    refused as well as anything that would change the warehouse.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse the query: {exc}") from None
    refused = []
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY_STATEMENTS or (kind == "EXPLAIN" and "analyze" in st.query.lower()):
            refused.append("EXPLAIN ANALYZE" if kind == "EXPLAIN" else kind)
    if refused:
        raise ReadOnlyViolation(
            f"`plasticity sql` is read-only; refused {', '.join(dict.fromkeys(refused))} statement(s) "
            "(only SELECT, WITH, FROM, SHOW, DESCRIBE, SUMMARIZE and EXPLAIN run here)"
        )


def read_only_query(path: str | os.PathLike, query: str, params: dict | None = None, timeout_s: float = 60.0):
    """Run a user's SELECT on a read-only connection; returns (column names, rows).

    Statements other than SELECT/EXPLAIN are refused before the file is opened (`check_read_only`);
    the connection is read-only too, so DuckDB itself would reject any write that got through.
    """
    check_read_only(query)
    with reader(path, timeout_s) as con:
        try:
            rel = con.execute(query, params) if params else con.execute(query)
        except duckdb.Error as exc:
            if "read-only" in str(exc).lower() or "read only" in str(exc).lower():
                raise ReadOnlyViolation(f"`plasticity sql` is read-only: {exc}") from None
            raise
        if rel.description is None:
            return [], []
        names = [d[0] for d in rel.description]
        return names, rel.fetchall()


def memory_connection(threads: int = 1) -> duckdb.DuckDBPyConnection:
    """An in-memory connection for reading shards; compute steps never open the warehouse."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(threads)}")
    return con
