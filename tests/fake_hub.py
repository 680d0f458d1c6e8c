"""A tiny, real HTTP server impersonating the Hugging Face Hub for dataset repos.

Reusable from any test (hub access layer, Dagster sensors, ...)::

    from tests.fake_hub import FakeHub, configure_hf_client, block_non_loopback

    def test_something(tmp_path, monkeypatch):
        block_non_loopback(monkeypatch)                 # refuse any non-127.0.0.1 traffic
        root = tmp_path / "hub"
        (root / "org" / "qk" / "main").mkdir(parents=True)
        with FakeHub(root) as hub:
            configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf")
            ...                                          # use huggingface_hub / warehouse.sources.hub
            assert hub.unhandled == []

Repo layout on disk: ``root_dir/<owner>/<name>/<branch>/<files...>``; every
repo is served as a *dataset* repo ``<owner>/<name>``.  A branch directory
name is URL-unquoted to get the branch name (``a%2Fb`` -> branch ``a/b``).
Files are plain git blobs (no Xet); with ``lfs_suffixes`` the files whose names end so are listed
as LFS files (the tree's ``lfs`` entry with the content's SHA-256, size and pointer size, and
``X-Linked-Etag``/``X-Linked-Size`` on their resolve responses), like the Hub lists Parquet files.

``rate_limit_bytes_per_s`` caps the bytes of file bodies sent per second over all connections together
(one shared link, as a machine's network is); :attr:`FakeHub.max_file_bodies_in_flight` is the largest number
of file bodies it was sending at once (parallel downloads). Tests make downloads fail or serve wrong bytes with
:attr:`FakeHub.failing_paths` (answered 403) and :attr:`FakeHub.corrupt_paths` (one byte changed).

The disk is re-read on every request that names a branch, so a test "moves" a
branch simply by rewriting its files (or with :meth:`FakeHub.write_file`,
:meth:`FakeHub.set_branch_files`).  Each observed branch state gets a
deterministic commit sha (sha1 over branch name + sorted git blob ids); every
commit ever observed stays downloadable by sha, like on the real Hub.

Endpoints (exactly those huggingface_hub 2.4 uses for refs / repo_info /
list_repo_tree / hf_hub_download / snapshot_download):

* ``GET  /api/datasets/{owner}/{name}/refs``
* ``GET  /api/datasets/{owner}/{name}``                      (default branch ``main``)
* ``GET  /api/datasets/{owner}/{name}/revision/{rev}``
* ``GET  /api/datasets/{owner}/{name}/tree/{rev}[/{path}]``   (``recursive``, Link-header pagination)
* ``HEAD|GET /datasets/{owner}/{name}/resolve/{rev}/{path}``  (307 -> resolve-cache, like the Hub
  does for non-LFS files; ``redirect_resolve=False`` serves the bytes directly)
* ``HEAD|GET /api/resolve-cache/datasets/{owner}/{name}/{sha}/{path}``
  (200 + ``X-Repo-Commit``, ``ETag: "<git blob sha1>"``, ``Content-Length``; ``Range`` supported)

Errors mimic the Hub's ``X-Error-Code`` header (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) so huggingface_hub raises its usual
exception classes.  Unknown routes answer 404 and are listed in
:attr:`FakeHub.unhandled`; the fake never answers 5xx (the client would retry
with back-off), internal problems answer 400 and land in :attr:`FakeHub.errors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote

__all__ = [
    "FakeHub",
    "RecordedRequest",
    "configure_hf_client",
    "block_non_loopback",
    "git_blob_oid",
]

DEFAULT_BRANCH = "main"
MAX_FILES_PER_BRANCH = 10_000
MAX_BYTES_PER_BRANCH = 256 * 1024 * 1024
MAX_RECORDED_REQUESTS = 100_000
HANDLER_TIMEOUT_S = 10.0
RATE_CHUNK_BYTES = 64 * 1024
LFS_POINTER_SIZE = 134
FAKE_DATE = "2024-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub uses as ETag / tree ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # raw (still URL-quoted) path, without the query string
    query: str
    authorization: str | None  # full header value, e.g. "Bearer hf_xxx"
    status: int

    @property
    def has_auth(self) -> bool:
        return self.authorization is not None


@dataclass(frozen=True)
class Commit:
    repo_id: str
    branch: str
    sha: str
    files: Mapping[str, bytes]  # repo path -> content
    oids: Mapping[str, str]  # repo path -> git blob oid


class _HubHTTPError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _commit_sha(branch: str, oids: Mapping[str, str]) -> str:
    h = hashlib.sha1(b"fake-hub-commit\0" + branch.encode() + b"\0")
    for path in sorted(oids):
        h.update(f"{path}\0{oids[path]}\n".encode())
    return h.hexdigest()


class FakeHub:
    """Threaded HTTP server on ``127.0.0.1:<random port>``; use as a context manager."""

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        *,
        required_token: str | None = None,
        redirect_resolve: bool = True,
        tree_page_size: int = 1000,
        rate_limit_bytes_per_s: float | None = None,
        lfs_suffixes: tuple[str, ...] = (),
        max_bytes_per_branch: int = MAX_BYTES_PER_BRANCH,
    ) -> None:
        self.max_bytes_per_branch = max_bytes_per_branch
        self.root_dir = Path(root_dir)
        self.rate_limit_bytes_per_s = rate_limit_bytes_per_s
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.failing_paths: set[str] = set()  # repo paths whose downloads answer 403
        self.corrupt_paths: set[str] = set()  # repo paths served with their first byte changed
        self.bytes_sent = 0
        self.file_bodies_in_flight = 0  # file bodies (resolve answers 200/206) being sent right now
        self.max_file_bodies_in_flight = 0  # the most at once since start or clear_requests
        self._sha256: dict[str, str] = {}  # git blob oid -> SHA-256 of the content (LFS ids, computed once)
        self._link_free_at = 0.0
        self.required_token = required_token
        self.redirect_resolve = redirect_resolve
        self.tree_page_size = max(1, int(tree_page_size))
        self._lock = threading.RLock()
        self._commits: dict[tuple[str, str], Commit] = {}  # (repo_id, sha) -> Commit
        self._requests: list[RecordedRequest] = []
        self._unhandled: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        if self._server is not None:
            raise RuntimeError("FakeHub already started")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeHub", daemon=True
        )
        self._thread.start()
        self.snapshot_all()  # register the initial state of every branch
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # stops serve_forever (bounded by poll_interval)
        server.server_close()  # joins handler threads (bounded by HANDLER_TIMEOUT_S)
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeHub not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    url = endpoint

    # ------------------------------------------------------------------ recording
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def unhandled(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._unhandled)

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._unhandled.clear()
            self._errors.clear()
            self.max_file_bodies_in_flight = self.file_bodies_in_flight

    def _record(self, req: RecordedRequest, *, unhandled: bool) -> None:
        with self._lock:
            if len(self._requests) < MAX_RECORDED_REQUESTS:
                self._requests.append(req)
            if unhandled and len(self._unhandled) < MAX_RECORDED_REQUESTS:
                self._unhandled.append(req)

    def _content_sha256(self, oid: str, data: bytes) -> str:
        with self._lock:
            known = self._sha256.get(oid)
        if known is None:
            known = hashlib.sha256(data).hexdigest()
            with self._lock:
                self._sha256[oid] = known
        return known

    # ------------------------------------------------------------------ the link
    def _send_body(self, wfile, body: bytes) -> None:
        """Write a response body, at most `rate_limit_bytes_per_s` over all connections together."""
        rate = self.rate_limit_bytes_per_s
        if not rate:
            wfile.write(body)
        else:
            view = memoryview(body)
            # slots of ~5 ms of the link (at least 64 KiB): few wake-ups and writes a body, so a fast link
            # costs the server little CPU, and the cap still holds over any 10 ms
            step = max(RATE_CHUNK_BYTES, int(rate * 0.005))
            for i in range(0, len(view), step):
                chunk = view[i:i + step]
                with self._lock:  # the chunk's slot on the shared link
                    start = max(time.monotonic(), self._link_free_at)
                    self._link_free_at = start + len(chunk) / rate
                    until = self._link_free_at
                delay = until - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                wfile.write(chunk)
        with self._lock:
            self.bytes_sent += len(body)

    # ------------------------------------------------------------------ repo state
    def _repo_dir(self, repo_id: str) -> Path:
        owner, _, name = repo_id.partition("/")
        if not owner or not name or "/" in name or owner in (".", "..") or name in (".", ".."):
            raise _HubHTTPError(404, f"Repository {repo_id!r} not found", code="RepoNotFound")
        return self.root_dir / owner / name

    def _branch_dirs(self, repo_id: str) -> dict[str, Path]:
        repo_dir = self._repo_dir(repo_id)
        if not repo_dir.is_dir():
            raise _HubHTTPError(404, f"Repository {repo_id!r} not found", code="RepoNotFound")
        return {unquote(p.name): p for p in sorted(repo_dir.iterdir()) if p.is_dir()}

    def _scan(self, repo_id: str, branch: str, branch_dir: Path) -> Commit:
        files: dict[str, bytes] = {}
        total = 0
        for dirpath, dirnames, filenames in os.walk(branch_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                if not full.is_file():
                    continue
                rel = full.relative_to(branch_dir).as_posix()
                data = full.read_bytes()
                total += len(data)
                files[rel] = data
                if len(files) > MAX_FILES_PER_BRANCH or total > self.max_bytes_per_branch:
                    raise _HubHTTPError(400, f"branch {branch!r} of {repo_id!r} exceeds the fake hub's size bounds")
        oids = {path: git_blob_oid(data) for path, data in files.items()}
        commit = Commit(repo_id, branch, _commit_sha(branch, oids), MappingProxyType(files), MappingProxyType(oids))
        with self._lock:
            self._commits.setdefault((repo_id, commit.sha), commit)
        return commit

    def _branch_commits(self, repo_id: str) -> dict[str, Commit]:
        return {b: self._scan(repo_id, b, d) for b, d in self._branch_dirs(repo_id).items()}

    def _resolve(self, repo_id: str, revision: str) -> Commit:
        dirs = self._branch_dirs(repo_id)  # raises RepoNotFound
        if revision in dirs:
            return self._scan(repo_id, revision, dirs[revision])
        with self._lock:
            commit = self._commits.get((repo_id, revision.lower()))
        if commit is None:
            raise _HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # public helpers for tests ------------------------------------------------
    def snapshot_all(self) -> None:
        """Scan every branch of every repo now (registers their current commits)."""
        if not self.root_dir.is_dir():
            return
        for owner in sorted(p for p in self.root_dir.iterdir() if p.is_dir()):
            for name in sorted(p for p in owner.iterdir() if p.is_dir()):
                self._branch_commits(f"{owner.name}/{name.name}")

    def warm(self) -> None:
        """Hash the LFS files of every commit seen so far (`start` scans every branch) now, so that later
        requests cost only their answer (a benchmark then measures the client, not the server's first listing)."""
        with self._lock:
            commits = list(self._commits.values())
        for commit in commits:
            for path, data in commit.files.items():
                if self.lfs_suffixes and path.endswith(self.lfs_suffixes):
                    self._content_sha256(commit.oids[path], data)

    def branches(self, repo_id: str) -> dict[str, str]:
        """``{branch: sha}`` for the current disk state."""
        return {b: c.sha for b, c in self._branch_commits(repo_id).items()}

    def branch_sha(self, repo_id: str, branch: str) -> str:
        return self.commit(repo_id, branch).sha

    def commit(self, repo_id: str, revision: str) -> Commit:
        """The commit a branch name or known sha currently resolves to."""
        return self._resolve(repo_id, revision)

    def branch_dir(self, repo_id: str, branch: str) -> Path:
        return self._repo_dir(repo_id) / quote(branch, safe="")

    def write_file(self, repo_id: str, branch: str, path: str, data: bytes | str) -> str:
        """Create/overwrite one file on a branch; returns the branch's new sha."""
        target = self.branch_dir(repo_id, branch) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        return self.branch_sha(repo_id, branch)

    def delete_file(self, repo_id: str, branch: str, path: str) -> str:
        (self.branch_dir(repo_id, branch) / path).unlink()
        return self.branch_sha(repo_id, branch)

    def set_branch_files(self, repo_id: str, branch: str, files: Mapping[str, bytes | str]) -> str:
        """Replace the whole content of a branch (creating it if needed); returns the new sha."""
        import shutil

        bdir = self.branch_dir(repo_id, branch)
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        for path, data in files.items():
            target = bdir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.encode() if isinstance(data, str) else data)
        return self.branch_sha(repo_id, branch)

    def delete_branch(self, repo_id: str, branch: str) -> None:
        import shutil

        shutil.rmtree(self.branch_dir(repo_id, branch))

    # ------------------------------------------------------------------ HTTP dispatch
    def _check_auth(self, authorization: str | None) -> None:
        if self.required_token is None:
            return
        if authorization is None:
            raise _HubHTTPError(401, "Repository not found", code="RepoNotFound")
        if authorization != f"Bearer {self.required_token}":
            raise _HubHTTPError(401, "Invalid credentials in Authorization header")

    def dispatch(self, method: str, raw_target: str, authorization: str | None) -> tuple[_Response, bool]:
        """Pure request -> (response, handled) function used by the HTTP handler."""
        raw_path, _, query = raw_target.partition("?")
        if method not in ("GET", "HEAD"):
            return _error_response(405, f"method {method} not supported by the fake hub", None, {}), False
        try:
            seg = [unquote(s) for s in raw_path.split("/")[1:]]
            params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
            route = self._route(seg)
            if route is None:
                return _error_response(404, f"unhandled route {raw_path}", None, {}), False
            handler, args = route
            self._check_auth(authorization)
            return handler(method, params, *args), True
        except _HubHTTPError as exc:
            return _error_response(exc.status, exc.message, exc.code, exc.headers), True
        except Exception as exc:  # bug in the fake or disk race: fail fast, never 5xx (client retries)
            msg = f"fake hub internal error on {method} {raw_path}: {type(exc).__name__}: {exc}"
            with self._lock:
                self._errors.append(msg)
            return _error_response(400, msg, None, {}), True

    def _route(self, seg: list[str]):
        n = len(seg)
        if n >= 4 and seg[0] == "api" and seg[1] in ("datasets", "models", "spaces"):
            repo_type, repo_id, rest = seg[1], f"{seg[2]}/{seg[3]}", seg[4:]
            if repo_type != "datasets":
                return self._not_found, (repo_id,)
            if rest == []:
                return self._repo_info, (repo_id, DEFAULT_BRANCH)
            if rest == ["refs"]:
                return self._refs, (repo_id,)
            if len(rest) == 2 and rest[0] == "revision":
                return self._repo_info, (repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree":
                return self._tree, (repo_id, rest[1], "/".join(rest[2:]).strip("/"))
            return None
        if n >= 7 and seg[:3] == ["api", "resolve-cache", "datasets"]:
            return self._file, (f"{seg[3]}/{seg[4]}", seg[5], "/".join(seg[6:]), True)
        if n >= 6 and seg[0] == "datasets" and seg[3] == "resolve":
            return self._file, (f"{seg[1]}/{seg[2]}", seg[4], "/".join(seg[5:]), False)
        if n >= 5 and seg[2] == "resolve":  # /{owner}/{name}/resolve/... = a *model* repo
            return self._not_found, (f"{seg[0]}/{seg[1]}",)
        return None

    # route handlers -----------------------------------------------------------
    def _not_found(self, method, params, repo_id):
        raise _HubHTTPError(404, f"Repository {repo_id!r} not found", code="RepoNotFound")

    def _refs(self, method, params, repo_id):
        commits = self._branch_commits(repo_id)
        data = {
            "branches": [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c.sha} for b, c in sorted(commits.items())
            ],
            "converts": [],
            "tags": [],
            "pullRequests": [],
        }
        return _json_response(data)

    def _repo_info(self, method, params, repo_id, revision):
        commit = self._resolve(repo_id, revision)
        blobs = params.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sib: dict = {"rfilename": path}
            if blobs:
                sib.update(size=len(commit.files[path]), blobId=commit.oids[path])
            siblings.append(sib)
        owner = repo_id.split("/")[0]
        data = {
            "_id": commit.sha[:24],
            "id": repo_id,
            "author": owner,
            "sha": commit.sha,
            "createdAt": FAKE_DATE,
            "lastModified": FAKE_DATE,
            "private": self.required_token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(v) for v in commit.files.values()),
        }
        return _json_response(data)

    def _tree(self, method, params, repo_id, revision, path_in_repo):
        commit = self._resolve(repo_id, revision)
        recursive = params.get("recursive", "").lower() in ("1", "true")
        entries = _tree_entries(commit, path_in_repo, recursive, self.lfs_suffixes, self._content_sha256)
        if entries is None:
            raise _HubHTTPError(
                404, f"{path_in_repo} does not exist on {revision}", code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        try:
            cursor = max(0, int(params.get("cursor", "0")))
        except ValueError:
            raise _HubHTTPError(400, "bad cursor") from None
        page = entries[cursor : cursor + self.tree_page_size]
        resp = _json_response(page)
        nxt = cursor + self.tree_page_size
        if nxt < len(entries):
            base = f"{self.endpoint}/api/datasets/{repo_id}/tree/{quote(revision, safe='')}"
            if path_in_repo:
                base += "/" + quote(path_in_repo, safe="")
            q = f"recursive={'true' if recursive else 'false'}&expand=false&cursor={nxt}"
            resp.headers["Link"] = f'<{base}?{q}>; rel="next"'
        return resp

    def _file(self, method, params, repo_id, revision, path, pinned):
        commit = self._resolve(repo_id, revision)
        if pinned and commit.sha != revision.lower():
            raise _HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        if path not in commit.files:
            raise _HubHTTPError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha}
            )
        if path in self.failing_paths:
            raise _HubHTTPError(403, f"Forbidden: {path}")
        data, oid = commit.files[path], commit.oids[path]
        base_headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{oid}"'}
        if self.lfs_suffixes and path.endswith(self.lfs_suffixes):
            base_headers.update({"X-Linked-Etag": f'"{self._content_sha256(oid, data)}"',
                                 "X-Linked-Size": str(len(data))})
        if path in self.corrupt_paths and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if not pinned and self.redirect_resolve:
            location = (
                f"/api/resolve-cache/datasets/{repo_id}/{commit.sha}/{quote(path)}"
                f"?etag=%22{oid}%22"
            )
            body = f"Temporary Redirect. Redirecting to {location}".encode()
            return _Response(307, {**base_headers, "Location": location, "Content-Type": "text/plain"}, body)
        headers = {
            **base_headers,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        return _Response(200, headers, data)


def _tree_entries(commit: Commit, path_in_repo: str, recursive: bool,
                  lfs_suffixes: tuple[str, ...] = (), sha256_of=None) -> list[dict] | None:
    prefix = f"{path_in_repo}/" if path_in_repo else ""
    if path_in_repo and not any(p.startswith(prefix) for p in commit.files):
        return None
    dirs: set[str] = set()
    files: list[str] = []
    for path in sorted(commit.files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        parts = rest.split("/")
        for i in range(1, len(parts)):
            if recursive or i == 1:
                dirs.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            files.append(path)
    entries: list[dict] = []
    for d in sorted(dirs):
        children = sorted(f"{p}\0{commit.oids[p]}" for p in commit.files if p.startswith(d + "/"))
        entries.append(
            {"type": "directory", "oid": hashlib.sha1("\n".join(children).encode()).hexdigest(), "size": 0, "path": d}
        )
    for f in files:
        entry = {"type": "file", "oid": commit.oids[f], "size": len(commit.files[f]), "path": f}
        if lfs_suffixes and f.endswith(lfs_suffixes):
            entry["lfs"] = {"oid": sha256_of(commit.oids[f], commit.files[f]), "size": len(commit.files[f]),
                            "pointerSize": LFS_POINTER_SIZE}
        entries.append(entry)
    return entries


def _json_response(data, status: int = 200) -> _Response:
    body = json.dumps(data).encode()
    return _Response(status, {"Content-Type": "application/json; charset=utf-8"}, body)


def _error_response(status: int, message: str, code: str | None, extra: dict) -> _Response:
    resp = _json_response({"error": message}, status)
    resp.headers["X-Error-Message"] = message
    if code is not None:
        resp.headers["X-Error-Code"] = code
    resp.headers.update(extra)
    return resp


def _apply_range(resp: _Response, range_header: str | None) -> _Response:
    if resp.status != 200 or not range_header or not range_header.startswith("bytes="):
        return resp
    total = len(resp.body)
    spec = range_header[len("bytes=") :].split(",")[0].strip()
    start_s, _, end_s = spec.partition("-")
    try:
        if start_s == "":  # suffix range: last N bytes
            start, end = max(0, total - int(end_s)), total - 1
        else:
            start = int(start_s)
            end = min(int(end_s), total - 1) if end_s else total - 1
    except ValueError:
        return resp
    if start >= total or start > end:
        return _Response(416, {"Content-Range": f"bytes */{total}"}, b"")
    headers = {**resp.headers, "Content-Range": f"bytes {start}-{end}/{total}"}
    return _Response(206, headers, resp.body[start : end + 1])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = HANDLER_TIMEOUT_S  # bounds reads from a stuck client
    server: _Server

    def _handle(self) -> None:
        hub = self.server.hub
        auth = self.headers.get("Authorization")
        # Drain (and ignore) any request body so the connection stays in a sane state.
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= 1_000_000:
            self.rfile.read(length)
        resp, handled = hub.dispatch(self.command, self.path, auth)
        resp = _apply_range(resp, self.headers.get("Range"))
        raw_path, _, query = self.path.partition("?")
        hub._record(
            RecordedRequest(self.command, raw_path, query, auth, resp.status), unhandled=not handled
        )
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Connection", "close")  # no lingering keep-alive sockets across tests
        self.end_headers()
        if self.command != "HEAD" and resp.body:
            is_file = resp.status in (200, 206) and "/resolve" in raw_path
            if is_file:
                with hub._lock:
                    hub.file_bodies_in_flight += 1
                    hub.max_file_bodies_in_flight = max(hub.max_file_bodies_in_flight, hub.file_bodies_in_flight)
            try:
                hub._send_body(self.wfile, resp.body)
            finally:
                if is_file:
                    with hub._lock:
                        hub.file_bodies_in_flight -= 1
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass


# ---------------------------------------------------------------------------
# client configuration helpers (pytest ``monkeypatch`` based)
# ---------------------------------------------------------------------------

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def configure_hf_client(monkeypatch, hub: FakeHub, *, hf_home: str | os.PathLike[str], token: str | None = None) -> None:
    """Point huggingface_hub at ``hub`` for the duration of a test.

    huggingface_hub reads most env vars **once at import** into
    ``huggingface_hub.constants``; setting the env var alone is not enough if
    the library is already imported, so both are patched:

    * ``HF_ENDPOINT`` + ``constants.ENDPOINT`` + ``constants.HUGGINGFACE_CO_URL_TEMPLATE``
      (``hf_hub_url`` builds URLs from the template and only swaps in an explicit
      ``endpoint=`` when the URL starts with ``constants.ENDPOINT``; patching one
      without the other would send downloads to huggingface.co).
    * ``HF_HUB_OFFLINE`` unset + ``constants.HF_HUB_OFFLINE = False``.
    * ``HF_HOME``/``HF_HUB_CACHE`` and the token/xet/assets paths -> ``hf_home``.
    * ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (env; only
      effective for fresh imports/subprocesses), proxies removed,
      ``NO_PROXY=127.0.0.1,localhost``, and the shared HTTP client is closed so it
      is rebuilt from this environment.
    * ``HF_TOKEN`` set to ``token`` (or removed when None); ``HUGGING_FACE_HUB_TOKEN`` removed.
    """
    from huggingface_hub import constants

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    endpoint = hub.endpoint

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", *_PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # The shared HTTP client reads proxy settings when it is created: drop it so the
    # next call builds a fresh one from the environment configured above.
    try:
        from huggingface_hub.utils import close_session
    except ImportError:  # pragma: no cover - older huggingface_hub
        return
    close_session()


def block_non_loopback(monkeypatch) -> list[str]:
    """Refuse DNS lookups and connections to anything but loopback.

    Returns the (live) list of refused attempts.  huggingface_hub swallows
    connection errors in places (falling back to the cache), so tests should
    also assert that this list is empty.
    """
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    loopback_names = {"127.0.0.1", "localhost", "::1"}

    def _is_loopback(host) -> bool:
        if isinstance(host, bytes):
            host = host.decode()
        return host in loopback_names or str(host).startswith("127.")

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            attempts.append(f"getaddrinfo {host}")
            raise OSError(f"network access to {host!r} blocked in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    def _check(address) -> None:
        if isinstance(address, tuple) and address and not _is_loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OSError(f"network access to {address!r} blocked in tests")

    def guarded_connect(self, address):
        _check(address)
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        _check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    return attempts


def iter_files(folder: str | os.PathLike[str]) -> Iterable[tuple[str, bytes]]:
    """``(relative posix path, bytes)`` of every regular file below ``folder`` (follows symlinks)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path.read_bytes()
