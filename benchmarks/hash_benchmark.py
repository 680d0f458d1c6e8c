"""Content-hash throughput on a dataset's shards: the candidates for the local revision.

    .venv/bin/python benchmarks/hash_benchmark.py DATASET_FOLDER [--repeats 3] [--cold]

Every variant hashes every byte of every ``*.parquet`` file under the folder (what the local
revision must do: any changed byte is a new revision) and reports wall seconds, CPU seconds of
this process (all its threads, user + system) and GiB/s of wall time:

* ``read-only``: the same reads as the next three, nothing hashed (their floor);
* ``sha256`` / ``blake2b``: hashlib, 4 MiB ``readinto`` reads, files spread over ``--threads``
  threads (hashlib releases the GIL while it hashes);
* ``blake3``: the ``blake3`` package, the same reads and threads, one hashing thread per file;
* ``blake3-mt``: ``blake3`` with ``max_threads=AUTO`` (its own thread pool inside each file),
  files one after the other;
* ``blake3-mmap``: ``blake3`` ``update_mmap`` with ``max_threads=AUTO``, files one after the other.

Variants run interleaved, ``--repeats`` rounds. With ``--cold`` each variant first evicts the
files from the page cache (``posix_fadvise(DONTNEED)`` on each file: only these files, so other
users of the machine keep their cache), so it reads from the disk; without it the files are read
once first (warm). Load average before each round is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READ_BYTES = 4 << 20


def _read_hash(make, path: str) -> str:
    h = make()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class _NoHash:
    """The reads alone (the floor under every variant that reads with `_read_hash`)."""

    def update(self, _data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _threaded(make, paths: list[str], threads: int) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: _read_hash(make, p), paths))


def variants(threads: int) -> dict:
    out = {
        "read-only": lambda paths: _threaded(_NoHash, paths, threads),
        "sha256": lambda paths: _threaded(hashlib.sha256, paths, threads),
        "blake2b": lambda paths: _threaded(hashlib.blake2b, paths, threads),
    }
    try:
        import blake3
    except ImportError:
        print("blake3 is not installed: its variants are skipped", file=sys.stderr)
        return out
    out["blake3"] = lambda paths: _threaded(blake3.blake3, paths, threads)
    out["blake3-mt"] = lambda paths: [_read_hash(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO), p)
                                      for p in paths]

    def mmap_all(paths):
        res = []
        for p in paths:
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            h.update_mmap(p)
            res.append(h.hexdigest())
        return res

    out["blake3-mmap"] = mmap_all
    return out


def evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args(argv)
    paths = sorted(str(p) for p in Path(args.folder).rglob("*.parquet"))
    n_bytes = sum(os.path.getsize(p) for p in paths)
    gib = n_bytes / 2**30
    chosen = variants(args.threads)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    print(f"{len(paths)} files, {gib:.2f} GiB, {'cold' if args.cold else 'warm'} page cache, "
          f"{args.threads} file threads", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in chosen}
    for rnd in range(args.repeats):
        print(f"round {rnd + 1}: load average {os.getloadavg()[0]:.1f}", flush=True)
        for name, fn in chosen.items():
            evict(paths) if args.cold else warm(paths)
            c0, t0 = cpu_s(), time.perf_counter()
            fn(paths)
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
            rows[name].append((wall, cpu))
            print(f"  {name:12s} {wall:6.2f} s wall  {cpu:6.2f} CPU s  {gib / wall:5.2f} GiB/s  "
                  f"{cpu / gib:5.2f} CPU s/GiB", flush=True)
    print("\nvariant       wall s (min-max)   CPU s (min-max)   GiB/s (best)  CPU s/GiB (best)")
    for name, rs in rows.items():
        walls, cpus = [r[0] for r in rs], [r[1] for r in rs]
        print(f"{name:12s}  {min(walls):5.2f}-{max(walls):5.2f}       {min(cpus):5.2f}-{max(cpus):5.2f}      "
              f"{gib / min(walls):5.2f}         {min(cpus) / gib:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
