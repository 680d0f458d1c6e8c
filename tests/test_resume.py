"""A run killed with SIGKILL mid-way leaves a consistent warehouse; the next run of the same model
and config skips the heads already done and ends with results identical to an uninterrupted run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plasticity.synthetic import SyntheticSpec
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset

REPO = Path(__file__).resolve().parents[1]
TABLES = ("head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors")
SPEC = SyntheticSpec(model="resume", num_layers=6, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=6,
                     seq_len=256, bucket_size=32, sliding_windows={2: 64}, seed=9)
N_HEADS = SPEC.num_layers * SPEC.num_q_heads

# The run to kill: two worker processes, a commit every 4 heads, and a pause per head so that the
# test can catch it with some heads committed and others not.
KILLED_RUN = textwrap.dedent("""
    import sys, time
    from warehouse.run import pipeline
    from warehouse.settings.config import load_config
    pipeline.FLUSH_EVERY_HEADS = 4
    pipeline.FLUSH_EVERY_SECONDS = 0.0
    cfg = load_config(None, {"warehouse": sys.argv[2], "max_workers": 2, "attention": False, "model": "m"})
    pipeline.analyze_dataset(cfg, sys.argv[1], progress=False, on_outcome=lambda o: time.sleep(0.15))
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("resume") / "data", SPEC, with_truth=False)


def config(wh: Path):
    return load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "m"})


def tables(wh: Path) -> dict[str, list[tuple]]:
    with db.reader(wh, 30) as con:
        return {t: con.execute(f"SELECT * EXCLUDE (model, run_id{', recorded_at' if t == 'head_errors' else ''}) "
                               f"FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(u == v or (isinstance(u, float) and math.isnan(u) and math.isnan(v)) for u, v in zip(x, y))
        for x, y in zip(a, b)
    )


def committed_heads(wh: Path) -> int:
    if not wh.exists():
        return 0
    try:
        with db.reader(wh, 30) as con:
            return con.execute("SELECT count(*) FROM head_metrics").fetchone()[0]
    except Exception as exc:  # the schema may not be there yet
        if "head_metrics" in str(exc):
            return 0
        raise


def assert_consistent(wh: Path) -> tuple[set[tuple[int, int]], str]:
    """Every head in head_metrics has all its cell and component rows, nothing is duplicated."""
    with db.reader(wh, 30) as con:
        heads = con.execute("SELECT layer, q_head, d_model FROM head_metrics").fetchall()
        assert len(heads) == len({(l, q) for l, q, _ in heads}), "duplicate head_metrics rows"
        comps = dict(((l, q), n) for l, q, n in con.execute(
            "SELECT layer, q_head, count(*) FROM head_component_weights GROUP BY ALL").fetchall())
        cells = dict(((l, q), n) for l, q, n in con.execute(
            "SELECT layer, q_head, count(*) FROM head_bucket_plasticity GROUP BY ALL").fetchall())
        dup_cells = con.execute("SELECT count(*) FROM (SELECT layer, q_head, q_bucket, k_bucket FROM "
                                "head_bucket_plasticity GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        assert dup_cells == 0
        for layer, q_head, d in heads:
            assert comps.get((layer, q_head)) == d, (layer, q_head)
            # SEQ 256 / bucket 32: buckets 0..7, query buckets 1..7; with a window of 64 positions
            # only the two buckets before j are eligible
            expected = sum(min(j, 2) if layer == 2 else j for j in range(1, 8))
            assert cells.get((layer, q_head)) == expected, (layer, q_head)
        assert set(comps) == set(cells) == {(l, q) for l, q, _ in heads}, "rows of heads without head_metrics"
        (status,), = con.execute("SELECT status FROM runs").fetchall()
    return {(l, q) for l, q, _ in heads}, status


def test_killed_run_resumes_to_identical_results(dataset, tmp_path):
    reference_wh = tmp_path / "reference.duckdb"
    reference = analyze_dataset(config(reference_wh), dataset, progress=False)
    assert reference.n_done == N_HEADS and reference.n_errors == 0
    expected = tables(reference_wh)

    wh = tmp_path / "killed.duckdb"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(dataset), str(wh)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            done = committed_heads(wh)
            if done > 0:
                break
            time.sleep(0.02)
        assert proc.poll() is None and 0 < done < N_HEADS, (done, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)  # the coordinating process, mid-run, without warning
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # its worker processes, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # the warehouse opens, is consistent, and holds part of the run
    partial, status = assert_consistent(wh)
    assert 0 < len(partial) < N_HEADS and status == "running"
    got = tables(wh)
    for t in ("head_metrics", "head_bucket_plasticity", "head_component_weights"):
        partial_expected = [r for r in expected[t] if (r[0], r[1]) in partial]
        assert same_rows(got[t], partial_expected), t  # what was committed is already final

    resumed = analyze_dataset(config(wh), dataset, progress=False)
    assert resumed.run_id == reference.run_id
    assert resumed.n_skipped == len(partial) > 0 and resumed.n_computed == N_HEADS - len(partial)
    assert resumed.n_done == N_HEADS and resumed.status == "succeeded"
    final, status = assert_consistent(wh)
    assert len(final) == N_HEADS and status == "succeeded"
    got = tables(wh)
    for t in TABLES:
        assert same_rows(got[t], expected[t]), t
