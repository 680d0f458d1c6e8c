"""Hugging Face Hub access layer for qk-sniffer datasets.

The qk-sniffer output lives in a single *dataset* repo with one git branch per
model.  Each branch holds shards laid out as::

    [<model_dir>/]l<layer>h<head><q|k>/data.parquet
    README.md

This module is deliberately small and free of Dagster imports: it lists the
branches of the dataset repo (name + head commit sha) and downloads one branch
*pinned to a commit sha*, so that a sensor can decide what changed and an asset
can materialise exactly the data the sensor saw.

Configuration
-------------
* Endpoint: the ``endpoint`` argument, else the ``HF_ENDPOINT`` environment
  variable **read at call time**, else the client's default
  (``https://huggingface.co``).  huggingface_hub itself snapshots
  ``HF_ENDPOINT`` into ``huggingface_hub.constants`` at import time, so we pass
  the resolved endpoint explicitly on every call instead of relying on that.
* Token: the ``token`` argument (meant for tests), else the ``HF_TOKEN``
  environment variable, else *no* authentication.  Tokens saved by
  ``hf auth login`` (``$HF_HOME/token``) are intentionally ignored: we always
  pass ``token=False`` to the client when no token is configured.  The token is
  never logged, never kept on any object returned from here, and never written
  to disk by this module.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BranchRef",
    "HubError",
    "shard_allow_patterns",
    "list_dataset_branches",
    "get_branch",
    "download_branch",
]

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
SHARD_FILENAME = "data.parquet"
# fnmatch pattern for one shard folder: l<layer>h<head><q|k>
SHARD_DIR_PATTERN = "l[0-9]*h[0-9]*[qk]"
README = "README.md"

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_LIBRARY_NAME = "attention-plasticity-warehouse"

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class BranchRef:
    """A branch of the dataset repo and the commit its head points to."""

    name: str
    sha: str


class HubError(RuntimeError):
    """Any failure talking to the Hub, naming the repo (and branch/sha when known).

    The original huggingface_hub / HTTP exception is chained as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str,
        branch: str | None = None,
        sha: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.branch = branch
        self.sha = sha
        self.status_code = status_code


# --------------------------------------------------------------------------- #
# configuration helpers
# --------------------------------------------------------------------------- #


def _resolve_endpoint(endpoint: str | None) -> str | None:
    value = endpoint if endpoint is not None else os.environ.get("HF_ENDPOINT")
    if value is None or not value.strip():
        return None  # let huggingface_hub use its default
    return value.strip().rstrip("/")


def _resolve_token(token: str | None) -> str | bool:
    """Explicit token, else $HF_TOKEN, else ``False`` (= never use a stored token)."""
    value = token if token is not None else os.environ.get("HF_TOKEN")
    if value is None:
        return False
    value = value.strip()
    return value or False


def _safe_endpoint(endpoint: str | None) -> str:
    """Endpoint for messages/logs, with any ``user:password@`` stripped."""
    if endpoint is None:
        return "the default Hugging Face endpoint"
    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _redact(text: str, token: str | bool) -> str:
    if isinstance(token, str) and token:
        text = text.replace(token, "***")
    return text


def _transport_errors() -> tuple[type[BaseException], ...]:
    """HTTP-library exceptions across huggingface_hub generations (requests/httpx/httpx2)."""
    found: list[type[BaseException]] = []
    for module_name, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module_name), attr))
        except Exception:  # pragma: no cover - depends on installed packages
            continue
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def _call(
    fn: Callable[[], T],
    *,
    what: str,
    repo_id: str,
    branch: str | None,
    sha: str | None,
    endpoint: str | None,
    token: str | bool,
) -> T:
    """Run a huggingface_hub call and translate its failures into :class:`HubError`."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"dataset repo {repo_id!r}"
    if branch is not None:
        where += f" branch {branch!r}"
    if sha is not None:
        where += f" (commit {sha})"
    where += f" on {_safe_endpoint(endpoint)}"

    try:
        return fn()
    except HubError:
        raise
    except RevisionNotFoundError as exc:
        detail = "revision not found"
        if sha is not None:
            detail = f"commit {sha} not found"
        elif branch is not None:
            detail = f"branch {branch!r} not found"
        raise HubError(
            f"{what} failed for {where}: {detail}",
            repo_id=repo_id, branch=branch, sha=sha, status_code=_status(exc),
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise HubError(
            f"{what} failed for {where}: repository not found or not accessible "
            "(check the repo id and that HF_TOKEN grants read access)",
            repo_id=repo_id, branch=branch, sha=sha, status_code=_status(exc),
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # before EntryNotFoundError: subclass
        raise HubError(
            f"{what} failed for {where}: Hub unreachable, offline, or erroring, and no complete cached copy "
            f"({_redact(_first_line(exc), token)})",
            repo_id=repo_id, branch=branch, sha=sha,
        ) from exc
    except EntryNotFoundError as exc:
        raise HubError(
            f"{what} failed for {where}: file not found ({_redact(_first_line(exc), token)})",
            repo_id=repo_id, branch=branch, sha=sha, status_code=_status(exc),
        ) from exc
    except HfHubHTTPError as exc:
        raise HubError(
            f"{what} failed for {where}: {_redact(_first_line(exc), token)}",
            repo_id=repo_id, branch=branch, sha=sha, status_code=_status(exc),
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        raise HubError(
            f"{what} failed for {where}: {type(exc).__name__}: {_redact(_first_line(exc), token)}",
            repo_id=repo_id, branch=branch, sha=sha,
        ) from exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _api(endpoint: str | None, token: str | bool):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name=_LIBRARY_NAME)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


def list_dataset_branches(
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[BranchRef]:
    """All branches of dataset ``repo_id`` with their head commit sha, sorted by name.

    One request: ``GET {endpoint}/api/datasets/{repo_id}/refs``.
    """
    ep = _resolve_endpoint(endpoint)
    tok = _resolve_token(token)
    refs = _call(
        lambda: _api(ep, tok).list_repo_refs(repo_id, repo_type=REPO_TYPE, token=tok),
        what="listing branches",
        repo_id=repo_id, branch=None, sha=None, endpoint=ep, token=tok,
    )
    branches = sorted(BranchRef(name=ref.name, sha=ref.target_commit) for ref in refs.branches)
    logger.debug("dataset %s has %d branch(es) on %s", repo_id, len(branches), _safe_endpoint(ep))
    return branches


def get_branch(
    repo_id: str,
    branch: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
) -> BranchRef:
    """The current head of one branch; :class:`HubError` naming repo and branch if it is missing."""
    for ref in list_dataset_branches(repo_id, endpoint=endpoint, token=token):
        if ref.name == branch:
            return ref
    ep = _resolve_endpoint(endpoint)
    raise HubError(
        f"branch {branch!r} not found in dataset repo {repo_id!r} on {_safe_endpoint(ep)}",
        repo_id=repo_id, branch=branch,
    )


def _escape_fnmatch(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _normalise_model_dir(model_dir: str | None) -> str | None:
    if model_dir is None:
        return None
    cleaned = model_dir.strip().strip("/")
    if not cleaned:
        return None
    if any(part in ("", ".", "..") for part in cleaned.split("/")) or "\\" in cleaned:
        raise ValueError(f"invalid model_dir {model_dir!r}")
    return cleaned


def shard_allow_patterns(model_dir: str | None = None) -> tuple[list[str], list[str]]:
    """``(allow_patterns, ignore_patterns)`` selecting the shards (+ top-level README.md).

    huggingface_hub matches with ``fnmatch`` where ``*`` also matches ``/``; the
    ignore pattern rejects shards nested deeper than one folder below the prefix.
    """
    model_dir = _normalise_model_dir(model_dir)
    prefix = "" if model_dir is None else _escape_fnmatch(model_dir) + "/"
    allow = [f"{prefix}{SHARD_DIR_PATTERN}/{SHARD_FILENAME}", README]
    ignore = [f"{prefix}*/*/{SHARD_FILENAME}"]
    return allow, ignore


def download_branch(
    repo_id: str,
    branch: str,
    sha: str | None,
    *,
    model_dir: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    max_workers: int | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """Download the shards of ``branch`` at commit ``sha`` and return the folder holding them.

    The download is pinned with ``revision=sha`` (so it is immune to the branch
    moving meanwhile); ``sha=None`` first resolves the branch head (one extra
    ``/refs`` request).  Only ``[model_dir/]l*h*[qk]/data.parquet`` and the
    top-level ``README.md`` are fetched.  The returned path is
    ``<snapshot>/<model_dir>`` (or ``<snapshot>`` when ``model_dir`` is None),
    where ``<snapshot>`` is the immutable cache snapshot for ``sha`` or
    ``local_dir`` if given.

    Raises :class:`HubError` (naming repo, branch and sha) if the repo or commit
    is missing, the Hub is unreachable, or the commit holds no matching shard.
    """
    from huggingface_hub import snapshot_download

    ep = _resolve_endpoint(endpoint)
    tok = _resolve_token(token)
    model_dir = _normalise_model_dir(model_dir)

    if sha is None:
        sha = get_branch(repo_id, branch, endpoint=endpoint, token=token).sha
    sha = sha.strip().lower()
    if not _SHA_RE.fullmatch(sha):
        raise ValueError(f"sha must be a full 40-character commit hash, got {sha!r}")

    allow, ignore = shard_allow_patterns(model_dir)
    kwargs: dict = dict(
        repo_type=REPO_TYPE,
        revision=sha,
        allow_patterns=allow,
        ignore_patterns=ignore,
        endpoint=ep,
        token=tok,
        library_name=_LIBRARY_NAME,
    )
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir)
    if max_workers is not None:
        kwargs["max_workers"] = max_workers

    logger.info(
        "downloading dataset %s branch %s at %s (model_dir=%s) from %s",
        repo_id, branch, sha, model_dir, _safe_endpoint(ep),
    )
    snapshot = Path(
        _call(
            lambda: snapshot_download(repo_id, **kwargs),
            what="downloading",
            repo_id=repo_id, branch=branch, sha=sha, endpoint=ep, token=tok,
        )
    )
    shards_dir = snapshot / model_dir if model_dir is not None else snapshot
    if not any(shards_dir.glob(f"{SHARD_DIR_PATTERN}/{SHARD_FILENAME}")):
        where = f"{model_dir}/" if model_dir is not None else "the repo root"
        raise HubError(
            f"no shards matching {allow[0]!r} under {where} in dataset repo {repo_id!r} "
            f"branch {branch!r} (commit {sha})",
            repo_id=repo_id, branch=branch, sha=sha,
        )
    return shards_dir
