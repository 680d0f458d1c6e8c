"""The revision of a local dataset: a hash of every byte of every shard (docs/method.md#inputs).

``local-`` + the first 16 hex digits of SHA-256 over, for each shard in order of its path relative
to the dataset folder, that path and the SHA-256 of its content. Any changed byte,
added, removed or renamed shard gives a new revision, so a run (whose id contains the revision)
never resumes results computed from other data. Nothing is cached: every call reads every byte
(threads, 4 MiB reads; hashlib releases the GIL while it hashes, so the threads use the cores).

`stat_fingerprint` is the cheap change detector for sensors (path, size, mtime and ctime of each
shard): it decides when to start a run, never what a run may resume.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

READ_BYTES = 4 << 20
MAX_HASH_THREADS = 4


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (hex), or ``unreadable:<error>`` when it cannot be read (the shard's
    own error is recorded by the catalog; the revision still changes if the file later becomes readable)."""
    h = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    except OSError as exc:
        return f"unreadable:{type(exc).__name__}:{exc.errno}"
    return h.hexdigest()


def _relative(path: str, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return Path(path).as_posix()


def content_revision(base: str | os.PathLike, paths: Iterable[str], threads: int | None = None) -> str:
    """``local-<16 hex>``: the hash of the relative path and content of each file (see module doc)."""
    base = Path(base)
    ordered = sorted(set(map(str, paths)), key=lambda p: _relative(p, base))
    n_threads = max(1, min(threads or os.cpu_count() or 1, MAX_HASH_THREADS, len(ordered) or 1))
    if n_threads > 1:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="revision-hash") as pool:
            digests = list(pool.map(file_sha256, ordered))
    else:
        digests = [file_sha256(p) for p in ordered]
    h = hashlib.sha256()
    for path, digest in zip(ordered, digests):
        h.update(f"{_relative(path, base)}\0{digest}\n".encode())
    return "local-" + h.hexdigest()[:16]


def stat_fingerprint(base: str | os.PathLike, paths: Iterable[str]) -> str:
    """A cheap fingerprint from each file's relative path, size, mtime and ctime (no content read)."""
    base = Path(base)
    h = hashlib.sha256()
    for path in sorted(set(map(str, paths)), key=lambda p: _relative(p, base)):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        except OSError as exc:
            stamp = f"missing:{exc.errno}"
        h.update(f"{_relative(path, base)}\0{stamp}\n".encode())
    return "stat-" + h.hexdigest()[:16]
