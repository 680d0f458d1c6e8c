"""Child processes that never outlive the process that started them.

Two mechanisms, because neither is enough alone: on Linux the kernel sends a signal to a child
when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which works even when the parent is killed
with SIGKILL and the child is busy in native code; elsewhere (and against the race where the
parent dies before the child has asked for that signal) a daemon thread watches the parent's pid
and ends the child when it changes. Plus helpers to find and end a process tree (`plasticity ui`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 0.5
#: Environment variables that give a child process one BLAS/OpenMP thread: processes carry the
#: parallelism, and one thread keeps floating-point reductions the same whatever the machine.
ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where unavailable.

    The kernel ties this to the parent *thread* that created the process, so callers start
    children from a thread that lives as long as they do (the main thread, for the pool)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_if_orphaned(parent_pid: int) -> None:
    """End this process now (exit status 1) if `parent_pid` is no longer its parent."""
    if os.getppid() != parent_pid:
        os._exit(1)


def watch_parent(parent_pid: int, interval_s: float = PARENT_POLL_S) -> threading.Thread:
    """A daemon thread that ends this process within `interval_s` of `parent_pid` ceasing to be its parent.

    Portable (POSIX reparents an orphan to init or a subreaper, so its parent pid changes). The
    thread only sleeps and compares pids; numpy and DuckDB release the GIL in long native calls,
    so it runs during a busy computation too."""

    def watch() -> None:
        while True:
            exit_if_orphaned(parent_pid)
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def tie_to_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Both mechanisms, for a child process's start-up (e.g. a process-pool initializer)."""
    set_parent_death_signal(sig)
    exit_if_orphaned(parent_pid)  # the parent may have died before the signal was armed
    watch_parent(parent_pid)


# ---------------------------------------------------------------------- process trees (Linux /proc)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may contain spaces and ')'
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `pid` (empty where /proc is unavailable).

    The start time identifies a process even after its pid is reused."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for p in pids:
        st = _stat(p)
        if st is not None:
            children.setdefault(st[0], []).append((p, st[1]))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in out:
                out[child] = started
                todo.append(child)
    return out


def alive(processes: dict[int, int]) -> dict[int, int]:
    """The processes of a `descendants` snapshot that still run (same pid and start time)."""
    out = {}
    for pid, started in processes.items():
        st = _stat(pid)
        if st is not None and st[1] == started:
            out[pid] = started
    return out


def kill_all(processes: dict[int, int], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to every process of a snapshot that still runs (never to a reused pid)."""
    for pid in alive(processes):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
