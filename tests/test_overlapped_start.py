"""A local run computes while its revision is hashed (`warehouse.run.pipeline._analyze_local`): results
are committed only under the run id of the bytes analysed, a resumed run computes no head it has,
heads held back for the revision are computed once it is known, and a failure or an interrupt
before it is known leaves the warehouse right and no process behind.

The slow hash is real: a sparse file of a few GiB in a folder the catalog counts for the revision (a
key shard whose layer number is beyond the stored integer range: a catalog problem, no head) takes
the hash seconds to read and costs no disk.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warehouse.run.pipeline import analyze_dataset
from warehouse.run.processes import alive, descendants
from warehouse.settings.config import load_config
from warehouse.sources.catalog import scan_shards
from warehouse.sources.revision import RevisionHash, content_revision, file_sha256
from warehouse.store import db
from test_concurrency import stop

REPO = Path(__file__).resolve().parents[1]
STRAY = "l99999999999h00k"  # beyond the int32 layer range: hashed for the revision, never analysed
#: ~0.3 CPU s of SHA-256 (more under load): several times the first group of the small dataset
HASH_GIB = 0.5


def add_sparse_stray(root: Path, gib: float) -> Path:
    path = root / STRAY / "data.parquet"
    path.parent.mkdir()
    with open(path, "wb") as fh:
        fh.truncate(int(gib * 2**30))
    return path


def config(wh: Path, workers: int = 1, **extra):
    return load_config(None, {"warehouse": str(wh), "max_workers": workers, "attention": False, "model": "m",
                              **extra})


def metric_rows(wh: Path) -> dict:
    """head_metrics by head, without the columns that name the run."""
    with db.reader(wh) as con:
        cur = con.execute("SELECT * EXCLUDE (model, run_id) FROM head_metrics ORDER BY layer, q_head")
        names = [d[0] for d in cur.description]
        return {(r[names.index("layer")], r[names.index("q_head")]): r for r in cur.fetchall()}


def same(a, b) -> bool:
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory) -> dict:
    wh = tmp_path_factory.mktemp("reference") / "wh.duckdb"
    analyze_dataset(config(wh), small_dataset, progress=False)
    return metric_rows(wh)


def test_the_background_hash_is_the_content_revision(small_copy):
    scan = scan_shards(small_copy)
    expected = content_revision(scan.base, scan.paths)
    first = list(reversed(scan.paths))[:3]
    for threads in (1, 3):
        with RevisionHash(scan.base, scan.paths, first=first, threads=threads) as job:
            assert job.digest(scan.paths[0]) == file_sha256(scan.paths[0])
            assert job.revision() == expected and job.done()
            assert job.digest(str(small_copy / "not-a-shard")) is None
    big = add_sparse_stray(small_copy, 4)
    job = RevisionHash(small_copy, [*scan.paths, str(big)], first=[str(big)], threads=1)
    job.close()  # stops between two reads of the 4 GiB file: no digest of part of it is given out
    assert not job.done()
    with pytest.raises(RuntimeError, match="stopped"):
        job.digest(str(big))


def test_results_arrive_before_the_revision_and_are_stored_under_it(small_copy, reference, tmp_path):
    add_sparse_stray(small_copy, HASH_GIB)
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)  # created beforehand: the first group starts at once
    runs_at_first_outcome = []

    def first(outcome) -> None:
        if not runs_at_first_outcome:
            with db.reader(wh) as con:
                runs_at_first_outcome.append(con.execute("SELECT count(*) FROM runs").fetchone()[0])

    summary = analyze_dataset(config(wh), small_copy, progress=False, on_outcome=first)
    assert runs_at_first_outcome == [0]  # computed while the hash still ran: no run recorded yet
    scan = scan_shards(small_copy)
    assert summary.revision == content_revision(scan.base, scan.paths)  # the stray file's bytes count
    with db.reader(wh) as con:
        assert con.execute("SELECT run_id, revision, status FROM runs").fetchall() == [
            (summary.run_id, summary.revision, "succeeded")]
    got = metric_rows(wh)
    assert got.keys() == reference.keys() and all(same(got[h], reference[h]) for h in got)


def test_a_failure_before_the_revision_is_known_records_the_run_as_failed(small_copy, reference, tmp_path):
    """As a failure after it does (tests/test_warehouse_file.py): the run is waited for, recorded as
    failed, with the heads computed before the failure committed under it."""
    add_sparse_stray(small_copy, HASH_GIB)
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)

    def explode(outcome) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        analyze_dataset(config(wh), small_copy, progress=False, on_outcome=explode)
    with db.reader(wh) as con:
        (status, error, n_done), = con.execute("SELECT status, error, n_done FROM runs").fetchall()
    assert (status, error, n_done) == ("failed", "RuntimeError: disk full", 2)  # the first GQA group
    got = metric_rows(wh)
    assert len(got) == 2 and all(same(got[h], reference[h]) for h in got)


def test_heads_held_back_for_the_revision_are_computed_when_it_is_new(small_copy, reference, tmp_path):
    wh = tmp_path / "wh.duckdb"
    before = analyze_dataset(config(wh), small_copy, progress=False)
    (small_copy / STRAY).mkdir()
    (small_copy / STRAY / "data.parquet").write_bytes(b"new bytes: a new revision, the same heads")
    # every head is done in a run with these settings: all wait for the revision, which is new
    after = analyze_dataset(config(wh, workers=2), small_copy, progress=False)
    assert after.run_id != before.run_id and after.revision != before.revision
    assert (after.n_skipped, after.n_computed, after.n_done, after.status) == (0, 8, 8, "succeeded")
    with db.reader(wh) as con:
        rows = con.execute("SELECT run_id, count(*) FROM head_metrics GROUP BY ALL ORDER BY ALL").fetchall()
    assert sorted(rows) == sorted([(before.run_id, 8), (after.run_id, 8)])
    again = analyze_dataset(config(wh), small_copy, progress=False)  # the same revision: all resumed
    assert (again.run_id, again.n_skipped, again.n_computed) == (after.run_id, 8, 0)


def _workers_started(pid: int) -> dict | None:
    found = {}
    for p, t in descendants(pid).items():
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd:
            found[p] = t
    return found if len(found) >= 2 else None


def test_an_interrupt_while_the_revision_is_hashed(small_copy, tmp_path):
    """Stopped (a closed terminal: SIGHUP; Ctrl-C and SIGTERM take the same path, tests/test_warehouse_file.py)
    while the workers compute and the run id is not known: status 130, no run recorded (nothing was
    committed under an id not yet known), and no process left."""
    add_sparse_stray(small_copy, 16)  # minutes of hashing: the signal comes long before the end
    wh = tmp_path / "wh.duckdb"
    argv = [sys.executable, "-m", "cli.main", "analyze", "--dataset_local_root", str(small_copy), "--warehouse",
            str(wh), "--output_dir", str(tmp_path / "out"), "--quiet", "--max_workers", "2", "--attention", "false"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    tree = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and not tree:
            tree = _workers_started(proc.pid) or {}
            time.sleep(0.05)
        assert tree, proc.communicate()
        time.sleep(1.0)  # the workers compute the first groups
        tree.update(descendants(proc.pid))
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)  # killed if the test failed before it ended
    assert proc.returncode == 130, err
    assert "leaked semaphore" not in err
    deadline = time.monotonic() + 5
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(tree), f"processes left after the run stopped: {alive(tree)}"
    with db.reader(wh) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM head_metrics").fetchone()[0] == 0
    assert not (tmp_path / "out").exists()


def test_held_results_are_bounded(small_copy, reference, tmp_path, monkeypatch):
    """Past MAX_HELD_HEADS held heads the run waits for its revision before it starts another group (the
    bound is lowered to one GQA group here: the small dataset has four of two heads)."""
    from warehouse.run import pipeline

    monkeypatch.setattr(pipeline, "MAX_HELD_HEADS", 2)
    add_sparse_stray(small_copy, HASH_GIB)
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)
    runs_seen = []

    def seen(outcome) -> None:
        with db.reader(wh) as con:
            runs_seen.append(con.execute("SELECT count(*) FROM runs").fetchone()[0])

    summary = analyze_dataset(config(wh), small_copy, progress=False, on_outcome=seen)
    # the first group while the hash ran; the second only once the run was recorded
    assert runs_seen[:2] == [0, 0] and runs_seen[2:] == [1] * 6, runs_seen
    assert summary.status == "succeeded"
    got = metric_rows(wh)
    assert got.keys() == reference.keys() and all(same(got[h], reference[h]) for h in got)
