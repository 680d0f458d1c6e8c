"""User SQL over one or more warehouse files: `sandbox()` opens them read-only in an in-memory
database (several files as the union of their tables, each file also under its stem), with DuckDB's
own file and extension access switched off and the configuration locked; `read_only_query` runs a
query there and can be interrupted by a signal. Imports the store's file operations (`db`), never the
other way round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb

from warehouse.store import schema
from warehouse.store.db import _waiting_for_lock, check_file, reader
from warehouse.store.errors import WarehouseError


#: Settings of a sandboxed connection, applied in this order; the last one locks them all.
SANDBOX_SETTINGS = (
    "SET python_enable_replacements = false",  # no Python variables of the caller as tables
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET allow_persistent_secrets = false",
    "SET enable_external_access = false",  # no file, URL, ATTACH, INSTALL or LOAD beyond what is open
    "SET lock_configuration = true",  # and no SET/RESET/PRAGMA can undo any of it
)


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _attach_read_only(con: duckdb.DuckDBPyConnection, path: Path, alias: str, timeout_s: float) -> None:
    check_file(path, for_writing=False)
    _waiting_for_lock(path, True, timeout_s, lambda: con.execute(
        f"ATTACH {_quote_literal(str(path))} AS {_quote_identifier(alias)} (READ_ONLY)"))


#: Catalog and schema names DuckDB resolves before any attached file: a file with such a stem would be
#: shadowed (``"main".runs`` is the in-memory database's) or clash with the catalog.
RESERVED_ALIASES = ("main", "temp", "system", "memory", "pg_catalog", "information_schema")


def _aliases(files: list[Path]) -> list[str]:
    """File stems, the names the files get in SQL. ValueError naming the file when a stem is a name DuckDB
    reserves, or when two stems differ only in case (SQL names ignore case)."""
    aliases = [f.stem for f in files]
    for f, alias in zip(files, aliases):
        if alias.lower() in RESERVED_ALIASES:
            raise ValueError(f"warehouse file {f}: its name {alias!r} is reserved in SQL "
                             f"({', '.join(RESERVED_ALIASES)}); rename the file or link it under another name")
    folded = [a.lower() for a in aliases]
    for f, alias in zip(files, folded):
        if folded.count(alias) > 1:
            twins = [str(g) for g, a in zip(files, folded) if a == alias]
            raise ValueError(f"warehouse files {', '.join(twins)} would be named {alias!r} in SQL alike "
                             "(names ignore case); rename one")
    return aliases


def _check_column_types(con: duckdb.DuckDBPyConnection, files: list[Path], aliases: list[str]) -> None:
    """WarehouseError naming the file, table and column when a file's column has another type than this
    version's (the union of that table could not be read, and DuckDB's error would not say which file)."""
    for f, alias in zip(files, aliases):
        for table, column, dtype in con.execute(
                "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = $d "
                "AND schema_name = 'main'", {"d": alias}).fetchall():
            expected = dict(schema.latest_columns(table)).get(column) if schema.latest_shape().get(
                table, ("",))[0] == "table" else None
            if expected is not None and dtype != expected:
                raise WarehouseError(f"warehouse file {f}: column {table}.{column} is {dtype}, this version's is "
                                     f"{expected}; it cannot be read together with the other files (query it "
                                     "alone, or rebuild it)")


def _check_models_unique(con: duckdb.DuckDBPyConnection, files: list[Path], aliases: list[str]) -> None:
    """WarehouseError when one model is in several of the attached files (the union would mix its runs)."""
    where: dict[str, list[Path]] = {}
    for f, alias in zip(files, aliases):
        have = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = $d AND schema_name = 'main'",
            {"d": alias}).fetchall()}
        parts = [f"SELECT model FROM {_quote_identifier(alias)}.main.{t}" for t in ("runs", "models") if t in have]
        if not parts:
            continue
        for (model,) in con.execute(" UNION ".join(parts)).fetchall():
            where.setdefault(model, []).append(f)
    shared = {m: fs for m, fs in where.items() if len(fs) > 1}
    if shared:
        model, fs = sorted(shared.items())[0]
        more = f" (and {len(shared) - 1} more model(s))" if len(shared) > 1 else ""
        raise WarehouseError(
            f"model {model!r} is in several warehouse files ({', '.join(map(str, fs))}){more}: the union views "
            "would mix its runs; give each model's file once, or query the files one at a time")


def _create_union_views(con: duckdb.DuckDBPyConnection, aliases: list[str]) -> None:
    """In the in-memory default database: every table of the warehouse schema as a view over the union of
    the attached files' tables (``UNION ALL BY NAME``, so an older file without a newer column gives NULL
    there), then the derived views (sql/views.sql, sql/trajectories.sql) over those unions."""
    import sql

    present: dict[str, list[str]] = {}
    for alias in aliases:
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = $d "
                                    "AND schema_name = 'main'", {"d": alias}).fetchall():
            present.setdefault(table, []).append(alias)
    for table, (kind, _) in sorted(schema.latest_shape().items()):
        if kind != "table":
            continue
        template = "SELECT " + ", ".join(f"CAST(NULL AS {dtype}) AS {_quote_identifier(c)}"
                                         for c, dtype in schema.latest_columns(table)) + " WHERE false"
        parts = [template] + [f"SELECT * FROM {_quote_identifier(a)}.main.{_quote_identifier(table)}"
                              for a in present.get(table, [])]
        con.execute(f"CREATE VIEW {_quote_identifier(table)} AS " + " UNION ALL BY NAME ".join(parts))
    for name in schema.DERIVED_VIEW_SCRIPTS:
        con.execute(sql.load(name))


@contextlib.contextmanager


def _union(files: list[Path], timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory connection with every file attached READ_ONLY under its stem and the union views."""
    aliases = _aliases(files)
    con = duckdb.connect(":memory:")
    try:
        for f, alias in zip(files, aliases):
            _attach_read_only(con, f, alias, timeout_s)
        _refuse_empty(con, files, aliases)
        _check_column_types(con, files, aliases)
        _check_models_unique(con, files, aliases)
        _create_union_views(con, aliases)
        yield con
    finally:
        con.close()


@contextlib.contextmanager


def sandbox(paths: Sequence[str | os.PathLike], timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for untrusted SQL: DuckDB itself enforces what it may do.

    One file: it is opened read-only as the default database. Several files (one per model, or any
    set of warehouses holding different models): an in-memory default database with every file
    ATTACHed READ_ONLY under its file stem (``"<stem>".head_metrics`` reads one file), and views with
    the warehouse's table names over the union of all files (``head_metrics`` reads them all), with
    the warehouse's own views (``latest_runs``, ``latest_head_metrics``, the family trajectories, ...)
    rebuilt over those unions; a model present in two files is a WarehouseError. Files are attached
    (waiting for another process's lock like `reader`) before external access is switched off and the
    configuration is locked (`SANDBOX_SETTINGS`). Through the connection, any read-only statement works
    (SELECT, PIVOT, CTEs, temp tables and macros, EXPLAIN [ANALYZE], DESCRIBE, SUMMARIZE, SHOW); writes
    to a warehouse, reading or writing any other file or URL (COPY, EXPORT DATABASE, read_csv, glob,
    ...), ATTACH, INSTALL/LOAD and changing a setting are refused by DuckDB. Queries larger than memory
    spill to a private temporary folder, removed afterwards.
    """
    if not paths:
        raise ValueError("sandbox needs at least one warehouse file")
    files = [Path(p) for p in paths]
    from warehouse.store.spill import SPILL_PREFIX, remove_stale_spill_folders

    remove_stale_spill_folders()
    spill = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-")
    try:
        opened = reader(files[0], timeout_s) if len(files) == 1 else _union(files, timeout_s)
        with opened as con:
            if len(files) == 1:
                _refuse_empty(con, files, None)
            # a large sort spills to a private temporary folder, not to <warehouse>.tmp beside the file
            con.execute(f"SET temp_directory = {_quote_literal(spill)}")
            for setting in SANDBOX_SETTINGS:
                con.execute(setting)
            yield con
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def read_only_query(path: str | os.PathLike | Sequence[str | os.PathLike], query: str, params: dict | None = None,
                    timeout_s: float = 60.0, arrow: bool = False):
    """Run user SQL in a `sandbox` of the warehouse file(s); returns (column names, rows) of the last statement,
    or with `arrow` (column names, a pyarrow Table keeping DuckDB's column types, e.g. for Parquet).

    DuckDB's errors (parser, binder, catalog, permission: "read-only mode", "file system operations
    are disabled") are raised as they are, as duckdb.Error."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        with sandbox(paths, timeout_s) as con, _interrupted_by_signals(con):
            rel = con.execute(query, params) if params else con.execute(query)
            if rel.description is None:
                return [], []
            names = [d[0] for d in rel.description]
            if not arrow:
                return names, rel.fetchall()
            import warnings

            with warnings.catch_warnings():  # the copy it warns of is what a user's query result needs anyway
                warnings.simplefilter("ignore", UserWarning)
                return names, rel.to_arrow_table()
    except (RuntimeError, duckdb.InterruptException) as exc:
        # DuckDB stopped for a signal (Ctrl-C, or SIGTERM / SIGHUP that the command line turns into
        # KeyboardInterrupt; it sees one when it polls during a statement): raised as Python would
        if "interrupt" not in str(exc).lower():
            raise
        raise KeyboardInterrupt("query interrupted") from None


@contextlib.contextmanager


def _interrupted_by_signals(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """While the body runs, a signal with a Python handler (Ctrl-C; SIGTERM, SIGHUP when the command line
    handles them) interrupts DuckDB at once: Python's C-level handler writes the signal number to a
    wake-up socket even while this thread is inside DuckDB, and a watcher thread reading it calls
    `con.interrupt()`. (Without it the signal waits until DuckDB polls, which some phases of a large
    query do not.) The Python handler then runs as usual when DuckDB returns."""
    import signal
    import socket
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    except ValueError:
        wake_r.close()
        wake_w.close()
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while True:
            data = wake_r.recv(64)
            if done.is_set() or not data:
                return
            con.interrupt()

    watcher = threading.Thread(target=watch, name="plasticity-sql-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        done.set()
        wake_w.send(b"\0")  # wakes the watcher, which sees `done`
        watcher.join()
        wake_r.close()
        wake_w.close()


def _refuse_empty(con: duckdb.DuckDBPyConnection, files: list[Path], aliases: list[str] | None) -> None:
    """WarehouseError naming the first file that is an empty DuckDB database (no table at all)."""
    with_tables = {r[0] for r in con.execute("SELECT DISTINCT database_name FROM duckdb_tables()").fetchall()}
    for f, name in zip(files, aliases or [con.execute("SELECT current_database()").fetchone()[0]]):
        if name not in with_tables:
            raise WarehouseError(f"warehouse {f} is an empty DuckDB file (no tables: a run stopped before "
                                 "creating them?); remove it, or run `plasticity analyze` with it")
