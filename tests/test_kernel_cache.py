"""The numba kernels are compiled once per machine, by the background warm-up, never by a run's workers
(warehouse/kernel_cache.py): what makes a fresh clone's first run not pay the compile in every worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from warehouse import kernel_cache

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import sys
    from warehouse.config import RunConfig
    from warehouse.pipeline import analyze_dataset
    root, wh = sys.argv[1], sys.argv[2]
    cfg = RunConfig(warehouse=wh, output_dir=wh + ".results", max_workers=2, attention="true",
                    attention_scales=[0.5, 1.0])
    s = analyze_dataset(cfg, root, progress=False)
    assert s.n_errors == 0 and s.n_computed > 0, s
""")


def _run(root: Path, tmp: Path, cache: Path, name: str) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RUN, str(root), str(tmp / f"{name}.duckdb")], env=env,
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
