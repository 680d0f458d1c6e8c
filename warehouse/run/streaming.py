"""Shards that arrive while the run computes: a Hub run downloads each GQA group's shards as its turn
comes, within a disk budget, and deletes them once the group's results are in.

`ShardStream` takes the run's units in plan order (each GQA group, then one unit per shard no group
reads, which the catalog still profiles) and downloads them in that order with `max_workers` threads.
A unit starts downloading when its bytes fit in the budget next to those already on disk or
downloading; a unit larger than the whole budget starts alone. So the prefetch depth adapts by
itself: as many groups ahead of the workers as the budget holds, and downloads never wait for the
workers while there is room. `release(key)` (once the unit's results are in: nothing reads its files again) deletes its files
(unless `keep`) and frees its bytes for the next units. A failed download is recorded against its
file, never raised: the pipeline turns it into an error on the file's heads, and the next run, which
finds those heads unfinished, downloads the file again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable


@dataclass
class _Unit:
    key: Hashable
    paths: list[str]
    size: int
    errors: dict[str, str] = field(default_factory=dict)
    remaining: int = 0
    started: bool = False
    ready: bool = False
    released: bool = False


class ShardStream:
    """Downloads units of files in order within `budget_bytes` (see the module doc)."""

    def __init__(self, units: list[tuple[Hashable, list[str]]], sizes: dict[str, int],
                 download: Callable[[str], object], *, budget_bytes: int, max_workers: int = 8,
                 keep: bool = False) -> None:
        self.budget_bytes = int(budget_bytes)
        self.keep = keep
        self._download = download
        self._sizes = sizes
        self._units: dict[Hashable, _Unit] = {}
        self._order: list[_Unit] = []
        for key, paths in units:
            unit = _Unit(key, list(paths), sum(sizes[p] for p in paths))
            self._units[key] = unit
            self._order.append(unit)
        self._held = 0  # bytes of started, not yet released units
        self.peak_held_bytes = 0
        self.wait_s = 0.0  # time the run blocked in `wait` (its next unit still downloading)
        self.starved_s = 0.0  # time the next unit waited for room in the budget (for the run to release)
        self.idle_s = 0.0  # of which no file was downloading: the network waited for the workers
        self._in_flight = 0  # files submitted and not finished
        self._idle_from: float | None = None  # since when nothing downloads while the next unit waits for room
        self.downloaded_bytes = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max(1, max_workers), thread_name_prefix="shard-download")
        self._scheduler = threading.Thread(target=self._schedule, name="shard-stream", daemon=True)
        self._scheduler.start()

    # -- the scheduler thread: start each unit in order once it fits in the budget
    def _schedule(self) -> None:
        for unit in self._order:
            with self._cond:
                t0 = time.perf_counter()
                while not self._stopped and self._held > 0 and self._held + unit.size > self.budget_bytes:
                    if self._in_flight == 0 and self._idle_from is None:
                        self._idle_from = time.perf_counter()
                    self._cond.wait()
                now = time.perf_counter()
                self.starved_s += now - t0
                if self._idle_from is not None:
                    self.idle_s += now - self._idle_from
                    self._idle_from = None
                if self._stopped:
                    return
                self._in_flight += len(unit.paths)
                unit.started = True
                unit.remaining = len(unit.paths)
                self._held += unit.size
                self.peak_held_bytes = max(self.peak_held_bytes, self._held)
                if not unit.paths:
                    unit.ready = True
                    self._cond.notify_all()
                    continue
            for path in unit.paths:
                try:
                    self._pool.submit(self._fetch, unit, path)
                except RuntimeError:  # the pool was shut down: the run is stopping
                    return

    def _fetch(self, unit: _Unit, path: str) -> None:
        error = None
        if not self._stopped:
            try:
                self._download(path)
            except Exception as exc:  # noqa: BLE001 -- recorded against the file's heads
                error = str(exc) or type(exc).__name__
        else:
            error = "the run stopped before the download"
        with self._cond:
            if error is not None:
                unit.errors[path] = error
            else:
                self.downloaded_bytes += self._sizes[path]
            unit.remaining -= 1
            self._in_flight -= 1
            if unit.remaining == 0:
                unit.ready = True
                self._cond.notify_all()

    # -- the run's side
    def ready(self, key: Hashable) -> bool:
        """Whether the unit's downloads are over (a unit the stream does not know is always ready)."""
        unit = self._units.get(key)
        return unit is None or unit.ready

    def wait(self, key: Hashable) -> dict[str, str]:
        """Block until the unit's downloads are over; the files that failed, with why."""
        unit = self._units.get(key)
        if unit is None:
            return {}
        with self._cond:
            t0 = time.perf_counter()
            while not unit.ready:
                self._cond.wait()
            self.wait_s += time.perf_counter() - t0
            return dict(unit.errors)

    def stats(self) -> dict:
        """What the stream did: bytes downloaded, the peak bytes held (on disk or downloading), how long
        the run waited for downloads, the next download for room in the budget, and of that how long no
        file was downloading at all (the network idle, waiting for the workers). The prefetch depth fits
        when either the run's wait or the network's idle time is near 0 (the other side is the bound)."""
        with self._cond:
            return {"downloaded_bytes": self.downloaded_bytes, "peak_held_bytes": self.peak_held_bytes,
                    "budget_bytes": self.budget_bytes, "run_waited_s": round(self.wait_s, 3),
                    "downloads_waited_s": round(self.starved_s, 3), "network_idle_s": round(self.idle_s, 3)}

    def release(self, key: Hashable) -> None:
        """The unit's results are in: delete its files (unless `keep`) and free its bytes."""
        unit = self._units.get(key)
        if unit is None or unit.released or not unit.started:
            return
        if not self.keep:
            for path in unit.paths:
                Path(path).unlink(missing_ok=True)
        with self._cond:
            unit.released = True
            self._held -= unit.size
            self._cond.notify_all()

    def close(self) -> None:
        """Stop downloading; delete (unless `keep`) the files of every unit not released yet."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._scheduler.join()
        for unit in self._order:
            if unit.started and not unit.released:
                if not self.keep:
                    for path in unit.paths:
                        Path(path).unlink(missing_ok=True)
                unit.released = True

    def __enter__(self) -> "ShardStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
