"""Operational options, each given a non-default value through the real entry point (`plasticity
analyze`, a Dagster materialisation): every stored value stays what the default run stores, and the
option has the effect it promises (worker processes, a lock given up on, files downloaded where and
how the option says). The analysis options are in test_options_effects.py.

The stored values are compared table by table, every column but the run's start and end times and
its recorded config (which holds the option itself)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cli.main import main
from plasticity.synthetic import SyntheticSpec
from stored_rows import stored_rows
from test_concurrency import HOLD_LOCK, python, stop, wait_for_line
from warehouse.store import db
from warehouse.sources.demo_data import write_synthetic_dataset

DATA = SyntheticSpec(model="ops", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                     seq_len=64, bucket_size=16, sliding_windows={1: 32}, seed=9)
N_HEADS = DATA.num_layers * DATA.num_q_heads


def _where_read(column: str, value):
    if column in ("path", "file") and isinstance(value, str):
        return "/".join(value.split("/")[-3:])  # where a shard was read: <model_dir>/lXXhYY?/data.parquet
    return value


def stored(path) -> dict[str, list]:
    """Every table's rows in a canonical order: NaN comparable, times, the run's config and the folders
    the shards were read from left out."""
    return stored_rows(path, drop=("config_json",), normalise=_where_read)


def assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert want["head_metrics"] and want["head_bucket_plasticity"]  # precondition: something to compare
    for table in want:
        assert got[table] == want[table], table


class SpawnedWorkers:
    """Process ids of this process's children started by multiprocessing's spawn (the run's workers),
    read from /proc every 10 ms while the block runs."""

    def __init__(self):
        self.pids: set[int] = set()
        self._stop = threading.Event()

    def _children(self) -> set[int]:
        me, found = str(os.getpid()), set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[1] != me:
                    continue
                if b"spawn_main" in Path(entry.path, "cmdline").read_bytes():
                    found.add(int(entry.name))
            except (OSError, IndexError):
                continue  # the process ended meanwhile
        return found

    def _poll(self):
        while not self._stop.is_set():
            self.pids |= self._children()
            time.sleep(0.01)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def analyze(dataset: Path, tmp: Path, *flags: str) -> tuple[Path, SpawnedWorkers]:
    wh = tmp / "wh.duckdb"
    argv = ["analyze", "--dataset_local_root", str(dataset), "--warehouse", str(wh), "--output_dir",
            str(tmp / "results"), "--attention", "false", "--quiet"]
    if "--max_workers" not in flags:
        argv += ["--max_workers", "1"]
    with SpawnedWorkers() as workers:
        assert main(argv + list(flags)) == 0
    return wh, workers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ops") / DATA.model, DATA, with_truth=False)


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory):
    wh, workers = analyze(dataset, tmp_path_factory.mktemp("ops-base"))
    assert workers.pids == set()  # one worker: the heads are computed in this process
    return stored(wh)


# ----------------------------------------------------------------------------- processes and threads

def test_max_workers_two_computes_in_two_worker_processes_and_stores_the_same_values(dataset, base, tmp_path):
    wh, workers = analyze(dataset, tmp_path, "--max_workers", "2")
    assert len(workers.pids) == 2  # 4 GQA groups: two spawned workers, no more
    assert_same_values(stored(wh), base)


def test_duckdb_threads_changes_no_stored_value(dataset, base, tmp_path):
    """The key is accepted so that existing configs load, but nothing uses it (shards are read with
    pyarrow, one thread per worker): a run given it stores what the default run stores."""
    wh, workers = analyze(dataset, tmp_path, "--duckdb_threads", "3")
    assert workers.pids == set()
    assert_same_values(stored(wh), base)


# ----------------------------------------------------------------------------- the warehouse lock

#: How long the other process holds the lock: far more than the timeouts tested, far less than the default 60 s,
#: so a run that ignored its timeout would get the lock and succeed instead of giving up while it is held.
HOLD_S = 20.0


def held_lock(path: Path, seconds: float = HOLD_S):
    """A process holding `path`'s write lock (test_concurrency's holder), once it holds it."""
    db.ensure_schema(path)
    holder = python("-c", HOLD_LOCK, str(path), str(seconds))
    wait_for_line(holder, "locked")
    return holder


def analyze_against_a_held_lock(dataset: Path, tmp: Path, timeout: str, capsys) -> tuple[int, str, float]:
    wh = tmp / "wh.duckdb"
    holder = held_lock(wh)
    try:
        capsys.readouterr()
        t0 = time.monotonic()
        code = main(["analyze", "--dataset_local_root", str(dataset), "--warehouse", str(wh), "--output_dir",
                     str(tmp / "results"), "--attention", "false", "--max_workers", "1", "--quiet",
                     "--lock_timeout_s", timeout])
        waited = time.monotonic() - t0
        assert holder.poll() is None  # it gave up while the lock was still held, not after
    finally:
        stop(holder)
    err = capsys.readouterr().err
    return code, err, waited


def test_lock_timeout_gives_up_after_its_seconds_with_one_clear_line(dataset, tmp_path, capsys):
    code, err, waited = analyze_against_a_held_lock(dataset, tmp_path, "1.5", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"warehouse {tmp_path / 'wh.duckdb'} is locked by another process" in err and "after 1.5s" in err
    assert waited >= 1.5  # it did wait that long
    with db.reader(tmp_path / "wh.duckdb") as con:  # nothing was written: no run recorded
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
