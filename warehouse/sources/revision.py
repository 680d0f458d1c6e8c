"""The revision of a local dataset: a hash of every byte of every shard (docs/method.md#inputs).

``local-`` + the first 16 hex digits of SHA-256 over, for each shard in order of its path relative
to the dataset folder, that path and the SHA-256 of its content. Any changed byte,
added, removed or renamed shard gives a new revision, so a run (whose id contains the revision)
never resumes results computed from other data. Nothing is cached: every call reads every byte
(threads, 4 MiB reads; hashlib releases the GIL while it hashes, so the threads use the cores).

The per-file digests (`content_digests`) also travel with the run: a worker hashes the bytes it
reads for a head and compares them with the digest its shard had when the revision was made
(`verified_bytes`), so a shard replaced during a run is an error on its heads, never a result
stored under the revision of other bytes. A Hub snapshot's revision is its commit; its files'
digests are the names of the blobs huggingface_hub stored them under (`hub_blob_sha256`: the
SHA-256 for files kept in LFS), so those are verified the same way, for free.

`RevisionHash` makes the same revision in background threads, the files a run reads first hashed
first, each digest available as soon as it is made: a run computes while its revision is made.

`stat_fingerprint` is the cheap change detector for sensors (path, size, mtime and ctime of each
shard): it decides when to start a run, never what a run may resume.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

READ_BYTES = 4 << 20
MAX_HASH_THREADS = 4


def file_sha256(path: str | os.PathLike, stopped: Callable[[], bool] | None = None) -> str:
    """SHA-256 of a file's content (hex), or ``unreadable:<error>`` when it cannot be read (the shard's
    own error is recorded by the catalog; the revision still changes if the file later becomes readable).
    ``stopped()`` true between two reads: give up (the result is then not a digest; see `RevisionHash`)."""
    h = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as fh:
            while stopped is None or not stopped():
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


def content_digests(base: str | os.PathLike, paths: Iterable[str], threads: int | None = None) -> dict[str, str]:
    """`file_sha256` of each file, by path (threads: see the module doc)."""
    base = Path(base)
    ordered = sorted(set(map(str, paths)), key=lambda p: _relative(p, base))
    n_threads = max(1, min(threads or os.cpu_count() or 1, MAX_HASH_THREADS, len(ordered) or 1))
    if n_threads > 1:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="revision-hash") as pool:
            digests = list(pool.map(file_sha256, ordered))
    else:
        digests = [file_sha256(p) for p in ordered]
    return dict(zip(ordered, digests))


def revision_of_digests(base: str | os.PathLike, digests: dict[str, str]) -> str:
    """``local-<16 hex>``: SHA-256 over ``relative path \\0 digest \\n`` of each file, in order of the
    relative path."""
    base = Path(base)
    h = hashlib.sha256()
    for path in sorted(digests, key=lambda p: _relative(p, base)):
        h.update(f"{_relative(path, base)}\0{digests[path]}\n".encode())
    return "local-" + h.hexdigest()[:16]


def content_revision(base: str | os.PathLike, paths: Iterable[str], threads: int | None = None) -> str:
    """``local-<16 hex>``: the hash of the relative path and content of each file (see module doc)."""
    return revision_of_digests(base, content_digests(base, paths, threads))


class RevisionHash:
    """`content_revision` in background threads, so a run computes while its revision is made.

    Files are hashed in the order given (``first``: the files the run reads first, then every other
    one), each digest published as soon as it is made: `digest(path)` waits for one file,
    `revision()` for all. The revision is the same string `content_revision` gives for the same
    files, whatever the order or the number of threads. `close()` stops the threads between two
    reads (a run that stops early does not wait for the rest of the dataset to be read)."""

    def __init__(self, base: str | os.PathLike, paths: Iterable[str], first: Iterable[str] = (),
                 threads: int | None = None) -> None:
        self.base = Path(base)
        every = set(map(str, paths))
        early = [p for p in dict.fromkeys(map(str, first)) if p in every]
        rest = sorted(every.difference(early), key=lambda p: _relative(p, self.base))
        self._order = early + rest
        self._known = frozenset(self._order)
        self._next = 0
        self._digests: dict[str, str] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._failure: BaseException | None = None
        n_threads = max(1, min(threads or os.cpu_count() or 1, MAX_HASH_THREADS, len(self._order) or 1))
        self._threads = [threading.Thread(target=self._work, name=f"revision-hash-{i}", daemon=True)
                         for i in range(n_threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopped or self._next >= len(self._order):
                    return
                path = self._order[self._next]
                self._next += 1
            try:
                digest = file_sha256(path, lambda: self._stopped)
            except BaseException as exc:  # noqa: BLE001 -- e.g. MemoryError: the waiters raise it, never hang
                with self._cond:
                    self._failure = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if self._stopped:  # the digest of part of the file, never published
                    return
                self._digests[path] = digest
                self._cond.notify_all()

    def _wait(self, ready) -> None:
        with self._cond:
            while not ready():
                if self._failure is not None:
                    raise RuntimeError(f"the revision hash failed: {self._failure!r}") from self._failure
                if self._stopped:
                    raise RuntimeError("the revision hash was stopped")
                self._cond.wait()

    def digest(self, path: str) -> str | None:
        """The file's SHA-256 (as `file_sha256`), once it is made; None for a file not hashed here."""
        path = str(path)
        if path not in self._known:
            return None
        self._wait(lambda: path in self._digests)
        return self._digests[path]

    def done(self) -> bool:
        return len(self._digests) == len(self._order)

    def digests(self) -> dict[str, str]:
        """Every file's digest, once all are made."""
        self._wait(self.done)
        return dict(self._digests)

    def revision(self) -> str:
        """``local-<16 hex>`` (`revision_of_digests`), once every file is hashed."""
        return revision_of_digests(self.base, self.digests())

    def close(self) -> None:
        with self._cond:
            if not self.done():
                self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> "RevisionHash":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChangedFile(ValueError):
    """A file whose bytes are not those its run hashed."""


def verified_bytes(path: str | os.PathLike, expected_sha256: str) -> bytes:
    """The whole file, read once, after checking that its SHA-256 is ``expected_sha256``
    (`ChangedFile` if not). The caller parses these bytes, so what it analyses is what was hashed."""
    with open(path, "rb") as fh:
        data = fh.read()
    digest = hashlib.sha256(data).hexdigest()  # releases the GIL on large inputs
    if digest != expected_sha256:
        raise ChangedFile(f"its content changed after the run hashed it (SHA-256 now {digest[:16]}..., "
                          f"when the run's revision was made {expected_sha256[:16]}...); the run does not "
                          "analyse bytes its revision does not describe: run it again once the file is final")
    return data


_SHA256_HEX = frozenset("0123456789abcdef")


def hub_blob_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 of a file of a huggingface_hub cache snapshot, from the name of the blob the
    snapshot links to (``.../blobs/<sha256>`` for files stored in LFS), or None when the path is
    not such a link (a git-stored file's blob is named by its git SHA-1: not verifiable this way)."""
    try:
        target = Path(os.path.realpath(path))
    except OSError:
        return None
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and set(name) <= _SHA256_HEX:
        return name
    return None


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
