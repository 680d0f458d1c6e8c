"""The worker processes of a run: their start (one BLAS thread, freed memory kept, the analysis code
imported before the first task, the parent's main module hidden), their stop, and `iter_outcomes`,
which feeds them the groups and yields each group's outcomes as they finish.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import os
import sys
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterator

from warehouse.store import results
from warehouse.run import kernel_cache
from warehouse.run.processes import ONE_THREAD_ENV, tie_to_parent
from warehouse.run.group import compute_group, merge_phases
from warehouse.run.planning import GroupTask


def _init_worker(parent_pid: int | None = None) -> None:
    # A worker never outlives the coordinating process: if that is killed (even with SIGKILL), the
    # kernel kills the worker (Linux), or the worker's parent watch ends it within half a second.
    if parent_pid is not None:
        tie_to_parent(parent_pid)
    # Processes, not BLAS threads, carry the parallelism; one thread each also
    # keeps floating-point reductions identical whatever the worker count. The
    # variables must be in the environment the worker starts with (numpy loads
    # BLAS while the pool unpickles this function), so `start_pool` sets them in
    # the parent; setting them here again only covers pools made elsewhere.
    for var in ONE_THREAD_ENV:
        os.environ[var] = "1"
    _keep_freed_memory()


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_memory() -> None:
    """Let a worker's malloc keep freed memory for the next head instead of handing it back.

    Every head allocates and frees the same large arrays; by default glibc returns them to the
    kernel (munmap, heap trim) and the next head faults the pages in again, zero-filled. That
    was 6-12% of the workers' CPU time (system time) on the benchmark shapes. Arrays up to 32 MiB
    (glibc's ceiling) now come from the heap, which is never trimmed below its peak, so a
    worker's resident size stays at the peak of one head. No-op outside glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_TOP_PAD, 64 << 20)


def _warm_up(kernels: bool = False) -> int:
    """Import everything a compute step needs, so the first group does not pay for it: numba and
    the per-head analysis kernels (`plasticity.kernels`), with ``kernels`` (the run computes
    attention) also the attention kernel; each family is loaded only once it is cached (while the
    background warm-up still compiles it, loading would compile it again)."""
    import plasticity.head  # noqa: F401
    import warehouse.run.loading  # noqa: F401

    if kernel_cache.kernels_cached("analysis"):
        import plasticity.kernels

        plasticity.kernels.load()
    else:
        import numba  # noqa: F401
    if kernels:
        if kernel_cache.kernels_cached("attention"):
            import plasticity.attention.kernel  # noqa: F401
        else:
            import numba  # noqa: F401
    return os.getpid()


@contextmanager
def _parent_main_hidden() -> Iterator[None]:
    """Start spawned processes without re-running this process's ``__main__`` in them.

    multiprocessing's spawn imports the parent's main module in every child, so that functions
    defined there can be unpickled. The pool runs only functions of this package, and when the
    parent is Dagster (a run launched from the UI, `dagster asset materialize`) or pytest, that
    module is their command line: about a second of imports per worker, for nothing. Without a
    ``__file__`` and a ``__spec__`` the main module is not re-imported (as for ``python -c``)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextmanager
def start_pool(workers: int, kernels: bool = False) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` spawned processes, already importing the analysis code (with
    ``kernels``, also numba: see `_warm_up`) while the caller does other work (None when
    workers <= 1: compute runs in this process). The workers do not import the caller's
    ``__main__`` (see `_parent_main_hidden`): submit functions of this package."""
    if workers <= 1:
        yield None
        return
    saved = {v: os.environ.get(v) for v in ONE_THREAD_ENV}
    for var in ONE_THREAD_ENV:
        os.environ[var] = "1"
    try:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            with _parent_main_hidden():  # each submit starts one worker while none is idle
                for _ in range(workers):
                    pool.submit(_warm_up, kernels)
            try:
                yield pool
            except BaseException:
                _stop_workers(pool)  # interrupted or failed: do not wait for groups nobody will collect
                raise
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _stop_workers(pool: ProcessPoolExecutor, timeout_s: float = 5.0) -> None:
    """Cancel what is queued and end the running workers (SIGTERM, then SIGKILL after `timeout_s`).

    ``shutdown`` alone would wait for every group in flight. The executor keeps its processes in
    ``_processes`` (CPython 3.8-3.13); without it the pool just shuts down normally."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def iter_outcomes(tasks: list[GroupTask], workers: int, pool: ProcessPoolExecutor | None = None, *,
                  prepare: Callable[[GroupTask], None] | None = None,
                  started: Callable[[], None] | None = None,
                  defer_attention: Callable[[], bool] | None = None,
                  wait_attention: Callable[[], None] | None = None,
                  ready: Callable[[GroupTask], bool] | None = None) -> Iterator[list[results.HeadOutcome]]:
    """Results of each group as it completes; at most 2 x workers groups in flight (bounded memory).

    Uses `pool` when given (see `start_pool`), else its own; with workers <= 1 runs in this process.
    `prepare(task)` runs just before a task is submitted; `started()` once the first tasks are in
    flight (before anything is yielded), so this process's own work overlaps the workers'.

    While ``defer_attention()`` is true (the attention kernels are still being compiled), a group
    with attention runs as two tasks: its per-head analysis at once, its attention once
    ``defer_attention()`` is false (``wait_attention()`` blocks until then), and its outcomes are
    yielded joined (`merge_phases`), the same as one task would give. So a fresh machine's first
    run computes while numba compiles instead of waiting for it.

    ``ready(task)`` false (its shards are still downloading): while other groups are in flight, the
    task waits and their outcomes are yielded meanwhile (so the caller can commit them and free their
    disk); with none in flight, `prepare` is called and may block until the task is ready.
    """
    def noop(*_):
        return None

    prepare = prepare or noop
    started = started or noop
    waited = False  # once waited for, attention is never deferred again (even if the wait timed out)

    def defer() -> bool:
        return defer_attention is not None and not waited and defer_attention()

    def wait_kernels() -> None:
        nonlocal waited
        if wait_attention is not None:
            wait_attention()
        waited = True

    deferred: list[GroupTask] = []  # groups whose attention waits for the kernels
    held: dict[tuple[int, int], list[results.HeadOutcome]] = {}  # their analysis outcomes

    def next_task() -> GroupTask | None:
        if deferred and not defer():
            return dataclasses.replace(deferred.pop(0), phase="attention")
        if not queue:
            return None
        task = queue.pop()
        prepare(task)
        if task.needs_attention_kernels and defer():
            deferred.append(task)
            return dataclasses.replace(task, phase="analysis")
        return task

    def finished(task: GroupTask, outcomes: list[results.HeadOutcome]) -> list[results.HeadOutcome] | None:
        """What to yield for a task's outcomes (None: held until the group's attention is done)."""
        key = (task.layer, task.k_head)
        if task.phase == "analysis":
            held[key] = outcomes
            return None
        return merge_phases(held.pop(key), outcomes) if task.phase == "attention" else outcomes

    queue = list(reversed(tasks))
    if pool is None and (workers <= 1 or len(tasks) <= 1):
        started()
        while queue or deferred:
            task = next_task()
            if task is None:  # only deferred attention left
                wait_kernels()
                continue
            outcomes = finished(task, compute_group(task))
            if outcomes is not None:
                yield outcomes
        return
    if pool is None:
        with start_pool(workers) as own:
            yield from iter_outcomes(tasks, workers, own, prepare=prepare, started=started,
                                     defer_attention=defer_attention, wait_attention=wait_attention, ready=ready)
        return
    pending: dict = {}

    def fill() -> None:
        # while groups wait for the kernels to compile (one process), leave the compile a core: the
        # analysis meanwhile has slack (a run without attention never waits, so never holds back)
        while len(pending) < (max(1, workers - 1) if deferred and defer() else 2 * workers):
            if ready is not None and pending and queue and not ready(queue[-1]):
                return
            task = next_task()
            if task is None:
                return
            pending[pool.submit(compute_group, task)] = task

    fill()
    try:
        started()
    except BaseException:
        for fut in pending:  # those not yet running; running ones finish as the pool shuts down
            fut.cancel()
        raise
    while pending or deferred:
        if not pending:  # only deferred attention left
            wait_kernels()
            fill()
            continue
        # while attention waits, look again at least every 0.2 s: it starts as soon as the kernels are in
        # and while the next group downloads, so that it starts as soon as its shards are in
        done, _ = wait(set(pending), timeout=0.2 if deferred else 0.02 if ready is not None and queue else None,
                       return_when=FIRST_COMPLETED)
        for fut in done:
            outcomes = finished(pending.pop(fut), fut.result())
            if outcomes is not None:
                yield outcomes
        fill()
