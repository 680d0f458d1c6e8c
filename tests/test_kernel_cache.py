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
    cfg = RunConfig(warehouse=wh, output_dir=wh + ".results", max_workers=2, attention=attention,
                    attention_scales=[0.5, 1.0])
    s = analyze_dataset(cfg, root, progress=False)
    assert s.n_errors == 0 and s.n_computed > 0, s
""")


def _run(root: Path, tmp: Path, cache: Path, name: str, attention: str = "true") -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RUN, str(root), str(tmp / f"{name}.duckdb"), attention], env=env,
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
    assert "plasticity/attention/kernel.py" in names
    assert "attention" in kernel_cache.parts_with_kernels()


def test_a_run_without_attention_compiles_no_attention_kernel(small_dataset, tmp_path):
    """attention: false needs none of the attention kernels: no warm-up compiles them, no worker loads them."""
    cache = tmp_path / "numba-cache"
    log = _run(small_dataset, tmp_path, cache, "off", attention="false")
    assert "data loaded" not in log and "data saved" not in log, log[-3000:]
    assert not list(cache.glob("*attention*")) and not list(cache.glob("kernel*")), sorted(cache.glob("*"))


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
