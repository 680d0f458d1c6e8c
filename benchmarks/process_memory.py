"""Memory of a process tree, read from /proc: the processes under a pid, their resident (VmRSS) and
proportional (PSS) sizes, and a thread that samples the tree's peak while a benchmark child runs.
Linux only, like the benchmarks that use it.
"""

from __future__ import annotations

import os
import threading



def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces; fields after the closing parenthesis are fixed
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _status_kib(pid: int, field: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemorySampler(threading.Thread):
    """Peak of the summed RSS (every `interval` s) and PSS (every 10th sample) of a process and all
    its descendants. The process tree is re-read every 10th sample too: walking /proc and reading
    smaps_rollup (which walks page tables) at 20 Hz would itself slow the measured workers."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_kib = self.peak_pss_kib = 0
        self.max_procs = 0
        self.samples = 0
        self.cpu_s = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        while not self._stop_event.is_set():
            slow = self.samples % 10 == 0
            if slow:
                pids = process_tree(self.pid)
            rss = sum(_status_kib(p, b"VmRSS:") for p in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            if slow:
                self.peak_pss_kib = max(self.peak_pss_kib, sum(_pss_kib(p) for p in pids))
            self.max_procs = max(self.max_procs, len(pids))
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
