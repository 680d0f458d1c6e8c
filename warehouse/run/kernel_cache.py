"""Compile the numba kernels once per machine, in the background, before a run's workers need them.

numba compiles a ``cache=True`` kernel on its first call and stores it on disk; later processes
load it in a fraction of a second. On a fresh machine (an empty cache) every worker of the first
run would compile the same kernels at the same time: seconds of CPU per worker, all of it on the
run's critical path. Instead, the first run starts one background process per kernel family
(`start_kernel_warmup`; the families compile in parallel, `warehouse.run.kernel_warmup`) that runs a tiny generated head through
the code the workers run (the loader and the analysis; the attention metrics, whose kernel arguments
are built inside `plasticity.attention`), so numba compiles the signatures a run uses and caches them;
`plasticity demo` starts it before its imports and data generation (`cli.main.main`),
`analyze_dataset` once it knows there is work (the analysis family, `plasticity.kernels`, for every
run; the attention family only when the run computes attention). The heads wait for the analysis
family (a few seconds; the per-head analysis cannot run without it); meanwhile the attention
kernels may still compile: the run does every group's per-head analysis, with one worker, leaving
the compile a core (`warehouse.run.worker_pool.iter_outcomes`; the demo's data generation uses one
BLAS thread, `sharing_cores`); the groups' attention waits for the warm-up (`KernelWarmup.wait`),
and the workers then load the kernels from the cache.

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


class DamagedKernelCache(ValueError):
    """numba's cache of our kernels is damaged and could not be set aside: the run stops, naming it."""


def kernel_cache_folder(source: Path) -> Path:
    """Where numba keeps the compiled kernels of one source file: with ``NUMBA_CACHE_DIR``, its
    ``<parent folder>_<SHA-1 of the source's folder>`` sub-folder (numba's UserProvidedCacheLocator),
    else ``__pycache__`` beside the source (InTreeCacheLocator)."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    folder = os.path.dirname(os.path.abspath(source))
    if env:
        return Path(env) / f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"
    return Path(folder) / "__pycache__"


def cache_file_problem(path: Path) -> str | None:
    """Why numba could not load a cache file (``.nbi`` index: two pickles, a version then the index;
    ``.nbc`` data: one pickle), or None when each pickle is complete and well formed. The pickles are
    walked opcode by opcode (`pickletools.genops`), never unpickled, so the check runs no code and
    imports nothing. A truncated or garbled file is found; a flipped bit inside the compiled code is
    not (numba stores no checksum)."""
    import io
    import pickletools

    try:
        stream = io.BytesIO(path.read_bytes())
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    n_pickles = 2 if path.suffix == ".nbi" else 1
    try:
        for _ in range(n_pickles):
            if stream.tell() == len(stream.getbuffer()):
                return "truncated (a pickle is missing)"
            for _op in pickletools.genops(stream):
                pass
    except Exception as exc:  # noqa: BLE001 -- what genops raises on bad input is not one type
        return f"not a complete pickle ({type(exc).__name__}: {exc})"
    if stream.tell() != len(stream.getbuffer()):
        return "trailing bytes after its data"
    return None


def set_aside_damaged_cache(parts: Iterable[str] | None = None) -> list[tuple[Path, str]]:
    """Find damaged cache files of the kernels of `parts` (default: all) and move every file of each
    affected kernel (its index and its data) into a ``damaged-<UTC time>`` folder beside them, and
    drop the families' "warmed" markers, so the warm-up compiles those kernels again; returns the
    damaged files and why. `DamagedKernelCache` (one line naming the cache) if they cannot be moved.

    Without this, numba raises on the damaged file in every worker, and every head of the run would
    fail with an error that has nothing to do with its data."""
    wanted = set(PARTS if parts is None else parts)
    damaged: list[tuple[Path, str]] = []
    for source in kernel_sources():
        part = part_of(source)
        if part not in wanted:
            continue
        folder = kernel_cache_folder(source)
        if not folder.is_dir():
            continue
        bad_bases = set()
        for path in sorted(folder.glob(f"{source.stem}.*.nb[ic]")):
            why = cache_file_problem(path)
            if why is not None:
                damaged.append((path, why))
                bad_bases.add(_kernel_base(path))
        if not bad_bases:
            continue
        aside = folder / time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            aside.mkdir(exist_ok=True)
            for path in sorted(folder.glob(f"{source.stem}.*.nb[ic]")):
                if _kernel_base(path) in bad_bases:
                    os.replace(path, aside / path.name)
            for marker in cache_dir().glob(f"kernels-warm-{part}-*"):
                marker.unlink()
            first, why = next((p, w) for p, w in damaged if p.parent == folder)
            print(f"note: numba's kernel cache {folder} was damaged ({first.name}: {why}); its files of the "
                  f"affected kernels were moved to {aside.name}/ and the kernels are compiled again", file=sys.stderr)
        except OSError as exc:
            first, why = next((p, w) for p, w in damaged if p.parent == folder)
            raise DamagedKernelCache(
                f"numba's kernel cache {folder} is damaged ({first.name}: {why}) and could not be set aside "
                f"({type(exc).__name__}: {exc}): delete that folder, or set NUMBA_CACHE_DIR to another one") from None
    return damaged


def raised_by_numba_cache(exc: BaseException) -> bool:
    """Whether `exc` was raised while numba loaded a cached kernel (its traceback passes through
    numba's caching module): a problem of this machine's cache, not of the data being analysed."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("numba/core/caching.py"):
            return True
        tb = tb.tb_next
    return False


def cache_failure(exc: BaseException) -> DamagedKernelCache:
    """The one-line error that stops a run whose worker could not load a cached kernel (damage the
    structural check of `set_aside_damaged_cache` cannot see), instead of failing every head."""
    folders = sorted({str(kernel_cache_folder(s)) for s in kernel_sources()})
    return DamagedKernelCache(f"numba could not load a cached kernel from {', '.join(folders)} "
                              f"({type(exc).__name__}: {exc}); this is the machine's kernel cache, not the data: "
                              "delete that folder and run again")


def _kernel_base(path: Path) -> str:
    """The file name numba gives all cache files of one kernel: ``<module>.<function>-<line>.py<version>``
    (``.nbi``) or the same plus ``.<n>`` (``.nbc``)."""
    stem = path.name[: -len(".nbi")]
    return stem.rsplit(".", 1)[0] if path.suffix == ".nbc" else stem


def start_kernel_warmup(parts: Iterable[str] | None = None) -> KernelWarmup | None:
    """Start a warm-up process for each kernel family of `parts` (default: every family that has
    kernels) not yet cached (None when all are); one warm-up per process: called again while it
    runs, returns it; once it has ended, None."""
    global _started
    if set_aside_damaged_cache(parts) and _started is not None and not _started.running():
        _started = None  # the kernels this process warmed were damaged since: warm them again
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

