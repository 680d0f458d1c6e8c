"""Several processes on one warehouse: writers wait or fail clearly, concurrent runs and a polling
reader (the UI/sensor) lose nothing, and `plasticity sql` never writes."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli.main import main
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

REPO = Path(__file__).resolve().parents[1]
RESULT_TABLES = ("head_metrics", "head_bucket_plasticity", "head_component_weights")

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from warehouse.store import db
    with db.writer(sys.argv[1]) as con:
        con.execute("CREATE TABLE IF NOT EXISTS hold_marker (a INTEGER)")
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def python(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=kw.pop("cwd", REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == expected:
                return
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"subprocess never printed {expected!r}: {proc.stderr.read() if proc.poll() is not None else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def table_digest(path: Path) -> dict[str, str]:
    with db.reader(path, 30) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        return {t: hashlib.sha1(repr(con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()).encode()).hexdigest()
                for t in tables}


def test_second_writer_fails_fast_with_a_clear_message_or_waits(tmp_path):
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)
    holder = python("-c", HOLD_LOCK, str(wh), "2.5")
    try:
        wait_for_line(holder, "locked")
        t0 = time.monotonic()
        with pytest.raises(db.WarehouseBusy) as busy:
            with db.writer(wh, timeout_s=0.3):
                pass
        assert time.monotonic() - t0 < 2.0
        message = str(busy.value)
        assert str(wh) in message and "locked by another process" in message and "read-write" in message
        with pytest.raises(db.WarehouseBusy, match="read-only"):  # readers wait for the writer too
            with db.reader(wh, timeout_s=0.3):
                pass
        # with a long enough timeout the second writer waits for the first and succeeds
        with db.writer(wh, timeout_s=60) as con:
            waited = time.monotonic() - t0
            con.execute("INSERT INTO hold_marker VALUES (1)")
        assert waited > 1.0
        assert holder.wait(timeout=30) == 0
    finally:
        stop(holder)
    with db.reader(wh) as con:
        assert con.execute("SELECT count(*) FROM hold_marker").fetchone() == (1,)


def test_two_runs_and_a_polling_reader_at_once_lose_nothing(small_dataset, tmp_path):
    """Two `plasticity analyze` of different models into one warehouse while a sensor-like reader
    polls it: both runs complete, every row of both is there once, and equal to a solo run."""
    wh = tmp_path / "wh.duckdb"
    runs = [
        python("-m", "cli.main", "analyze", "--dataset_local_root", str(small_dataset), "--model", model,
               "--warehouse", str(wh), "--output_dir", str(tmp_path / "results"), "--max_workers", "1",
               "--attention", "false", "--quiet")
        for model in ("model-a", "model-b")
    ]
    seen = []
    try:
        while any(p.poll() is None for p in runs):
            if wh.exists():
                try:
                    with db.reader(wh, timeout_s=30) as con:
                        seen.append(con.execute("SELECT count(*) FROM head_metrics").fetchone()[0])
                except Exception as exc:  # the file may not have its tables yet
                    if "head_metrics" not in str(exc):
                        raise
            time.sleep(0.02)
        outs = [p.communicate(timeout=60) for p in runs]
        assert [p.returncode for p in runs] == [0, 0], outs
    finally:
        for p in runs:
            stop(p)
    assert seen and seen == sorted(seen)  # the reader never saw rows disappear

    solo_cfg = load_config(None, {"warehouse": str(tmp_path / "solo.duckdb"), "max_workers": 1, "attention": False})
    solo = analyze_dataset(solo_cfg, small_dataset, model="solo", progress=False)
    with db.reader(solo_cfg.warehouse) as con:
        expected = {t: con.execute(f"SELECT * EXCLUDE (model, run_id) FROM {t} ORDER BY ALL").fetchall()
                    for t in RESULT_TABLES}
    with db.reader(wh) as con:
        status = con.execute("SELECT model, status, n_done, n_errors FROM runs ORDER BY model").fetchall()
        assert status == [("model-a", "succeeded", solo.n_heads, 0), ("model-b", "succeeded", solo.n_heads, 0)]
        for model in ("model-a", "model-b"):
            for t in RESULT_TABLES:
                got = con.execute(f"SELECT * EXCLUDE (model, run_id) FROM {t} WHERE model = $m ORDER BY ALL",
                                  {"m": model}).fetchall()
                assert got == expected[t], (model, t)  # every row once, bit for bit (no NaN in these runs)


def test_plasticity_sql_is_read_only(small_dataset, tmp_path, capsys):
    wh = tmp_path / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False})
    s = analyze_dataset(cfg, small_dataset, progress=False)
    before = table_digest(wh)
    stat_before = wh.stat()
    out = tmp_path / "out"
    # refused by DuckDB itself (the sandbox of warehouse.store.db), with its own words
    read_only, no_files, locked = "read-only mode", "disabled by configuration", "configuration has been locked"
    refused = {
        "DELETE FROM head_metrics": read_only,
        "CREATE TABLE x (a INT)": read_only,
        "INSERT INTO runs (run_id, model) VALUES ('x', 'y')": read_only,
        "UPDATE head_metrics SET ap_overall = 0": read_only,
        "DROP TABLE head_metrics": read_only,
        f"ATTACH '{out}.duckdb' AS other": no_files,
        f"COPY head_metrics TO '{out}1.csv'": no_files,
        f"/* a comment first */ COPY (SELECT 1) TO '{out}2.csv'": no_files,
        f"SELECT 1;\n copy head_metrics TO '{out}3.csv'": no_files,
        f"EXPORT DATABASE '{out}-export'": no_files,
        "INSTALL httpfs": no_files,
        "SET threads = 1": locked,
    }
    for stmt, said in refused.items():
        assert main(["sql", stmt, "--warehouse", str(wh)]) == 2, stmt
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and err.count("\n") == 1, (stmt, err)
    # harmless on a read-only connection: allowed, and the file does not change
    for stmt in ("CHECKPOINT", "EXPLAIN ANALYZE SELECT 1"):
        assert main(["sql", stmt, "--warehouse", str(wh)]) == 0, stmt
    capsys.readouterr()
    assert not list(tmp_path.glob("out*")), "a refused statement wrote a file"
    assert table_digest(wh) == before
    assert (wh.stat().st_size, wh.stat().st_mtime_ns) == (stat_before.st_size, stat_before.st_mtime_ns)

    # the real entry point, in its own process: same refusal and exit code
    proc = python("-m", "cli.main", "sql", "DELETE FROM head_metrics", "--warehouse", str(wh))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and read_only in err and "Traceback" not in err

    # reads work while no writer holds the file
    assert main(["sql", "SELECT count(*) AS n FROM head_metrics", "--warehouse", str(wh), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", str(s.n_heads)]
    assert main(["sql", "SHOW TABLES", "--warehouse", str(wh), "--csv"]) == 0
    assert "head_metrics" in capsys.readouterr().out.splitlines()
    assert table_digest(wh) == before
