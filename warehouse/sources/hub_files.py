"""One Hub branch's shards file by file: list them at a commit (names, sizes, content hashes, without
downloading), fetch the card, and download one shard pinned to the commit, checking its bytes.

A streamed run (`warehouse.run.streaming`) downloads a group's shards as the group's turn comes and
deletes them once its results are committed, instead of downloading the whole branch first
(`warehouse.sources.hub.download_branch`). Every download here goes through huggingface_hub's own
client (`hf_hub_download` for the card, `http_get` for a shard, whose size and hash the listing already
gave), pinned to ``<sha>``, into ``local_dir``: a shard lands at
``<local_dir>/<path in the repo>``, the same place a complete download of the branch into that folder
puts it, so a streamed run and a run over the complete copy see the same paths.

File names from the Hub are untrusted: only ``[model_dir/]l<digits>h<digits><q|k>/data.parquet`` and the
top-level ``README.md`` are ever turned into local paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from warehouse.sources.catalog import SHARD_RE
from warehouse.sources.hub import (_LIBRARY_NAME, _SHA_RE, README, REPO_TYPE, SHARD_FILENAME, HubError, _api, _call,
                                   _normalise_model_dir, _resolve_endpoint, _resolve_token)

READ_BYTES = 4 << 20


@dataclass(frozen=True)
class HubFile:
    """One file of a commit: its path in the repo, size, and what its bytes must hash to."""

    repo_path: str
    size: int
    sha256: str | None  # LFS files: the SHA-256 of the content, from the Hub's listing
    git_oid: str | None  # other files: the git blob id (sha1 of ``blob <size>\\0<content>``)


@dataclass
class HubBranchFiles:
    """The shards of one branch at one commit and where they go on this machine."""

    repo_id: str
    branch: str
    sha: str
    model_dir: str | None
    local_dir: Path  # the dataset root of the run: shards go to local_dir/<repo path>
    shards: dict[str, HubFile]  # local path (str) -> file
    endpoint: str | None = None
    token: str | None = None

    @property
    def base(self) -> Path:
        return self.local_dir / self.model_dir if self.model_dir else self.local_dir

    @property
    def shard_folders(self) -> list[str]:
        """The shard folder names (``l00h00q``...) under `base`: the catalog's listing."""
        return sorted(Path(p).parent.name for p in self.shards)

    def total_bytes(self) -> int:
        return sum(f.size for f in self.shards.values())


def list_branch_files(repo_id: str, branch: str, sha: str, local_dir: str | os.PathLike, *,
                      model_dir: str | None = None, endpoint: str | None = None,
                      token: str | None = None) -> HubBranchFiles:
    """The shards of `branch` at commit `sha` (one paginated tree listing, nothing downloaded)."""
    ep = _resolve_endpoint(endpoint)
    tok = _resolve_token(token)
    model_dir = _normalise_model_dir(model_dir)
    sha = sha.strip().lower()
    if not _SHA_RE.fullmatch(sha):
        raise ValueError(f"sha must be a full 40-character commit hash, got {sha!r}")
    local_dir = Path(local_dir)

    def listing():
        return list(_api(ep, tok).list_repo_tree(repo_id, path_in_repo=model_dir, recursive=True, revision=sha,
                                                 repo_type=REPO_TYPE, token=tok))

    entries = _call(listing, what="listing files", repo_id=repo_id, branch=branch, sha=sha, endpoint=ep, token=tok)
    prefix = f"{model_dir}/" if model_dir else ""
    shards: dict[str, HubFile] = {}
    for entry in entries:
        path = getattr(entry, "path", "")
        if not hasattr(entry, "size") or not path.startswith(prefix):
            continue  # a folder, or outside model_dir
        parts = path[len(prefix):].split("/")
        if len(parts) != 2 or parts[1] != SHARD_FILENAME or not SHARD_RE.match(parts[0]):
            continue  # not a shard: never becomes a local path
        lfs = getattr(entry, "lfs", None)
        sha256 = lfs.sha256 if lfs is not None else None
        local = local_dir / path  # checked just above: [model_dir/]l<digits>h<digits><q|k>/data.parquet
        shards[str(local)] = HubFile(path, int(entry.size), sha256, None if lfs is not None else entry.blob_id)
    if not shards:
        where = f"{model_dir}/" if model_dir else "the repo root"
        raise HubError(f"no shards matching l*h*[qk]/{SHARD_FILENAME} under {where} in dataset repo {repo_id!r} "
                       f"branch {branch!r} (commit {sha})", repo_id=repo_id, branch=branch, sha=sha)
    return HubBranchFiles(repo_id, branch, sha, model_dir, local_dir, shards, endpoint, token)


def download_card(files: HubBranchFiles) -> Path | None:
    """The branch's top-level README.md into ``local_dir`` (None when the commit has none)."""
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return _download(files, README)
    except HubError as exc:
        if isinstance(exc.__cause__, EntryNotFoundError):
            return None
        raise


def download_shard(files: HubBranchFiles, local_path: str) -> Path:
    """Download one shard pinned to the commit and check its bytes against the Hub's hash.

    One GET of ``<endpoint>/datasets/<repo>/resolve/<sha>/<path>`` (huggingface_hub's `http_get`, with its
    retries and resume), written to a temporary file beside the shard and hashed as the bytes arrive,
    so each byte is hashed once and never read back; the file takes the shard's name only once its size
    and hash are the listing's (`HubFile`). The listing already gave both, so no metadata request is made.
    A shard already at its place (``keep_downloads`` from an earlier run) is hashed from disk and kept when
    it matches. Raises `HubError` naming the file when the download fails or the bytes differ (nothing
    is left behind, so the next run downloads it again)."""
    f = files.shards[local_path]
    out = Path(local_path)
    if out.is_file() and content_mismatch(out, f) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".incomplete")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, "wb") as raw:  # opened by name: `raw.name` is the path
            sink = _HashingWriter(raw, f)
            _get(files, f, sink)
            problem = sink.mismatch()
        if sink.from_disk():  # the client restarted the body, or wrote the file itself: hash it as written
            problem = content_mismatch(tmp, f)
        if problem is not None:
            raise HubError(f"{f.repo_path} of dataset repo {files.repo_id!r} (commit {files.sha}): {problem}",
                           repo_id=files.repo_id, branch=files.branch, sha=files.sha)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


#: Suffix of the lock file a streamed run holds beside its commit folder (``<local_dir>.stream-lock``,
#: outside the dataset root, so a kept download analysed later as a local dataset holds no stray file).
STREAM_LOCK_SUFFIX = ".stream-lock"


def stream_lock_path(files: HubBranchFiles) -> Path:
    return files.local_dir.with_name(files.local_dir.name + STREAM_LOCK_SUFFIX)


@contextmanager
def stream_folder_lock(files: HubBranchFiles, timeout_s: float):
    """Hold ``<local_dir>.stream-lock`` (an exclusive ``flock``) while a streamed run uses the
    folder: two runs streaming the same commit into one folder would delete each other's shards and
    partial downloads. A second run waits up to `timeout_s`, then stops with a HubError naming the
    folder. The kernel drops the lock when its holder exits, however it ends, so a killed run never
    leaves the folder locked."""
    lock = stream_lock_path(files)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HubError(f"another streamed run is downloading into {files.local_dir} (it holds "
                                   f"{lock}); waited {timeout_s:g}s: run again when it has finished, or "
                                   f"give this run its own dataset_cache_dir", repo_id=files.repo_id,
                                   sha=files.sha) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_partial_downloads(files: HubBranchFiles) -> int:
    """Delete the temporary files `download_shard` leaves beside a shard when its process is killed
    mid-download (``.data.parquet.*.incomplete``), so they do not hold disk outside the budget of the
    next run. Returns how many were removed."""
    n = 0
    for folder in {Path(p).parent for p in files.shards}:
        for stale in folder.glob(f".{SHARD_FILENAME}.*.incomplete"):
            stale.unlink(missing_ok=True)
            n += 1
    return n


class _HashingWriter:
    """The file object `http_get` writes to: each chunk is hashed (SHA-256 of an LFS file, else the git
    blob id) and written. When the chunks seen are not the file (a rewind, after a resumed download the
    server answered in full; or a client version that writes the file by its name, such as hf_transfer),
    the caller hashes the file from disk instead."""

    def __init__(self, raw, f: HubFile):
        self.raw, self.f = raw, f
        self.h = _hasher(f)
        self.n = 0
        self.rewound = False

    def write(self, chunk) -> int:
        if self.h is not None:
            self.h.update(chunk)
        self.n += len(chunk)
        return self.raw.write(chunk)

    @property
    def name(self) -> str:
        return self.raw.name

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, *args) -> int:
        self.rewound = True
        return self.raw.seek(*args)

    def truncate(self, *args) -> int:
        self.rewound = True
        return self.raw.truncate(*args)

    def flush(self) -> None:
        self.raw.flush()

    def from_disk(self) -> bool:
        """Whether the bytes hashed here may not be the file's (then `mismatch` leaves it to the file on disk)."""
        return self.rewound or self.n != self.f.size

    def mismatch(self) -> str | None:
        if self.from_disk():
            return None
        return _digest_mismatch(self.h, self.f)


def _hasher(f: HubFile):
    if f.sha256 is not None:
        return hashlib.sha256()
    if f.git_oid is not None:
        return hashlib.sha1(b"blob %d\0" % f.size)
    return None


def _digest_mismatch(h, f: HubFile) -> str | None:
    if h is None:
        return None
    want = f.sha256 if f.sha256 is not None else f.git_oid
    if h.hexdigest() != want:
        what = "SHA-256" if f.sha256 is not None else "git blob id"
        return f"content {what} {h.hexdigest()} differs from the Hub's {want}"
    return None


def content_mismatch(path: Path, f: HubFile) -> str | None:
    """Why the bytes at `path` are not `f`'s (size, SHA-256 or git blob id), or None when they are."""
    size = path.stat().st_size
    if size != f.size:
        return f"downloaded {size} bytes, the Hub lists {f.size}"
    h = _hasher(f)
    if h is None:
        return None
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(READ_BYTES):
            h.update(chunk)
    return _digest_mismatch(h, f)


def _get(files: HubBranchFiles, f: HubFile, sink: _HashingWriter) -> None:
    """One pinned GET of `f` into `sink`, failures translated by `_call` into a `HubError` naming the file."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    ep = _resolve_endpoint(files.endpoint)
    tok = _resolve_token(files.token)
    url = hf_hub_url(files.repo_id, f.repo_path, repo_type=REPO_TYPE, revision=files.sha, endpoint=ep)
    headers = build_hf_headers(token=tok, library_name=_LIBRARY_NAME)
    _call(lambda: http_get(url, sink, headers=headers, expected_size=f.size,
                           displayed_filename=f.repo_path.rsplit("/", 2)[-2]),
          what=f"downloading {f.repo_path}", repo_id=files.repo_id, branch=files.branch, sha=files.sha,
          endpoint=ep, token=tok)


def _download(files: HubBranchFiles, repo_path: str) -> Path:
    from huggingface_hub import hf_hub_download

    ep = _resolve_endpoint(files.endpoint)
    tok = _resolve_token(files.token)
    out = _call(lambda: hf_hub_download(files.repo_id, repo_path, repo_type=REPO_TYPE, revision=files.sha,
                                        local_dir=str(files.local_dir), endpoint=ep, token=tok,
                                        library_name=_LIBRARY_NAME),
                what=f"downloading {repo_path}", repo_id=files.repo_id, branch=files.branch, sha=files.sha,
                endpoint=ep, token=tok)
    return Path(out)


def streamed_dir(base: str | os.PathLike | None, repo_id: str, sha: str) -> Path:
    """Where a streamed run of `repo_id` at `sha` puts its shards: ``<base>/streamed/<owner>/<name>/<sha>``
    (`base` None: huggingface_hub's cache folder). The repo id and sha are checked before they become a path."""
    parts = repo_id.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ValueError(f"bad dataset repo id {repo_id!r}")
    if not _SHA_RE.fullmatch(sha):
        raise ValueError(f"sha must be a full 40-character commit hash, got {sha!r}")
    if base is None:
        from huggingface_hub import constants

        base = constants.HF_HUB_CACHE
    return Path(base) / "streamed" / parts[0] / parts[1] / sha


def open_branch(repo_id: str, branch: str, sha: str, local_dir: str | os.PathLike, *, model_dir: str | None = None,
                endpoint: str | None = None, token: str | None = None) -> HubBranchFiles:
    """List the branch's shards at `sha` and download its card: what a streamed run starts from."""
    files = list_branch_files(repo_id, branch, sha, local_dir, model_dir=model_dir, endpoint=endpoint, token=token)
    files.local_dir.mkdir(parents=True, exist_ok=True)
    download_card(files)
    return files
