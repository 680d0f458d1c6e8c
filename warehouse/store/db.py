"""Connections to the warehouse file.

DuckDB lets one process at a time hold a file read-write, and while it does no
other process can open it at all. So every writer holds its connection only for
the few milliseconds of one transaction (`writer()`), readers open read-only
(`reader()`), and both wait, with back-off, for a lock held elsewhere, then fail
with a message naming the file and the holder.

Before a file is used it is checked (`check_file`): a folder, a file that is not
a DuckDB database, an unwritable file or folder is a `WarehouseError` naming the
file, and nothing is written. `ensure_schema` also checks that the tables with
our names are ours (`warehouse.store.schema`) before creating or upgrading anything.
User SQL runs in `warehouse.store.sandbox`, which opens files through this module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from warehouse.store import schema
from warehouse.store.errors import WarehouseError, one_line  # noqa: F401 (both are used as db.*)

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
#: DuckDB errors that mean the file itself is damaged (as opposed to a bad query).
_DAMAGE_MARKERS = ("Corrupt database file", "Could not read enough bytes", "not a valid DuckDB database file")
#: Bytes 8..12 of every DuckDB database file.
DUCKDB_MAGIC = b"DUCK"
#: In a warehouse path, stands for the model (one file per model: ``/store/{model}.duckdb``).
MODEL_PLACEHOLDER = "{model}"
T = TypeVar("T")


class WarehouseBusy(WarehouseError):
    """Another process held the warehouse lock for longer than we were willing to wait."""


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


@dataclass
class LockWaits:
    """How often and how long this process waited for another process's warehouse lock (cumulative)."""

    count: int = 0
    seconds: float = 0.0

    def since(self, before: "LockWaits") -> dict:
        """What was added after `before` (a copy taken earlier), as materialization metadata."""
        return {"lock_waits": self.count - before.count, "lock_wait_s": round(self.seconds - before.seconds, 3)}

    def copy(self) -> "LockWaits":
        return LockWaits(self.count, self.seconds)


#: This process's lock waits (Dagster assets report what they add to it).
LOCK_WAITS = LockWaits()


def _waiting_for_lock(path: Path, read_only: bool, timeout_s: float, open_it: Callable[[], T]) -> T:
    """`open_it()` (a connect or an ATTACH of `path`), retried with back-off while another process holds
    the file's lock, for up to `timeout_s` (then WarehouseBusy); other failures are WarehouseErrors.
    Each wait is added to `LOCK_WAITS`."""
    start = time.monotonic()
    deadline = start + timeout_s
    delay = 0.02
    waited = False
    while True:
        try:
            out = open_it()
            if waited:
                LOCK_WAITS.seconds += time.monotonic() - start
            return out
        except (duckdb.IOException, duckdb.Error) as exc:  # lock errors are IOExceptions
            if not _is_lock_error(exc):
                raise _damage(path, exc) or WarehouseError(f"warehouse {path} cannot be opened: {one_line(exc)}") \
                    from None
            if time.monotonic() >= deadline:
                LOCK_WAITS.seconds += time.monotonic() - start
                mode = "read-only" if read_only else "read-write"
                raise WarehouseBusy(
                    f"warehouse {path} is locked by another process; gave up opening it {mode} "
                    f"after {timeout_s:g}s. DuckDB said: {exc}"
                ) from None
            if not waited:
                waited = True
                LOCK_WAITS.count += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    check_file(path, for_writing=not read_only)
    return _waiting_for_lock(path, read_only, timeout_s, lambda: duckdb.connect(str(path), read_only=read_only))


def ensure_schema(path: str | os.PathLike, timeout_s: float = 60.0) -> int:
    """Create the warehouse, or check and upgrade an existing one; returns its schema version.

    Nothing is written unless every check passes (see `upgrade_schema`)."""
    try:
        return upgrade_schema(Path(path), timeout_s)
    except (RuntimeError, duckdb.InterruptException) as exc:
        _reraise_interrupt(exc)
        raise


def _reraise_interrupt(exc: BaseException) -> None:
    """DuckDB stopped a statement for a signal (Ctrl-C, or SIGTERM / SIGHUP that the command line turns
    into KeyboardInterrupt; DuckDB sees it when it polls and raises "Query interrupted"): raise it as
    the KeyboardInterrupt it was, so the run unwinds as interrupted, not failed."""
    if isinstance(exc, (RuntimeError, duckdb.InterruptException)) and "interrupted" in str(exc).lower():
        raise KeyboardInterrupt(str(exc)) from None


def check_existing_schema(path: Path, timeout_s: float) -> int:
    """Read-only checks of an existing warehouse; returns its stored version. WarehouseError (nothing
    written) if it is newer than this code or its tables with our names would not upgrade to ours."""
    expected = schema.latest_shape()
    with reader(path, timeout_s) as con:
        version = schema.stored_version(con, path)
        existing = schema.read_shape(con, set(expected))
    if version > schema.schema_version():
        raise WarehouseError(
            f"warehouse {path} has schema version {version}, newer than this version of the tool "
            f"({schema.schema_version()}); upgrade attention-plasticity-warehouse. Nothing was changed.")
    try:
        after, failure = schema.rehearse(existing, version), []
        problems = schema.differences(after, expected)
    except duckdb.Error as exc:
        after, failure = existing, [f"upgrading fails: {one_line(exc)}"]
        problems = schema.differences(existing, expected, missing=False)
    if not problems and not failure:
        return version
    detail = "; ".join(problems + failure)
    if not _foreign_shape(after, expected):  # only less than the code expects
        raise WarehouseError(
            f"warehouse {path} (schema version {version}) would lack what this version needs after the upgrade: "
            f"{detail}. Either it is not this tool's warehouse, or sql/schema.sql gained it without a migration "
            "in sql/migrations. Nothing was changed.")
    raise WarehouseError(
        f"warehouse {path} holds tables with this tool's names but not its columns, so it is not (or no "
        f"longer) this tool's warehouse: {detail}. Nothing was changed; choose another --warehouse.")


def _foreign_shape(actual: schema.Shape, expected: schema.Shape) -> bool:
    """Whether `actual` has one of our names as another kind of object, or a column we do not know."""
    return any(name in actual and (actual[name][0] != kind or (kind == "table" and actual[name][1] - cols))
               for name, (kind, cols) in expected.items())


def upgrade_schema(path: Path, timeout_s: float = 60.0) -> int:
    """Create or upgrade the warehouse at `path` after `check_existing_schema` passed; one transaction."""
    check_file(path, for_writing=True)
    if path.exists():
        check_existing_schema(path, timeout_s)
    elif _create(path):
        return schema.schema_version()
    with writer(path, timeout_s) as con:
        # the version read again under the lock: another process may have upgraded
        version = schema.apply(con, schema.stored_version(con, path))
        problems = schema.differences(schema.read_shape(con, set(schema.latest_shape())), schema.latest_shape())
        if problems:  # the rehearsal makes this unreachable; never commit a half-known shape
            raise WarehouseError(f"warehouse {path}: upgrade left {'; '.join(problems)}; rolled back")
    return version


def _create(path: Path) -> bool:
    """A new warehouse with the latest schema, built under a temporary name beside `path` and linked into
    place complete: a process killed while creating it leaves no empty DuckDB file at `path` (only a
    ``.<name>.creating-<pid>`` file, removed by the next creation). If another process created `path`
    meanwhile, theirs is kept (False: it still has to be checked and upgraded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.creating-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute("BEGIN TRANSACTION")
            schema.apply(con, 0)
            con.execute("COMMIT")
            con.execute("CHECKPOINT")  # everything in the file itself, no WAL beside it
        finally:
            con.close()
        try:
            os.link(tmp, path)  # fails if the name exists: never replaces another process's warehouse
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename (replacing only if none appeared)
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            _reraise_interrupt(exc)
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


def model_files(template: str | os.PathLike) -> list[Path]:
    """The existing files of a per-model warehouse path (``{model}`` standing for any name; every other
    character literal), sorted; ``[template]`` itself when it has no ``{model}``."""
    text = str(template)
    if MODEL_PLACEHOLDER not in text:
        return [Path(text)]
    pattern = glob.escape(text).replace(glob.escape(MODEL_PLACEHOLDER), "*")
    return sorted(Path(p) for p in glob.glob(pattern))


def warehouse_for_model(path: str | os.PathLike, model: str) -> str:
    """The file of `model` when `path` has ``{model}`` (one file per model), else `path` itself; the model
    name must be safe as a file name (`warehouse.sources.names.safe_path_component`)."""
    from warehouse.sources.names import safe_path_component

    text = str(path)
    if MODEL_PLACEHOLDER not in text:
        return text
    return text.replace(MODEL_PLACEHOLDER, safe_path_component(model, "model name"))


def expand_warehouse_paths(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """The warehouse files named by `patterns`, in order, each file once: a file (an existing one is taken as
    it is), a glob (``*``, ``?``, ``[...]``: every match, sorted) or a per-model path with ``{model}``
    (`model_files`). Expanded here, in
    Python, before any file is opened (the SQL sandbox cannot list folders). FileNotFoundError when a glob
    or a ``{model}`` path matches no file."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        text = str(pattern)
        if MODEL_PLACEHOLDER in text:
            found = model_files(text)
        elif glob.has_magic(text) and not Path(text).exists():  # an existing file is itself, brackets or not
            found = sorted(Path(p) for p in glob.glob(text))
        else:
            found = [Path(text)]
        if not found:
            raise FileNotFoundError(f"no warehouse file matches {text}")
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def check_readable(path: str | os.PathLike, timeout_s: float = 60.0) -> int:
    """Before a read-only command reads `path` by table name: its schema version, which must be this
    code's; otherwise a WarehouseError in one line saying what to do (an empty DuckDB file, an older
    or newer version, schema_migrations of another tool or of a development version)."""
    from warehouse.store import schema

    with reader(path, timeout_s) as con:
        return schema.readable_version(con, path)


def memory_connection(threads: int = 1) -> duckdb.DuckDBPyConnection:
    """An in-memory connection for reading shards; compute steps never open the warehouse."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(threads)}")
    return con


def reading_warehouse(given: str | None, model: str | None = None) -> str:
    """The warehouse a read-only command uses (`choose_warehouse`; with ``{model}``, that model's file),
    said on stderr so that the command's own output stays clean, and checked readable by this version
    (`check_readable`)."""
    import sys

    from warehouse.settings.config import choose_warehouse, say_warehouse

    path, source = choose_warehouse(given)
    if model is not None:
        path = warehouse_for_model(path, model)
    say_warehouse(path, source, sys.stderr)
    check_readable(path)  # an empty, older or foreign file: one line saying what to do, not a Catalog error
    return path
