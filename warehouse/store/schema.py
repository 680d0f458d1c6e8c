"""The warehouse schema: its version, its latest shape, the differences of a file's shape from it, and
idempotent upgrades (the file operations that use them, `check_existing_schema` and `upgrade_schema`,
are in `warehouse.store.db`).

A new warehouse gets the tables of ``sql/schema.sql`` (the latest shape, ``CREATE ... IF NOT EXISTS``).
An existing one is brought up to date by the numbered migrations ``sql/migrations/NNN_name.sql``
it has not had yet: each is idempotent (``ADD COLUMN IF NOT EXISTS`` ...) and together with
``schema.sql`` they give the latest shape, whatever version the file started from (version 0 is a
warehouse from before versioning). Adding a column later = the column in ``schema.sql`` plus a
new numbered migration file.

Nothing is written before the file has passed every check: `db.check_file` (a DuckDB file, writable),
a read-only look at its version and at the tables and views with our names, and a rehearsal of the
upgrade on an in-memory copy of their shapes, which must end exactly in the latest shape. A file
holding foreign tables with our names, or written by a newer version, is a WarehouseError naming
the file, and stays byte-identical. The upgrade itself is one transaction.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files

import duckdb

import sql
from warehouse.store.errors import WarehouseError, one_line

#: Scripts creating the latest shape (in order), and those rerun after every upgrade.
CREATE_SCRIPTS = ("schema_migrations", "schema", "head_samples_schema")
#: The views derived from the tables (also rebuilt over the union of several files: `db.sandbox`).
DERIVED_VIEW_SCRIPTS = ("views", "trajectories", "layer_summary")
FINISH_SCRIPTS = (*DERIVED_VIEW_SCRIPTS, "comments")
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


@functools.lru_cache(maxsize=None)
def migrations() -> tuple[Migration, ...]:
    """sql/migrations/NNN_name.sql in order; numbered 1, 2, ... without gaps (else RuntimeError)."""
    folder = files(sql.__name__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            m = _MIGRATION_NAME.match(entry.name)
            if m is None:
                raise RuntimeError(f"sql/migrations/{entry.name}: migrations are named NNN_name.sql")
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"sql/migrations must be numbered 1, 2, ... without gaps: {[m.name for m in found]}")
    return tuple(found)


def schema_version() -> int:
    """The version this code writes: the number of the last migration."""
    return migrations()[-1].version if migrations() else 0


def stored_version(con: duckdb.DuckDBPyConnection, path: object = "") -> int:
    """The version of an open warehouse (0: written before versioning, or empty). WarehouseError when
    its schema_migrations is not ours: a version that is not a whole number, or a migration whose
    name differs from this code's migration of that number (a development version's numbering)."""
    (present,) = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main' "
        "AND table_name = 'schema_migrations'").fetchone()
    if not present:
        return 0
    try:  # by text, then checked: a VARCHAR column of another tool must not be a traceback
        rows = con.execute("SELECT CAST(version AS VARCHAR), CAST(name AS VARCHAR) FROM schema_migrations").fetchall()
    except duckdb.Error as exc:
        raise WarehouseError(f"warehouse {path}: its schema_migrations table is not this tool's "
                                f"({one_line(exc)}); choose another --warehouse") from None
    ours = {m.version: m.name for m in migrations()}
    versions = []
    for text, name in rows:
        if text is None or not text.strip().isdigit():
            raise WarehouseError(f"warehouse {path}: schema_migrations.version holds {text!r}, not a migration "
                                    "number, so this is not this tool's warehouse; choose another --warehouse")
        version = int(text)
        if version in ours and name != ours[version]:
            raise WarehouseError(
                f"warehouse {path} was written by a development version of this tool: its migration {version} is "
                f"{name}, this version's is {ours[version]}. Read it with the version that wrote it, or rebuild "
                "it with `plasticity analyze --fresh` into a new --warehouse. Nothing was changed.")
        versions.append(version)
    return max(versions, default=0)


def readable_version(con: duckdb.DuckDBPyConnection, path: object) -> int:
    """The version of a warehouse a read-only command is about to read, which must be this code's:
    WarehouseError in one line for a DuckDB file without tables (a run stopped before creating them)
    and for an older or newer version, saying what to do."""
    (tables,) = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
                            "AND schema_name = 'main'").fetchone()
    if not tables:
        raise WarehouseError(f"warehouse {path} is an empty DuckDB file (no tables: a run stopped before "
                                "creating them?); remove it, or run `plasticity analyze` with it")
    version = stored_version(con, path)
    if version < schema_version():
        raise WarehouseError(
            f"warehouse {path} has schema version {version}, older than this version's {schema_version()}: "
            f"`plasticity upgrade --warehouse {path}` brings it up to date (`plasticity sql` reads it as it is)")
    if version > schema_version():
        raise WarehouseError(
            f"warehouse {path} has schema version {version}, newer than this version of the tool "
            f"({schema_version()}); upgrade attention-plasticity-warehouse")
    return version


def apply(con: duckdb.DuckDBPyConnection, from_version: int) -> int:
    """Create what is missing, run the migrations after `from_version`, refresh views and comments.
    Idempotent; the caller holds the transaction. Returns the new version."""
    for name in CREATE_SCRIPTS:
        con.execute(sql.load(name))
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for m in migrations():
        if m.version > from_version:
            con.execute(m.text)
            # by name: the rehearsal (`rehearse`) recreates tables with their columns in another order
            con.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($v, $n, $t)",
                        {"v": m.version, "n": m.name, "t": now})
    for name in FINISH_SCRIPTS:
        con.execute(sql.load(name))
    return max(from_version, schema_version())


# ---------------------------------------------------------------------- shapes

#: name -> ("table" | "view", frozenset of (column, type))
Shape = dict[str, tuple[str, frozenset[tuple[str, str]]]]


def read_shape(con: duckdb.DuckDBPyConnection, names: set[str] | None = None) -> Shape:
    """Tables and views of the main schema (only `names`, when given) with their columns and types."""
    where = "database_name = current_database() AND schema_name = 'main'"
    kinds = {r[0]: "table" for r in con.execute(f"SELECT table_name FROM duckdb_tables() WHERE {where}").fetchall()}
    kinds.update({r[0]: "view" for r in con.execute(
        f"SELECT view_name FROM duckdb_views() WHERE {where} AND NOT internal").fetchall()})
    columns: dict[str, set] = {}
    for table, column, dtype in con.execute(
            f"SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE {where}").fetchall():
        columns.setdefault(table, set()).add((column, dtype))
    return {n: (k, frozenset(columns.get(n, ()))) for n, k in kinds.items() if names is None or n in names}


@functools.lru_cache(maxsize=None)
def _latest_shape_cached() -> tuple:
    con = duckdb.connect(":memory:")
    try:
        apply(con, 0)
        return tuple(read_shape(con).items())
    finally:
        con.close()


def latest_shape() -> Shape:
    """The shape this code writes (`apply` on an empty database)."""
    return dict(_latest_shape_cached())


@functools.lru_cache(maxsize=None)
def _latest_columns_cached() -> tuple:
    con = duckdb.connect(":memory:")
    try:
        apply(con, 0)
        rows = con.execute("SELECT table_name, column_name, data_type FROM duckdb_columns() "
                           "WHERE schema_name = 'main' ORDER BY table_name, column_index").fetchall()
    finally:
        con.close()
    out: dict[str, list] = {}
    for table, column, dtype in rows:
        out.setdefault(table, []).append((column, dtype))
    return tuple((t, tuple(cols)) for t, cols in out.items())


def latest_columns(table: str) -> list[tuple[str, str]]:
    """(column, type) of a table or view of the shape this code writes, in declared order ([] if unknown)."""
    return list(dict(_latest_columns_cached()).get(table, ()))


def rehearse(existing: Shape, version: int) -> Shape:
    """The shape `apply` would leave, run on an in-memory database holding `existing`'s tables and views."""
    con = duckdb.connect(":memory:")
    try:
        for name, (kind, cols) in existing.items():
            if kind == "table":
                columns = ", ".join(f'"{c.replace(chr(34), chr(34) * 2)}" {t}' for c, t in sorted(cols))
                con.execute(f'CREATE TABLE "{name}" ({columns})')
            else:
                con.execute(f'CREATE VIEW "{name}" AS SELECT NULL AS x')
        apply(con, version)
        return read_shape(con, set(latest_shape()))
    finally:
        con.close()


def _describe(cols, shown: int = 6) -> str:
    items = [f"{c} {t}" for c, t in sorted(cols)]
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def differences(actual: Shape, expected: Shape, *, missing: bool = True) -> list[str]:
    """What differs between two shapes, table by table (empty: the same); `missing=False`: only about
    the tables and views `actual` has."""
    out = []
    for name, (kind, cols) in sorted(expected.items()):
        if name not in actual:
            if missing:
                out.append(f"{kind} {name} is missing")
            continue
        have_kind, have = actual[name]
        if have_kind != kind:
            out.append(f"{name} is a {have_kind}, not a {kind}")
        elif kind == "table" and have != cols:
            parts = []
            if have - cols:
                parts.append(f"unexpected column(s) {_describe(have - cols)}")
            if cols - have:
                parts.append(f"missing column(s) {_describe(cols - have)}")
            out.append(f"table {name}: {'; '.join(parts)}")
    return out

