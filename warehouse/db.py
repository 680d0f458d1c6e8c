"""Connections to the warehouse file.

DuckDB lets one process at a time hold a file read-write, and while it does no
other process can open it at all. So every writer holds its connection only for
the few milliseconds of one transaction (`writer()`), readers open read-only
(`reader()`), and both wait, with back-off, for a lock held elsewhere, then fail
with a message naming the file and the holder.

Before a file is used it is checked (`check_file`): a folder, a file that is not
a DuckDB database, an unwritable file or folder is a `WarehouseError` naming the
file, and nothing is written. `ensure_schema` also checks that the tables with
our names are ours (`warehouse.schema`) before creating or upgrading anything.
User SQL runs in `sandbox()`: read-only, with DuckDB's own file and extension
access switched off and the configuration locked.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
#: DuckDB errors that mean the file itself is damaged (as opposed to a bad query).
_DAMAGE_MARKERS = ("Corrupt database file", "Could not read enough bytes", "not a valid DuckDB database file")
#: Bytes 8..12 of every DuckDB database file.
DUCKDB_MAGIC = b"DUCK"


class WarehouseError(RuntimeError):
    """A warehouse file that cannot be used as it is: the message names the file and the problem."""


class WarehouseBusy(WarehouseError):
    """Another process held the warehouse lock for longer than we were willing to wait."""


def one_line(exc: BaseException) -> str:
    """DuckDB's message without the query excerpt: its first paragraph, on one line."""
    first = re.split(r"\n\s*\n", str(exc).strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _is_lock_error(exc: Exception) -> bool:
    return any(m in str(exc) for m in _LOCK_MARKERS)


def _writable_folder(path: Path) -> Path:
    """The nearest existing ancestor folder of `path`, which must be writable (else WarehouseError)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise WarehouseError(f"warehouse {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WarehouseError(f"warehouse {path}: folder {folder} is not writable")
    return folder


def check_file(path: str | os.PathLike, *, for_writing: bool) -> Path:
    """The warehouse file, checked without changing anything: WarehouseError if it is a folder or not a
    regular file, empty, not a DuckDB database (magic bytes), or, `for_writing`, not writable or in a
    folder where DuckDB cannot write its WAL. A missing file: FileNotFoundError when reading; when
    writing, its nearest existing folder must be writable."""
    path = Path(path)
    if not path.exists():
        if not for_writing:
            raise FileNotFoundError(
                f"warehouse {path} does not exist yet: run `plasticity analyze` or `plasticity demo`")
        _writable_folder(path)
        return path
    if path.is_dir():
        raise WarehouseError(f"warehouse {path} is a folder, not a DuckDB file")
    if not path.is_file():
        raise WarehouseError(f"warehouse {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as exc:
        raise WarehouseError(f"warehouse {path} cannot be read: {exc.strerror}") from None
    if not head:
        raise WarehouseError(f"warehouse {path} is an empty file, not a DuckDB database; "
                             "remove it or choose another --warehouse")
    if head[8:12] != DUCKDB_MAGIC:
        raise WarehouseError(f"warehouse {path} is not a DuckDB database file (no DuckDB header)")
    if for_writing:
        try:
            with open(path, "r+b"):  # opening for writing changes nothing (no byte, no mtime)
                pass
        except OSError as exc:
            raise WarehouseError(f"warehouse {path} is not writable: {exc.strerror}") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise WarehouseError(f"warehouse {path}: its folder is not writable (DuckDB writes {path.name}.wal there)")
    return path


def _damage(path: Path, exc: Exception) -> WarehouseError | None:
    if any(m in str(exc) for m in _DAMAGE_MARKERS) or "Is a directory" in str(exc):
        return WarehouseError(f"warehouse {path} is damaged or not a DuckDB database: {one_line(exc)}")
    return None


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    check_file(path, for_writing=not read_only)
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.Error) as exc:  # lock errors are IOExceptions
            if not _is_lock_error(exc):
                raise _damage(path, exc) or WarehouseError(f"warehouse {path} cannot be opened: {one_line(exc)}") \
                    from None
            if time.monotonic() >= deadline:
                mode = "read-only" if read_only else "read-write"
                raise WarehouseBusy(
                    f"warehouse {path} is locked by another process; gave up opening it {mode} "
                    f"after {timeout_s:g}s. DuckDB said: {exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def ensure_schema(path: str | os.PathLike, timeout_s: float = 60.0) -> int:
    """Create the warehouse, or check and upgrade an existing one; returns its schema version.

    Nothing is written unless every check passes (see `warehouse.schema.upgrade`)."""
    from warehouse import schema

    return schema.upgrade(Path(path), timeout_s)


@contextlib.contextmanager
def writer(path: str | os.PathLike, timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection; the body runs inside one transaction."""
    path = Path(path)
    check_file(path, for_writing=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False, timeout_s=timeout_s)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException as exc:
            con.execute("ROLLBACK")
            damage = _damage(path, exc) if isinstance(exc, duckdb.Error) else None
            if damage is not None:
                raise damage from None
            raise
        con.execute("COMMIT")
    finally:
        con.close()


@contextlib.contextmanager
def reader(path: str | os.PathLike, timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection; DuckDB itself refuses any write through it."""
    path = Path(path)
    con = _connect(path, read_only=True, timeout_s=timeout_s)
    try:
        yield con
    except duckdb.Error as exc:
        damage = _damage(path, exc)
        if damage is not None:
            raise damage from None
        raise
    finally:
        con.close()


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


@contextlib.contextmanager
def sandbox(paths: Sequence[str | os.PathLike], timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for untrusted SQL: DuckDB itself enforces what it may do.

    ``paths[0]`` is opened read-only as the default database; every further file is attached
    READ_ONLY under its file stem (``ATTACH ... AS "<stem>"``) before external access is switched
    off and the configuration is locked (`SANDBOX_SETTINGS`). Through the connection, any read-only
    statement works (SELECT, PIVOT, CTEs, temp tables and macros, EXPLAIN [ANALYZE], DESCRIBE,
    SUMMARIZE, SHOW); writes to the warehouse, reading or writing any other file or URL
    (COPY, EXPORT DATABASE, read_csv, glob, ...), ATTACH, INSTALL/LOAD and changing a setting are
    refused by DuckDB. Queries larger than memory spill to a private temporary folder, removed afterwards.
    """
    if not paths:
        raise ValueError("sandbox needs at least one warehouse file")
    files = [Path(p) for p in paths]
    aliases = [f.stem for f in files[1:]]
    taken = {files[0].stem}
    for alias in aliases:
        if alias in taken:
            raise ValueError(f"two warehouse files are named {alias!r}; they would share one name in SQL")
        taken.add(alias)
    spill = tempfile.mkdtemp(prefix="plasticity-sql-")
    try:
        with reader(files[0], timeout_s) as con:
            for f, alias in zip(files[1:], aliases):
                check_file(f, for_writing=False)
                con.execute(f"ATTACH {_quote_literal(str(f))} AS {_quote_identifier(alias)} (READ_ONLY)")
            # a large sort spills to a private temporary folder, not to <warehouse>.tmp beside the file
            con.execute(f"SET temp_directory = {_quote_literal(spill)}")
            for setting in SANDBOX_SETTINGS:
                con.execute(setting)
            yield con
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def read_only_query(path: str | os.PathLike | Sequence[str | os.PathLike], query: str, params: dict | None = None,
                    timeout_s: float = 60.0):
    """Run user SQL in a `sandbox` of the warehouse file(s); returns (column names, rows) of the last statement.

    DuckDB's errors (parser, binder, catalog, permission: "read-only mode", "file system operations
    are disabled") are raised as they are, as duckdb.Error."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    with sandbox(paths, timeout_s) as con:
        rel = con.execute(query, params) if params else con.execute(query)
        if rel.description is None:
            return [], []
        names = [d[0] for d in rel.description]
        return names, rel.fetchall()


def memory_connection(threads: int = 1) -> duckdb.DuckDBPyConnection:
    """An in-memory connection for reading shards; compute steps never open the warehouse."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(threads)}")
    return con
