"""Compile the numba kernels once per machine, in the background, before a run's workers need them.

numba compiles a ``cache=True`` kernel on its first call and stores it on disk; later processes
load it in a fraction of a second. On a fresh machine (an empty cache) every worker of the first
run would compile the same kernels at the same time: seconds of CPU per worker, all of it on the
run's critical path. Instead, the first run starts one background process per kernel family
(`start_kernel_warmup`; the families compile in parallel, `warehouse.run.kernel_warmup`) that runs a tiny generated head through
the code the workers run (the loader and the analysis; the attention metrics, whose kernel arguments
are built inside `plasticity.attention`), so numba compiles the signatures a run uses and caches them;
`plasticity demo` starts it before its imports and data generation (`cli.main.main`),
`analyze_dataset` once it knows there is work (the attention family only when the run computes
attention). Meanwhile the run does what needs no kernel: every group's per-head analysis, with one
worker, leaving the compile a core (`warehouse.run.worker_pool.iter_outcomes`; the demo's data generation
uses one BLAS thread, `sharing_cores`); the groups' attention waits for the warm-up
(`KernelWarmup.wait`), and the workers then load the kernels from the cache.

Only speed depends on this module, never a number: numba checks every cached kernel against its
source and recompiles a stale one. The marker file that says "already warmed" is keyed by the
kernels' source files, numba's and Python's versions, so a change of any of them warms again. A
warm-up that fails or times out is ignored (the workers compile as they would without it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import plasticity
from warehouse.run.processes import ONE_THREAD_ENV

#: How long a run waits for the warm-up before its workers compile for themselves.
WARMUP_TIMEOUT_S = 300.0
_KERNEL_MARK = b"from numba import"  # how a source file of `plasticity` that defines kernels starts them

_started: "KernelWarmup | None" = None


def _package(package_dir: Path | None) -> Path:
    return Path(package_dir or Path(plasticity.__file__).parent)


def kernel_sources(package_dir: Path | None = None) -> list[Path]:
    """The source files of `plasticity` that define compiled kernels (sorted)."""
    base = _package(package_dir)
    return sorted(p for p in base.rglob("*.py") if _KERNEL_MARK in p.read_bytes())


def cache_stamp(package_dir: Path | None = None) -> str:
    """SHA-256 of what numba's cache depends on: the kernels' sources, numba, Python, the machine."""
    try:
        numba_version = version("numba")
    except PackageNotFoundError:
        numba_version = "none"
    base = _package(package_dir)
    h = hashlib.sha256(f"{numba_version}|{sys.version}|{platform.machine()}".encode())
    for path in kernel_sources(base):
        h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    """Where numba keeps the kernels: ``NUMBA_CACHE_DIR`` if set, else beside the sources."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    return Path(env) if env else Path(plasticity.__file__).parent / "__pycache__"


def marker_path(part: str, stamp: str | None = None) -> Path:
    """The file saying `part`'s kernels are cached (`stamp`: `cache_stamp()`, computed if not given)."""
    return cache_dir() / f"kernels-warm-{part}-{(stamp or cache_stamp())[:20]}"


#: The kernel families, each warmed by its own process (they compile in parallel, on both cores):
#: the per-head analysis, and the attention metrics (the kernels under attention/).
PARTS = ("analysis", "attention")


def part_of(source: Path, package_dir: Path | None = None) -> str:
    """The kernel family a kernel source file belongs to."""
    return "attention" if source.relative_to(_package(package_dir)).parts[0] == "attention" else "analysis"


def parts_with_kernels(package_dir: Path | None = None) -> list[str]:
    """The families that have kernels to compile (a family without any is never warmed)."""
    found = {part_of(p, package_dir) for p in kernel_sources(package_dir)}
    return [part for part in PARTS if part in found]


class KernelWarmup:
    """The running warm-up processes, one per kernel family (see the module docstring)."""

    def __init__(self, procs: dict[str, subprocess.Popen]):
        self.procs = procs
        self.started_at = time.monotonic()

    def running(self, parts: Iterable[str] | None = None) -> bool:
        """Whether the warm-up of any of `parts` (default: all) is still compiling."""
        return any(proc.poll() is None for part, proc in self.procs.items() if parts is None or part in parts)

    def wait(self, parts: Iterable[str] | None = None, timeout_s: float = WARMUP_TIMEOUT_S) -> bool:
        """Wait until the kernels of `parts` (default: all) are compiled and cached; False if a
        warm-up failed or timed out (past the timeout, the workers compile for themselves)."""
        ok = True
        for part, proc in self.procs.items():
            if parts is not None and part not in parts:
                continue
            try:
                ok &= proc.wait(timeout=max(0.0, timeout_s - (time.monotonic() - self.started_at))) == 0
            except subprocess.TimeoutExpired:
                ok = False
        return ok


def start_kernel_warmup(parts: Iterable[str] | None = None) -> KernelWarmup | None:
    """Start a warm-up process for each kernel family of `parts` (default: every family that has
    kernels) not yet cached (None when all are); one warm-up per process: called again while it
    runs, returns it; once it has ended, None."""
    global _started
    if _started is not None:
        return _started if _started.running() else None
    wanted = set(PARTS if parts is None else parts)
    todo = [part for part in parts_with_kernels() if part in wanted]
    try:
        stamp = cache_stamp()
    except OSError:
        stamp = None  # unreadable sources: kernels_cached says no, every family is warmed
    todo = [part for part in todo if not kernels_cached(part, stamp)]
    if not todo:
        return None
    env = dict(os.environ, **{var: "1" for var in ONE_THREAD_ENV})
    _started = KernelWarmup({
        part: subprocess.Popen([sys.executable, "-m", "warehouse.run.kernel_warmup", part, str(os.getpid())],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, cwd=tempfile.gettempdir())
        for part in todo})
    return _started


def kernels_cached(part: str, stamp: str | None = None) -> bool:
    """Whether `part`'s kernels are known to be compiled and cached (its marker file exists;
    `stamp`: `cache_stamp()`, computed if not given)."""
    try:
        return marker_path(part, stamp).exists()
    except OSError:
        return False


def compiling(part: str) -> bool:
    """Whether this process's warm-up is still compiling `part`'s kernels (a run defers the work
    that needs them, and does the rest meanwhile: `warehouse.run.worker_pool.iter_outcomes`)."""
    return _started is not None and _started.running([part])


@contextmanager
def sharing_cores() -> Iterator[None]:
    """While this process's warm-up compiles, this process's BLAS uses one thread: the compile is
    what the run waits for, and a second BLAS thread (mostly spinning, on small products) would
    take the core it runs on. Otherwise nothing changes."""
    if _started is None or not _started.running():
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def wait_for_kernels(parts: Iterable[str] | None = None) -> None:
    """Wait for this process's warm-up of `parts` (default: all), if one is running (see `KernelWarmup.wait`)."""
    if _started is not None and _started.running(parts):
        _started.wait(parts)

