"""The numba kernels are compiled once per machine, by the background warm-up, never by a run's workers
(warehouse/run/kernel_cache.py): what makes a fresh clone's first run not pay the compile in every worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from warehouse.store import db, results

from warehouse.run import kernel_cache

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import sys
    from warehouse.settings.config import RunConfig
    from warehouse.run.pipeline import analyze_dataset
    root, wh, attention = sys.argv[1], sys.argv[2], sys.argv[3]
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    cfg = RunConfig(warehouse=wh, output_dir=wh + ".results", max_workers=workers, attention=attention,
                    attention_scales=[0.5, 1.0])
    s = analyze_dataset(cfg, root, progress=False)
    assert s.n_errors == 0 and s.n_computed > 0, s
""")


def _run(root: Path, tmp: Path, cache: Path, name: str, attention: str = "true", workers: int = 2) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RUN, str(root), str(tmp / f"{name}.duckdb"), attention, str(workers)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_run_on_an_empty_cache_compiles_in_the_warmup_and_its_workers_only_load(small_dataset, tmp_path):
    cache = tmp_path / "numba-cache"
    log = _run(small_dataset, tmp_path, cache, "first")
    # the warm-up's output is not shown: every cache line here is a worker's (or this run's own process)
    assert "data saved" not in log and "index saved" not in log, log[-3000:]
    loaded = {line.split("kernel.")[-1].split("-")[0] for line in log.splitlines() if "data loaded" in line}
    assert "block_stats" in loaded, log[-3000:]  # the attention kernel ran, from the cache
    assert sorted(p.name.split("-")[2] for p in cache.glob("kernels-warm-*")) == kernel_cache.parts_with_kernels()
    # warmed: a second run starts no warm-up and still only loads
    log = _run(small_dataset, tmp_path, cache, "second")
    assert "data saved" not in log and "data loaded" in log
    # the first run computed while the kernels compiled (attention deferred): it stored the same rows
    for table in results.RESULT_TABLES:
        first, second = (_rows(tmp_path / f"{name}.duckdb", table) for name in ("first", "second"))
        assert first == second, table
        assert first or table == "head_errors", table


def _rows(path: Path, table: str) -> list:
    with db.reader(str(path)) as con:
        rows = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
    return [tuple("NaN" if isinstance(x, float) and x != x else x for x in row) for row in rows]  # NaN == NaN here


def test_the_stamp_follows_the_kernel_sources_only(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "k.py").write_text("from numba import njit\n")
    (pkg / "plain.py").write_text("x = 1  # numba is mentioned, no kernel\n")
    assert kernel_cache.kernel_sources(pkg) == [pkg / "sub" / "k.py"]
    assert kernel_cache.parts_with_kernels(pkg) == ["analysis"]
    (pkg / "attention").mkdir()
    (pkg / "attention" / "kernel.py").write_text("from numba import njit\n")
    assert kernel_cache.parts_with_kernels(pkg) == ["analysis", "attention"]
    stamp = kernel_cache.cache_stamp(pkg)
    (pkg / "plain.py").write_text("x = 2  # numba\n")
    assert kernel_cache.cache_stamp(pkg) == stamp
    (pkg / "sub" / "k.py").write_text("from numba import njit  # changed\n")
    assert kernel_cache.cache_stamp(pkg) != stamp


def test_the_package_kernels_are_found():
    names = {p.relative_to(REPO).as_posix() for p in kernel_cache.kernel_sources()}
    assert {"plasticity/attention/kernel.py", "plasticity/kernels/ks.py"} <= names
    assert kernel_cache.parts_with_kernels() == ["analysis", "attention"]


def test_a_run_without_attention_compiles_only_the_analysis_kernels(small_dataset, tmp_path):
    """attention: false needs the per-head analysis kernels (`plasticity.kernels`) and none of the
    attention kernels: the warm-up compiles the analysis family alone, the workers only load it."""
    cache = tmp_path / "numba-cache"
    log = _run(small_dataset, tmp_path, cache, "off", attention="false")
    assert "data saved" not in log, log[-3000:]  # no worker compiled
    loaded = {line.split("/")[-1].split("-")[0] for line in log.splitlines() if "data loaded" in line}
    assert "ks.ks_candidates" in loaded, log[-3000:]  # the workers ran the analysis kernels, from the cache
    assert not any("attention" in name or "block_stats" in name for name in loaded), loaded
    assert [p.name.split("-")[2] for p in cache.glob("kernels-warm-*")] == ["analysis"]
    assert not list(cache.glob("attention_*")), sorted(cache.glob("*"))


def test_demo_data_does_not_depend_on_the_blas_thread_count(tmp_path):
    """`sharing_cores` generates the demo's data with one BLAS thread while the kernels compile: the
    files (hence the revision and the run id) must be the bytes a warm machine writes."""
    from threadpoolctl import threadpool_limits

    from plasticity.synthetic import SyntheticSpec
    from warehouse.sources.demo_data import write_synthetic_dataset

    spec = SyntheticSpec(model="blas-threads", num_layers=1, num_q_heads=2, num_k_heads=1, head_dim=16,
                         num_examples=4, seq_len=256, bucket_size=64)
    write_synthetic_dataset(tmp_path / "default", spec)
    with threadpool_limits(1, user_api="blas"):
        write_synthetic_dataset(tmp_path / "one", spec)
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "default" / rel).read_bytes(), rel


def test_a_damaged_cache_is_set_aside_and_compiled_again_never_recorded_against_data(small_dataset, tmp_path,
                                                                                       monkeypatch):
    """A garbage index (.nbi) and a truncated data file (.nbc) made numba raise UnpicklingError in every
    worker, so every head of an attention run failed against its shard files. The run finds them first,
    moves each affected kernel's files aside, says so in one line, and the warm-up compiles them again."""
    cache = tmp_path / "numba-cache"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
    warm = subprocess.run([sys.executable, "-m", "warehouse.run.kernel_warmup", "attention"], cwd=tmp_path, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-3000:]
    folder = kernel_cache.kernel_cache_folder(REPO / "plasticity" / "attention" / "kernel.py")
    files = sorted(p.name for p in folder.glob("kernel.*"))
    assert all(kernel_cache.cache_file_problem(folder / name) is None for name in files), files
    index = next(folder.glob("kernel.block_stats-*.nbi"))
    index.write_bytes(b"\x80\x04garbage, not numba's index")
    data = next(folder.glob("kernel._k_eff_inside-*.nbc"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert "pickle" in kernel_cache.cache_file_problem(index) and kernel_cache.cache_file_problem(data)

    # one process computes (the workers' code, in the run's own process: no pool to start)
    log = _run(small_dataset, tmp_path, cache, "damaged", workers=1)  # fails unless every head is computed
    assert f"numba's kernel cache {folder} was damaged" in log, log[-3000:]
    (aside,) = folder.glob("damaged-*")
    moved = sorted(p.name for p in aside.iterdir())
    assert moved == sorted(n for n in files if n.startswith(("kernel.block_stats-", "kernel._k_eff_inside-")))
    assert sorted(p.name for p in folder.glob("kernel.*")) == files  # compiled again, beside the others
    assert all(kernel_cache.cache_file_problem(folder / name) is None for name in files)
    assert kernel_cache.kernels_cached("attention")

    # damage the structural check cannot see (well-formed pickles, not numba's index): numba raises in
    # the workers, and the run stops with one line naming the cache; no head is charged with it
    import pickle

    with open(index, "rb") as fh:
        numba_version = pickle.load(fh)
    index.write_bytes(pickle.dumps(numba_version) + pickle.dumps(42))
    assert kernel_cache.cache_file_problem(index) is None
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    # two workers: the error crosses from the worker that raised it to the run
    proc = subprocess.run([sys.executable, "-c", RUN, str(small_dataset), str(tmp_path / "stopped.duckdb"), "true", "2"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0 and f"numba could not load a cached kernel from {folder}" in proc.stderr, proc.stderr[-3000:]
    with db.reader(str(tmp_path / "stopped.duckdb")) as con:
        assert con.execute("SELECT count(*) FROM head_errors").fetchone() == (0,)
        (status, error), = con.execute("SELECT status, error FROM runs").fetchall()
    assert status == "failed" and "numba could not load a cached kernel" in error
