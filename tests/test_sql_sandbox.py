"""`plasticity sql` is sandboxed by DuckDB itself: read-only, no file or URL access, locked settings.

Every refused statement is tried against real files next to the warehouse, and the test checks that
nothing was written (no file created, the warehouse byte-identical) and nothing was read (a secret
file's content never printed, a local HTTP server never contacted).
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from cli.main import main
from warehouse.store import db
from warehouse.store import sandbox


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def warehouse(tmp_path) -> Path:
    """A real warehouse (our schema) with 6 heads of head_metrics."""
    wh = tmp_path / "wh" / "warehouse.duckdb"
    db.ensure_schema(wh)
    with db.writer(wh) as con:
        con.execute(
            "INSERT INTO head_metrics (model, run_id, layer, q_head, k_head, ap_overall) "
            "SELECT 'm', 'r', i // 3, i % 3, 0, i / 10 FROM range(6) t(i)")
    return wh


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        body = b"a,b\n1,2\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    _CountingHandler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.hits
    finally:
        server.shutdown()
        server.server_close()


def run_sql(capsys, wh: Path, query: str, *extra: str) -> tuple[int, str, str]:
    code = main(["sql", query, "--warehouse", str(wh), *extra])
    out, err = capsys.readouterr()
    return code, out, err


ALLOWED = [
    ("PIVOT head_metrics ON layer USING count(*) GROUP BY model", "model"),  # no IN list
    ("WITH t AS (SELECT layer, avg(ap_overall) AS ap FROM head_metrics GROUP BY layer) SELECT * FROM t ORDER BY layer",
     "0.1000"),
    ("CREATE TEMP TABLE t AS SELECT max(ap_overall) AS top FROM head_metrics; SELECT top * 2 AS twice FROM t", "1.0000"),
    ("CREATE TEMP MACRO twice(x) AS 2 * x; SELECT twice(21) AS v", "42"),
    ("EXPLAIN SELECT * FROM head_metrics", "physical_plan"),
    ("EXPLAIN ANALYZE SELECT count(*) FROM head_metrics", "analyzed_plan"),
    ("SUMMARIZE head_metrics", "ap_overall"),
    ("DESCRIBE runs", "error"),  # the column added by migration 001
    ("SHOW TABLES", "schema_migrations"),
    ("FROM head_metrics SELECT count(*) AS n", "6"),
    ("PRAGMA table_info('runs')", "config_json"),
    ("CALL pragma_version()", "library_version"),
    ("SELECT count(*) AS n FROM duckdb_secrets()", "0"),
    ("SELECT schema_name FROM duckdb_schemas() WHERE schema_name = 'main'", "main"),
]


@pytest.mark.parametrize("query,expected", ALLOWED, ids=[q[:30] for q, _ in ALLOWED])
def test_read_only_statements_work(warehouse, capsys, query, expected):
    before = _sha(warehouse)
    code, out, err = run_sql(capsys, warehouse, query)
    assert code == 0, err
    assert expected in out
    assert _sha(warehouse) == before


def test_a_query_larger_than_memory_spills_to_a_private_folder_removed_afterwards(warehouse, monkeypatch, tmp_path):
    """Not to <warehouse>.tmp beside the file (the store may be read-only or shared)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = sorted(p.name for p in warehouse.parent.iterdir())
    with sandbox.sandbox([warehouse]) as con:
        spill = Path(con.execute("SELECT current_setting('temp_directory')").fetchone()[0])
        assert spill.parent == tmp_path / "tmp"
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute("SET memory_limit = '20MB'")
    names, rows = sandbox.read_only_query(warehouse, "SELECT count(*) AS n, max(r) < 1 AS ok FROM "
                                                "(SELECT random() AS r, range AS x FROM range(3000000) ORDER BY r)")
    assert rows == [(3000000, True)]
    assert sorted(p.name for p in warehouse.parent.iterdir()) == before  # no warehouse.duckdb.tmp
    assert list((tmp_path / "tmp").iterdir()) == []  # the private folders are gone


def test_result_values_come_through(warehouse, capsys):
    code, out, _ = run_sql(capsys, warehouse,
                           "SELECT layer, sum(ap_overall) AS s FROM head_metrics GROUP BY layer ORDER BY layer",
                           "--csv")
    assert code == 0
    assert out.splitlines() == ["layer,s", "0,0.30000000000000004", "1,1.2"]


def _refused(tmp: Path, url: str) -> list[tuple[str, list[Path]]]:
    """(statement, files that must not exist afterwards)."""
    out_csv, out2, out3 = tmp / "out.csv", tmp / "out2.csv", tmp / "out3.csv"
    other, export_dir = tmp / "other.duckdb", tmp / "exported"
    return [
        (f"COPY head_metrics TO '{out_csv}'", [out_csv]),
        (f"COPY (SELECT 1) TO '{out_csv}' (FORMAT parquet)", [out_csv]),
        (f"EXPLAIN ANALYZE COPY head_metrics TO '{out2}'", [out2]),
        (f"EXPLAIN ANALYSE COPY head_metrics TO '{out3}'", [out3]),
        (f"ATTACH '{other}' AS o", [other]),
        (f"ATTACH '{other}' AS o (READ_ONLY)", [other]),
        (f"EXPORT DATABASE '{export_dir}'", [export_dir]),
        ("INSTALL httpfs", []),
        ("LOAD httpfs", []),
        (f"LOAD '{tmp / 'evil.duckdb_extension'}'", []),
        (f"INSTALL '{tmp / 'evil.duckdb_extension'}'", []),
        ("FORCE INSTALL json", []),
        ("SET enable_external_access = true", []),
        ("RESET enable_external_access", []),
        ("SET lock_configuration = false", []),
        ("RESET lock_configuration", []),
        ("SET autoinstall_known_extensions = true", []),
        ("SET python_enable_replacements = true", []),
        ("PRAGMA enable_profiling", []),
        (f"SET profiling_output = '{tmp / 'profile.json'}'", [tmp / "profile.json"]),
        (f"SET temp_directory = '{tmp / 'spill'}'", [tmp / "spill"]),
        ("CREATE PERSISTENT SECRET s (TYPE http, BEARER_TOKEN 'x')", []),
        ("DELETE FROM head_metrics", []),
        ("UPDATE head_metrics SET ap_overall = 0", []),
        ("INSERT INTO runs (run_id, model) VALUES ('x', 'y')", []),
        ("CREATE TABLE x (a INT)", []),
        ("DROP TABLE head_metrics", []),
        ("ALTER TABLE runs ADD COLUMN z INT", []),
        ("CREATE VIEW v AS SELECT 1", []),
        ("SELECT count(*) FROM head_metrics; DELETE FROM head_metrics", []),
        (f"SELECT * FROM read_csv('{url}/data.csv')", []),
        (f"SELECT * FROM '{url}/data.csv'", []),
        (f"SELECT * FROM read_json('{url.replace('http', 'https')}/x.json')", []),
        ("SELECT * FROM sqlite_scan('x.db', 't')", []),  # an autoloadable extension
    ]


def test_writes_files_urls_extensions_and_settings_are_refused(warehouse, tmp_path, capsys, http_server):
    url, hits = http_server
    (tmp_path / "evil.duckdb_extension").write_bytes(b"\x7fELF not really an extension")
    home_duckdb = Path.home() / ".duckdb"
    home_before = sorted(p.name for p in home_duckdb.rglob("*")) if home_duckdb.exists() else None
    before = _sha(warehouse)
    for stmt, must_not_exist in _refused(tmp_path, url):
        code, out, err = run_sql(capsys, warehouse, stmt)
        assert code == 2, f"{stmt!r} was allowed: {out}"
        assert err.startswith("error: ") and err.count("\n") == 1, (stmt, err)
        assert "Traceback" not in err
        for path in must_not_exist:
            assert not path.exists(), f"{stmt!r} created {path}"
    assert hits == [], "the sandbox contacted the HTTP server"
    assert _sha(warehouse) == before
    home_after = sorted(p.name for p in home_duckdb.rglob("*")) if home_duckdb.exists() else None
    assert home_after == home_before  # no extension downloaded or installed
    code, out, _ = run_sql(capsys, warehouse, "SELECT count(*) AS n FROM head_metrics", "--csv")
    assert (code, out.splitlines()) == (0, ["n", "6"])


def test_a_temporary_secret_stays_in_the_connection(warehouse, capsys):
    """A temporary secret is harmless there (nothing can use the network) and is gone afterwards."""
    home_secrets = Path.home() / ".duckdb" / "stored_secrets"
    before = sorted(home_secrets.iterdir()) if home_secrets.exists() else []
    code, _, err = run_sql(capsys, warehouse, "CREATE SECRET s (TYPE http, BEARER_TOKEN 'x'); "
                                              "SELECT count(*) AS n FROM duckdb_secrets()", "--csv")
    assert code == 0, err
    code, out, _ = run_sql(capsys, warehouse, "SELECT count(*) AS n FROM duckdb_secrets()", "--csv")
    assert (code, out.splitlines()) == (0, ["n", "0"])
    assert (sorted(home_secrets.iterdir()) if home_secrets.exists() else []) == before


def test_no_file_outside_the_warehouse_is_read(warehouse, tmp_path, capsys):
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nTOPSECRET\n")
    (tmp_path / "shards").mkdir()
    pd.DataFrame({"x": ["TOPSECRET"]}).to_parquet(tmp_path / "shards" / "a.parquet")
    for stmt in (
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_blob('{secret}')",
        f"SELECT * FROM read_parquet('{tmp_path}/shards/*.parquet')",
        f"SELECT * FROM parquet_metadata('{tmp_path}/shards/a.parquet')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
    ):
        code, out, err = run_sql(capsys, warehouse, stmt)
        assert code == 2, f"{stmt!r} was allowed: {out}"
        assert "TOPSECRET" not in out + err and "secret.csv" not in out and "a.parquet" not in out


def test_python_variables_are_not_tables(warehouse, capsys):
    """DuckDB's Python client would otherwise scan a DataFrame of the calling frame by its name."""
    with sandbox.sandbox([warehouse]) as con:
        secret_frame = pd.DataFrame({"x": ["TOPSECRET"]})
        assert len(secret_frame) == 1
        with pytest.raises(duckdb.CatalogException, match="secret_frame does not exist"):
            con.execute("SELECT * FROM secret_frame")
    with duckdb.connect(":memory:") as plain:  # what the setting prevents
        assert plain.execute("SELECT * FROM secret_frame").fetchall() == [("TOPSECRET",)]


def test_the_sandbox_settings_are_in_force_and_locked(warehouse):
    expected = {"python_enable_replacements": "false", "autoinstall_known_extensions": "false",
                "autoload_known_extensions": "false", "allow_community_extensions": "false",
                "allow_persistent_secrets": "false", "enable_external_access": "false", "lock_configuration": "true"}
    with sandbox.sandbox([warehouse]) as con:
        got = dict(con.execute("SELECT name, value FROM duckdb_settings() WHERE list_contains($n, name)",
                               {"n": list(expected)}).fetchall())
        assert got == expected
        (read_only,) = con.execute("SELECT readonly FROM duckdb_databases() WHERE database_name = 'warehouse'"
                                   ).fetchone()
        assert read_only
        for name in expected:
            with pytest.raises(duckdb.InvalidInputException, match="configuration has been locked"):
                con.execute(f"RESET {name}")


@pytest.mark.parametrize("query,kind", [
    ("SELEC 1", "Parser Error"),
    ("SELECT nope FROM head_metrics", "Binder Error"),
    ("SELECT * FROM no_such_table", "Catalog Error"),
    ("SELECT 1 +", "Parser Error"),
])
def test_query_errors_are_one_line_exit_2(warehouse, capsys, query, kind):
    code, out, err = run_sql(capsys, warehouse, query)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {kind}") and err.count("\n") == 1
    assert "LINE 1" not in err and "Traceback" not in err


def test_sandbox_attaches_more_warehouses_read_only(tmp_path):
    """Several files: each attached READ_ONLY under its stem, the bare names read the union of all files."""
    a, b = tmp_path / "a.duckdb", tmp_path / "models" / "b.duckdb"
    for path, model, n in ((a, "ma", 2), (b, "mb", 5)):
        db.ensure_schema(path)
        with db.writer(path) as con:
            con.execute("INSERT INTO runs (run_id, model) SELECT 'r' || i, $m FROM range($n) t(i)", {"m": model, "n": n})
    before = (_sha(a), _sha(b))
    names, rows = sandbox.read_only_query([a, b], "SELECT (SELECT count(*) FROM runs) AS n, (SELECT count(*) FROM a.runs) AS na, "
                                             "(SELECT count(*) FROM b.runs) AS nb")
    assert (names, rows) == (["n", "na", "nb"], [(7, 2, 5)])
    with sandbox.sandbox([a, b]) as con:
        for stmt in ("DELETE FROM b.runs", "DELETE FROM a.runs", "INSERT INTO a.runs (run_id, model) VALUES ('x', 'y')"):
            with pytest.raises(duckdb.Error, match="read-only"):
                con.execute(stmt)
        with pytest.raises(duckdb.Error):  # the union is a view
            con.execute("DELETE FROM runs")
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            con.execute(f"ATTACH '{tmp_path / 'c.duckdb'}' AS c")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
    assert (_sha(a), _sha(b)) == before and not (tmp_path / "c.duckdb").exists()
    with pytest.raises(ValueError, match="named 'a'"):
        sandbox.read_only_query([a, tmp_path / "x" / "a.duckdb"], "SELECT 1")


def test_sql_on_a_file_that_is_not_a_warehouse(tmp_path, capsys):
    text = tmp_path / "notes.duckdb"
    text.write_text("not a database\n" * 10)
    code, _, err = run_sql(capsys, text, "SELECT 1")
    assert code == 2 and str(text) in err and "not a DuckDB database" in err
    assert text.read_text() == "not a database\n" * 10
