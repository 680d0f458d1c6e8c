"""The warehouse file is checked before use, versioned, upgraded idempotently, and never left with a 'running' run.

Every bad file (not DuckDB, empty, truncated, corrupt, a folder, unwritable, foreign tables with our
names, a newer schema) is one clear error naming the file, exit 2, with the file and its folder
byte-identical afterwards and no results folder created.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from cli.main import main
from warehouse.store import db, schema
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset
from test_concurrency import stop

REPO = Path(__file__).resolve().parents[1]
V0_SCHEMA = REPO / "tests" / "fixtures" / "warehouse-v0" / "schema.sql"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a hash of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def analyze_argv(data: Path, wh: Path, out: Path) -> list[str]:
    return ["analyze", "--dataset_local_root", str(data), "--warehouse", str(wh), "--output_dir", str(out),
            "--quiet", "--max_workers", "1", "--attention", "false"]


@pytest.fixture(scope="module")
def good_warehouse(small_dataset, tmp_path_factory) -> Path:
    """A warehouse with one finished run of the small dataset (copied by the tests that damage it)."""
    wh = tmp_path_factory.mktemp("good") / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "small"})
    analyze_dataset(cfg, small_dataset, progress=False)
    return wh


def _text(path: Path) -> None:
    path.write_text("model,layer\nm,0\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _folder(path: Path) -> None:
    path.mkdir()
    (path / "inside.txt").write_text("x")


def _foreign_head_metrics(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE head_metrics (model VARCHAR, run_id VARCHAR, score DOUBLE)")
    con.execute("INSERT INTO head_metrics VALUES ('m', 'r', 0.5)")
    con.close()


def _foreign_runs(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE runs (id INTEGER, name VARCHAR, started TIMESTAMP)")
    con.close()


def _runs_as_a_view(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE jobs (run_id VARCHAR)")
    con.execute("CREATE VIEW runs AS SELECT * FROM jobs")
    con.close()


BAD_FILES = {
    "text": (_text, "is not a DuckDB database file"),
    "empty": (_empty, "is an empty file"),
    "folder": (_folder, "is a folder, not a DuckDB file"),
    "foreign_head_metrics": (_foreign_head_metrics, "table head_metrics: unexpected column(s) score DOUBLE; "
                                                    "missing column(s) ap_ci_calibrated BOOLEAN, ap_overall DOUBLE"),
    "foreign_runs": (_foreign_runs, "table runs: unexpected column(s) id INTEGER, name VARCHAR, started TIMESTAMP"),
    "runs_as_a_view": (_runs_as_a_view, "runs is a view, not a table"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_warehouse_file_is_one_clear_error_and_stays_as_it_was(kind, small_dataset, tmp_path, capsys):
    make, said = BAD_FILES[kind]
    wh = tmp_path / "store" / "wh.duckdb"
    wh.parent.mkdir()
    make(wh)
    before = snapshot(tmp_path / "store")
    assert main(analyze_argv(small_dataset, wh, tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: warehouse {wh}") and said in err and err.count("\n") == 1, err
    if kind in ("foreign_head_metrics", "foreign_runs", "runs_as_a_view"):
        assert "so it is not (or no longer) this tool's warehouse" in err
    assert snapshot(tmp_path / "store") == before  # byte-identical, no .wal beside it
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "catalog"])
def test_a_damaged_warehouse_is_refused_untouched(damage, good_warehouse, small_dataset, tmp_path, capsys):
    wh = tmp_path / "store" / "wh.duckdb"
    wh.parent.mkdir()
    shutil.copy(good_warehouse, wh)
    if damage == "truncated":  # inside the first 256 KiB block after the 12 KiB of headers
        os.truncate(wh, 3 * 4096 + 100_000)
    else:
        with open(wh, "r+b") as fh:  # the magic bytes stay: only DuckDB's checksums can tell
            fh.seek(12 if damage == "header" else 4096)
            fh.write(bytes(range(256)) * 16)
    before = snapshot(tmp_path / "store")
    assert main(analyze_argv(small_dataset, wh, tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert f"warehouse {wh} is damaged or not a DuckDB database" in err and err.count("\n") == 1, err
    assert snapshot(tmp_path / "store") == before
    assert main(["sql", "SELECT 1", "--warehouse", str(wh)]) == 2  # readers say the same
    assert f"warehouse {wh} is damaged" in capsys.readouterr().err


def test_a_warehouse_from_a_newer_version_is_refused(good_warehouse, small_dataset, tmp_path, capsys):
    wh = tmp_path / "wh.duckdb"
    shutil.copy(good_warehouse, wh)
    with db.writer(wh) as con:
        con.execute("INSERT INTO schema_migrations VALUES (99, '099_future.sql', now())")
    before = snapshot(tmp_path)
    assert main(analyze_argv(small_dataset, wh, tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert "has schema version 99, newer than this version of the tool" in err
    assert snapshot(tmp_path) == before


def _without_file_capabilities() -> None:  # pragma: no cover -- runs in the child before exec
    """As root, file permissions do not apply. Dropping these capabilities from the bounding set makes the
    exec'd program run without them, so permissions apply as for any user (PR_CAPBSET_DROP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        libc.prctl(24, cap, 0, 0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux capabilities when run as root")
@pytest.mark.parametrize("case", ["read_only_file", "read_only_folder", "new_file_in_read_only_folder"])
def test_an_unwritable_warehouse_is_refused_before_anything_runs(case, good_warehouse, small_dataset, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    wh = store / "wh.duckdb"
    if case != "new_file_in_read_only_folder":
        shutil.copy(good_warehouse, wh)
    if case == "read_only_file":
        wh.chmod(0o444)
    else:
        store.chmod(0o555)
    before = snapshot(store)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", *analyze_argv(small_dataset, wh, tmp_path / "results")],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=_without_file_capabilities,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        store.chmod(0o755)
    said = {"read_only_file": f"warehouse {wh} is not writable: Permission denied",
            "read_only_folder": f"warehouse {wh}: its folder is not writable",
            "new_file_in_read_only_folder": f"warehouse {wh}: folder {store} is not writable"}[case]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {said}" or proc.stderr.startswith(f"error: {said}"), proc.stderr
    assert snapshot(store) == before and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- versions and upgrades


def _v0_warehouse(path: Path) -> None:
    """A warehouse as main wrote it before versioning, with a finished run, results and a run left 'running'."""
    con = duckdb.connect(str(path))
    con.execute(V0_SCHEMA.read_text())
    con.execute("INSERT INTO runs VALUES ('r1', 'm', NULL, 'rev', '{}', '0.1.0', TIMESTAMP '2026-11-01 10:00:00', "
                "TIMESTAMP '2026-11-01 10:05:00', 'succeeded', 2, 2, 0)")
    con.execute("INSERT INTO runs VALUES ('r2', 'm', NULL, 'rev2', '{}', '0.1.0', TIMESTAMP '2026-11-02 10:00:00', "
                "NULL, 'running', 2, NULL, NULL)")
    con.execute("INSERT INTO head_metrics (model, run_id, layer, q_head, k_head, ap_overall, estimator) VALUES "
                "('m', 'r1', 0, 0, 0, 0.25, 'bucket_full_cov'), ('m', 'r1', 0, 1, 0, 0.75, 'bucket_full_cov')")
    con.close()


def _contents(path: Path) -> dict:
    with db.reader(path) as con:
        return {
            "runs": con.execute("SELECT * EXCLUDE (error) FROM runs ORDER BY run_id").fetchall(),
            # the columns a v0 warehouse had (later migrations add columns, NULL in old rows)
            "head_metrics": con.execute("SELECT * EXCLUDE (ap_overall_se_pairs, ap_overall_ci_low, ap_overall_ci_high, "
                                        "ap_se_df, n_examples, ap_ci_calibrated) FROM head_metrics ORDER BY ALL").fetchall(),
            "latest": con.execute("SELECT run_id FROM latest_runs").fetchall(),
        }


def test_a_warehouse_from_before_versioning_upgrades_cleanly_and_idempotently(tmp_path):
    wh = tmp_path / "old.duckdb"
    _v0_warehouse(wh)
    with db.reader(wh) as con:
        old = {"runs": con.execute("SELECT * FROM runs ORDER BY run_id").fetchall(),
               "head_metrics": con.execute("SELECT * FROM head_metrics ORDER BY ALL").fetchall()}
        assert schema.stored_version(con) == 0
    assert db.ensure_schema(wh) == schema.schema_version() >= 1
    after = _contents(wh)
    assert after["runs"] == old["runs"] and after["head_metrics"] == old["head_metrics"]  # no row changed
    with db.reader(wh) as con:
        assert schema.stored_version(con) == schema.schema_version()
        assert con.execute("SELECT error FROM runs").fetchall() == [(None,), (None,)]
        assert schema.differences(schema.read_shape(con), schema.latest_shape()) == []
        applied = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        comment = con.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'runs' "
                              "AND column_name = 'error'").fetchone()[0]
    assert applied == [(m.version, m.name) for m in schema.migrations()]
    assert "stopped early" in comment
    # again: nothing changes (no migration applied twice, same rows)
    assert db.ensure_schema(wh) == schema.schema_version()
    with db.reader(wh) as con:
        assert con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == \
            [(m.version,) for m in schema.migrations()]
    assert _contents(wh) == after


def test_a_new_warehouse_has_the_latest_schema_and_version(tmp_path):
    wh = tmp_path / "deep" / "new.duckdb"
    assert db.ensure_schema(wh) == schema.schema_version()
    with db.reader(wh) as con:
        assert schema.differences(schema.read_shape(con), schema.latest_shape()) == []
        (n,) = con.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert n == len(schema.migrations())


def test_the_upgraded_old_warehouse_takes_new_runs(small_dataset, tmp_path):
    wh = tmp_path / "old.duckdb"
    _v0_warehouse(wh)
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "small"})
    summary = analyze_dataset(cfg, small_dataset, progress=False)
    assert summary.status == "succeeded" and summary.n_done == 8
    with db.reader(wh) as con:
        assert con.execute("SELECT count(*) FROM head_metrics WHERE model = 'm'").fetchone() == (2,)
        assert con.execute("SELECT status, error FROM runs WHERE model = 'small'").fetchall() == [("succeeded", None)]


def _v4_warehouse(path: Path) -> None:
    """A warehouse as the version before families of checkpoints wrote it: models without family,
    stage and step, four migrations recorded."""
    db.ensure_schema(path)
    con = duckdb.connect(str(path))
    for column in ("family", "stage", "step"):
        con.execute(f"ALTER TABLE models DROP COLUMN {column}")
    con.execute("DELETE FROM schema_migrations WHERE version >= 5")
    con.close()


@pytest.mark.parametrize("old", [_v0_warehouse, _v4_warehouse], ids=["before-versioning", "version-4"])
def test_the_upgraded_old_warehouse_takes_attention_and_a_checkpoint_of_a_family(small_dataset, tmp_path, old):
    """The columns later migrations added, used by a real run on an upgraded file: the attention
    status and exact rows, and a family, stage and a step beyond the 32-bit range."""
    wh = tmp_path / "old.duckdb"
    old(wh)
    with db.reader(wh) as con:
        assert schema.stored_version(con) < 5  # precondition: the families' migration is still to come
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": "true", "model": "small",
                             "layers": [0], "family": "fam", "stage": "pre", "step": 2**40})
    summary = analyze_dataset(cfg, small_dataset, progress=False)
    assert summary.status == "succeeded" and summary.n_done == 4
    with db.reader(wh) as con:
        assert con.execute("SELECT family, stage, step FROM models WHERE model = 'small'").fetchall() == \
            [("fam", "pre", 2**40)]
        assert con.execute("SELECT DISTINCT status, n_exact_rows > 0, min_exact_rows FROM head_attention_summary"
                           ).fetchall() == [("exact", True, 100)]
        assert con.execute("SELECT bool_and(exact), count(*) > 0 FROM token_attention").fetchone() == (True, True)
        assert con.execute("SELECT count(*) FROM family_head_trajectory WHERE family = 'fam'").fetchone() == (4,)


def test_migrations_are_numbered_files_applied_in_order(tmp_path, monkeypatch):
    """A later schema change is one more numbered file; the rehearsal refuses an upgrade that would not
    end in the latest shape."""
    assert [m.version for m in schema.migrations()] == list(range(1, len(schema.migrations()) + 1))
    for m in schema.migrations():
        assert m.name.startswith(f"{m.version:03d}_") and "IF NOT EXISTS" in m.text.upper()
    wh = tmp_path / "old.duckdb"
    _v0_warehouse(wh)
    before = snapshot(tmp_path)
    with duckdb.connect(":memory:") as con:  # the v0 shape lacks runs.error: without migration 001 it stays so
        con.execute(V0_SCHEMA.read_text())
        v0 = schema.read_shape(con)
    problems = schema.differences(v0, schema.latest_shape(), missing=False)
    assert sorted(problems) == ["table head_attention_summary: missing column(s) exact_row_frac DOUBLE, "
                                "min_exact_rows INTEGER, n_exact_rows BIGINT, status VARCHAR, status_reason VARCHAR",
                                "table head_metrics: missing column(s) ap_ci_calibrated BOOLEAN, ap_overall_ci_high DOUBLE, ap_overall_ci_low "
                                "DOUBLE, ap_overall_se_pairs DOUBLE, ap_se_df INTEGER, n_examples INTEGER",
                                "table head_samples: missing column(s) plan_problem VARCHAR",
                                "table runs: missing column(s) error VARCHAR",
                                "table shards: missing column(s) problem VARCHAR",
                                "table token_attention: missing column(s) exact BOOLEAN"]
    monkeypatch.setattr(schema, "migrations", lambda: ())
    monkeypatch.setattr(schema, "schema_version", lambda: 1)
    with pytest.raises(db.WarehouseError, match="would lack what this version needs after the upgrade: .*table runs: "
                                                r"missing column\(s\) error VARCHAR; .*sql/schema.sql gained it "
                                                "without a migration"):
        db.ensure_schema(wh)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- runs never left 'running'


def test_a_run_that_fails_midway_is_marked_failed_and_keeps_its_heads(small_dataset, tmp_path):
    wh = tmp_path / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "m"})
    seen = []

    def explode(outcome) -> None:
        seen.append(outcome)
        if len(seen) == 6:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        analyze_dataset(cfg, small_dataset, progress=False, on_outcome=explode)
    with db.reader(wh) as con:
        (status, error, n_done) = con.execute("SELECT status, error, n_done FROM runs").fetchone()
        (n_metrics,) = con.execute("SELECT count(*) FROM head_metrics").fetchone()
    assert (status, error) == ("failed", "RuntimeError: disk full")
    assert n_done == n_metrics == 6  # the group that had finished was committed, not lost
    summary = analyze_dataset(cfg, small_dataset, progress=False)  # resumes the committed heads
    assert (summary.n_skipped, summary.n_computed, summary.status) == (6, 2, "succeeded")
    with db.reader(wh) as con:
        assert con.execute("SELECT status, error FROM runs").fetchall() == [("succeeded", None)]


def default_signal_handlers() -> None:
    """In the child before exec: SIGINT and SIGTERM back to their default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_is_marked_interrupted(sig, tmp_path):
    """A real `plasticity analyze` with 2 workers, stopped by a signal once its run is recorded."""
    from plasticity.synthetic import SyntheticSpec
    from warehouse.sources.demo_data import write_synthetic_dataset

    spec = SyntheticSpec(model="slow", num_layers=6, num_q_heads=4, num_k_heads=2, head_dim=16, num_examples=12,
                         seq_len=1024, bucket_size=64, sliding_windows={}, seed=1)
    data = write_synthetic_dataset(tmp_path / "slow", spec, with_truth=False)
    wh = tmp_path / "wh.duckdb"
    argv = analyze_argv(data, wh, tmp_path / "results")
    argv[argv.index("--max_workers") + 1] = "2"
    argv[argv.index("--attention") + 1] = "true"  # slow enough to stop midway
    # The child gets its own session and the default disposition of both signals, whoever started
    # pytest: a shell starts a background job with SIGINT ignored, and an ignored SIGINT stays
    # ignored across exec (Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            preexec_fn=default_signal_handlers)
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                with db.reader(wh, timeout_s=5) as con:
                    row = con.execute("SELECT status FROM runs").fetchone()
            except (FileNotFoundError, db.WarehouseError, duckdb.Error):
                continue
            if row is not None:
                status = row[0]
                break
        assert status == "running", proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)  # killed if the test failed before it ended
    assert proc.returncode == 130, err
    assert "interrupted" in err and "leaked semaphore" not in err
    with db.reader(wh) as con:
        (status, error, n_done) = con.execute("SELECT status, error, n_done FROM runs").fetchone()
        (n_metrics,) = con.execute("SELECT count(*) FROM head_metrics").fetchone()
    assert status == "interrupted" and error.startswith("KeyboardInterrupt"), (status, error)
    assert n_done == n_metrics < 24
    assert not (tmp_path / "results").exists()


def test_new_columns_are_documented_and_commented_alike(tmp_path):
    """docs/metrics.md's meaning of each column this branch adds or changes is its DuckDB comment."""
    doc = (REPO / "docs" / "metrics.md").read_text()
    meanings = {}
    for section in ("runs", "schema_migrations"):
        body = doc.split(f"### `{section}` (table)", 1)[1].split("\n### ", 1)[0]
        for line in body.splitlines():
            if line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                meanings[(section, cells[0].strip("`"))] = (cells[1], cells[3])
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)
    with db.reader(wh) as con:
        columns = {(t, c): (ty, cm) for t, c, ty, cm in con.execute(
            "SELECT table_name, column_name, data_type, comment FROM duckdb_columns() "
            "WHERE table_name IN ('runs', 'schema_migrations', 'latest_runs')").fetchall()}
    assert {k for k in columns if k[0] != "latest_runs"} == set(meanings)  # every column documented, none more
    for (table, column), (dtype, comment) in columns.items():
        doc_type, meaning = meanings[("runs" if table == "latest_runs" else table, column)]
        assert dtype == doc_type, (table, column)
        if comment:  # this branch comments the columns it adds or changes
            assert comment == meaning.replace("`", ""), (table, column)
    for key in (("runs", "error"), ("latest_runs", "error"), ("runs", "status"), ("schema_migrations", "version"),
                ("schema_migrations", "name"), ("schema_migrations", "applied_at")):
        assert columns[key][1], f"{key} has no comment"
