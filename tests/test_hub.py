"""warehouse.sources.hub against a real local HTTP server (tests/fake_hub.py) via the real huggingface_hub client."""

from __future__ import annotations

import io
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

try:  # works whether or not tests/ is a package
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client, iter_files
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client, iter_files

from huggingface_hub import constants as hf_constants

from warehouse.sources.hub import BranchRef, HubError, download_branch, get_branch, list_dataset_branches

REPO = "qk-org/qk-sniffer"
MODEL_BRANCH = "llama-3.2-1b"
MODEL_DIR = "meta-llama/Llama-3.2-1B"
FLAT_BRANCH = "qwen"
TOKEN = "hf_FAKEtoken0123456789abcdef"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def parquet_bytes(layer: int, head: int, kind: str, version: int = 0) -> bytes:
    n = 4 + version
    table = pa.table(
        {
            "layer": pa.array([layer] * n, pa.int16()),
            "head": pa.array([head] * n, pa.int16()),
            "kind": pa.array([kind] * n),
            "token_idx": pa.array(range(n), pa.int32()),
            "vec": pa.array([[float(i + version), float(-i)] for i in range(n)], pa.list_(pa.float32())),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def model_branch_files(version: int = 0) -> dict[str, bytes]:
    md = MODEL_DIR
    return {
        "README.md": f"# qk-sniffer llama v{version}\n".encode(),
        ".gitattributes": b"*.parquet filter=lfs\n",
        f"{md}/l0h0q/data.parquet": parquet_bytes(0, 0, "q", version),
        f"{md}/l0h0k/data.parquet": parquet_bytes(0, 0, "k", version),
        f"{md}/l1h3q/data.parquet": parquet_bytes(1, 3, "q", version),
        # distractors that must NOT be downloaded
        f"{md}/l0h0q/extra.parquet": parquet_bytes(9, 9, "q"),
        f"{md}/l0h0q/nested/l9h9k/data.parquet": parquet_bytes(9, 9, "k"),
        f"{md}/notes.txt": b"not a shard",
        f"{md}/README.md": b"model-level readme (not requested)",
        "other-model/l0h0q/data.parquet": parquet_bytes(7, 7, "q"),
    }


def flat_branch_files() -> dict[str, bytes]:
    return {
        "README.md": b"# qwen\n",
        "l0h0q/data.parquet": parquet_bytes(0, 0, "q"),
        "l0h1k/data.parquet": parquet_bytes(0, 1, "k"),
        "l12h7k/data.parquet": parquet_bytes(12, 7, "k"),
        # distractors
        "l0h0q/x.json": b"{}",
        "sub/l0h0q/data.parquet": parquet_bytes(5, 5, "q"),
        "config.json": b"{}",
    }


def wanted(files: dict[str, bytes], model_dir: str | None) -> dict[str, bytes]:
    pat = re.compile(rf"^{re.escape(model_dir) + '/' if model_dir else ''}l\d+h\d+[qk]/data\.parquet$")
    return {p: b for p, b in files.items() if p == "README.md" or pat.match(p)}


def snapshot_files(folder: Path) -> dict[str, bytes]:
    return {p: b for p, b in iter_files(folder) if not p.startswith(".cache/")}


@dataclass
class Env:
    hub: FakeHub
    root: Path
    tmp: Path
    attempts: list[str]
    monkeypatch: pytest.MonkeyPatch


def _populate(root: Path) -> None:
    hub_root = root / "qk-org" / "qk-sniffer"
    for branch, files in (
        ("main", {"README.md": b"# qk-sniffer\n"}),
        (MODEL_BRANCH, model_branch_files()),
        (FLAT_BRANCH, flat_branch_files()),
    ):
        for path, data in files.items():
            target = hub_root / branch / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


@pytest.fixture
def make_env(tmp_path, monkeypatch):
    attempts = block_non_loopback(monkeypatch)
    root = tmp_path / "hub-root"
    _populate(root)
    hubs: list[FakeHub] = []

    def _make(token: str | None = None, **hub_kwargs) -> Env:
        hub = FakeHub(root, **hub_kwargs).start()
        hubs.append(hub)
        configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home", token=token)
        return Env(hub, root, tmp_path, attempts, monkeypatch)

    yield _make
    for hub in hubs:
        hub.stop()
    assert attempts == [], f"non-loopback network access attempted: {attempts}"
    for hub in hubs:
        assert hub.unhandled == [], f"fake hub got unexpected requests: {hub.unhandled}"
        assert hub.errors == [], hub.errors


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


# --------------------------------------------------------------------------- listing


def test_list_branches_names_and_shas(env):
    branches = list_dataset_branches(REPO)
    assert [b.name for b in branches] == sorted(["main", MODEL_BRANCH, FLAT_BRANCH])
    assert {b.name: b.sha for b in branches} == env.hub.branches(REPO)
    assert all(isinstance(b, BranchRef) and SHA_RE.match(b.sha) for b in branches)
    assert len({b.sha for b in branches}) == 3
    assert [r.path for r in env.hub.requests] == [f"/api/datasets/{REPO}/refs"]
    assert get_branch(REPO, MODEL_BRANCH) == BranchRef(MODEL_BRANCH, env.hub.branch_sha(REPO, MODEL_BRANCH))


def test_endpoint_env_is_read_at_call_time(env, monkeypatch):
    # huggingface_hub froze its ENDPOINT at import: pretend it is the public Hub.
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", "https://huggingface.co/{repo_id}/resolve/{revision}/{filename}"
    )
    sha = env.hub.branch_sha(REPO, FLAT_BRANCH)
    assert {b.name for b in list_dataset_branches(REPO)} >= {FLAT_BRANCH}
    out = download_branch(REPO, FLAT_BRANCH, sha, cache_dir=env.tmp / "c")
    assert snapshot_files(out) == wanted(flat_branch_files(), None)


def test_explicit_endpoint_argument(env, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", "https://huggingface.co/{repo_id}/resolve/{revision}/{filename}"
    )
    ep = env.hub.endpoint
    (ref,) = [b for b in list_dataset_branches(REPO, endpoint=ep) if b.name == MODEL_BRANCH]
    out = download_branch(REPO, MODEL_BRANCH, ref.sha, model_dir=MODEL_DIR, endpoint=ep, cache_dir=env.tmp / "c")
    assert (out / "l0h0q" / "data.parquet").is_file()


# --------------------------------------------------------------------------- downloading


@pytest.mark.parametrize("redirect_resolve", [True, False], ids=["resolve-cache-redirect", "direct"])
def test_download_pinned_gets_exactly_allowed_files(make_env, redirect_resolve):
    env = make_env(redirect_resolve=redirect_resolve)
    sha = env.hub.branch_sha(REPO, MODEL_BRANCH)
    out = download_branch(REPO, MODEL_BRANCH, sha, model_dir=MODEL_DIR, cache_dir=env.tmp / "cache", max_workers=4)

    snapshot = out.parent.parent  # MODEL_DIR has two components
    assert out == snapshot / MODEL_DIR
    assert snapshot.name == sha and snapshot.parent.name == "snapshots"
    assert snapshot_files(snapshot) == wanted(model_branch_files(), MODEL_DIR)
    assert len(wanted(model_branch_files(), MODEL_DIR)) == 4  # README + 3 shards

    t = pq.read_table(out / "l1h3q" / "data.parquet")
    assert t.column("layer").to_pylist() == [1] * 4 and t.column("kind").to_pylist() == ["q"] * 4

    # pinned: every file/tree request names the sha, never the branch; no repo_info round-trip needed
    paths = [r.path for r in env.hub.requests]
    assert paths and all(sha in p for p in paths), paths
    assert not any(MODEL_BRANCH in p for p in paths)
    assert not any(r.has_auth for r in env.hub.requests)


def test_download_top_level_layout_into_local_dir(env):
    sha = env.hub.branch_sha(REPO, FLAT_BRANCH)
    local = env.tmp / "local"
    out = download_branch(REPO, FLAT_BRANCH, sha, local_dir=local)
    assert out == local.resolve()
    assert snapshot_files(out) == wanted(flat_branch_files(), None)
    assert set(snapshot_files(out)) == {"README.md", "l0h0q/data.parquet", "l0h1k/data.parquet", "l12h7k/data.parquet"}


def test_sha_none_resolves_branch_head(env):
    out = download_branch(REPO, FLAT_BRANCH, None, cache_dir=env.tmp / "c")
    assert out.name == env.hub.branch_sha(REPO, FLAT_BRANCH)
    assert env.hub.requests[0].path == f"/api/datasets/{REPO}/refs"


def test_tree_pagination(make_env):
    env = make_env(tree_page_size=2)
    sha = env.hub.branch_sha(REPO, MODEL_BRANCH)
    out = download_branch(REPO, MODEL_BRANCH, sha, model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    assert snapshot_files(out.parent.parent) == wanted(model_branch_files(), MODEL_DIR)
    assert sum("/tree/" in r.path for r in env.hub.requests) > 1


def test_moving_branch_changes_sha_and_content(env):
    before = {b.name: b.sha for b in list_dataset_branches(REPO)}
    old_out = download_branch(REPO, MODEL_BRANCH, before[MODEL_BRANCH], model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    old_bytes = (old_out / "l0h0q" / "data.parquet").read_bytes()

    # move the branch: rewrite a shard, add one, drop one
    md = MODEL_DIR
    env.hub.write_file(REPO, MODEL_BRANCH, f"{md}/l0h0q/data.parquet", parquet_bytes(0, 0, "q", version=1))
    env.hub.write_file(REPO, MODEL_BRANCH, f"{md}/l2h0k/data.parquet", parquet_bytes(2, 0, "k", version=1))
    env.hub.delete_file(REPO, MODEL_BRANCH, f"{md}/l1h3q/data.parquet")

    after = {b.name: b.sha for b in list_dataset_branches(REPO)}
    assert after[MODEL_BRANCH] != before[MODEL_BRANCH]
    assert {k: v for k, v in after.items() if k != MODEL_BRANCH} == {
        k: v for k, v in before.items() if k != MODEL_BRANCH
    }

    new_out = download_branch(REPO, MODEL_BRANCH, after[MODEL_BRANCH], model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    assert new_out != old_out
    new_files = snapshot_files(new_out)
    assert set(new_files) == {"l0h0q/data.parquet", "l0h0k/data.parquet", "l2h0k/data.parquet"}
    assert new_files["l0h0q/data.parquet"] == parquet_bytes(0, 0, "q", version=1) != old_bytes
    # the old snapshot is untouched ...
    assert (old_out / "l0h0q" / "data.parquet").read_bytes() == old_bytes
    assert (old_out / "l1h3q" / "data.parquet").is_file()
    # ... and the old commit is still downloadable by sha from the server (fresh cache)
    again = download_branch(REPO, MODEL_BRANCH, before[MODEL_BRANCH], model_dir=MODEL_DIR, cache_dir=env.tmp / "c2")
    assert snapshot_files(again) == snapshot_files(old_out)


# --------------------------------------------------------------------------- auth


def _scan_for(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_hf_token_sent_as_bearer_and_never_leaked(make_env):
    env = make_env(token=TOKEN, required_token=TOKEN)
    branches = list_dataset_branches(REPO)
    ref = next(b for b in branches if b.name == MODEL_BRANCH)
    out = download_branch(REPO, MODEL_BRANCH, ref.sha, model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    local = download_branch(REPO, FLAT_BRANCH, None, local_dir=env.tmp / "local")

    reqs = env.hub.requests
    assert reqs and all(r.authorization == f"Bearer {TOKEN}" for r in reqs)

    with pytest.raises(HubError) as missing:
        get_branch(REPO, "no-such-branch")
    with pytest.raises(HubError) as bad_sha:
        download_branch(REPO, MODEL_BRANCH, "f" * 40, model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    for obj in (branches, ref, out, local, missing.value, bad_sha.value):
        assert TOKEN not in repr(obj) and TOKEN not in str(obj)
    assert TOKEN not in repr(vars(missing.value)) and TOKEN not in repr(vars(bad_sha.value))
    assert _scan_for(env.tmp, TOKEN.encode()) == []  # nothing we (or the client) wrote holds the token


def test_private_repo_without_token_raises(make_env):
    env = make_env(token=None, required_token=TOKEN)
    with pytest.raises(HubError) as exc:
        list_dataset_branches(REPO)
    assert REPO in str(exc.value)
    assert exc.value.status_code == 401
    assert not any(r.has_auth for r in env.hub.requests)


def test_stored_login_token_is_ignored(env):
    # a token saved by `hf auth login` must not be picked up: HF_TOKEN only
    Path(hf_constants.HF_TOKEN_PATH).write_text("hf_STOREDtokenShouldNotBeSent")
    list_dataset_branches(REPO)
    download_branch(REPO, FLAT_BRANCH, None, cache_dir=env.tmp / "c")
    assert env.hub.requests and not any(r.has_auth for r in env.hub.requests)


def test_explicit_token_argument(make_env):
    env = make_env(token=None, required_token=TOKEN)
    assert len(list_dataset_branches(REPO, token=TOKEN)) == 3
    assert all(r.authorization == f"Bearer {TOKEN}" for r in env.hub.requests)


# --------------------------------------------------------------------------- errors


def test_missing_branch_raises_huberror_naming_repo_and_branch(env):
    with pytest.raises(HubError) as exc:
        get_branch(REPO, "no-such-branch")
    assert REPO in str(exc.value) and "no-such-branch" in str(exc.value)
    assert (exc.value.repo_id, exc.value.branch) == (REPO, "no-such-branch")

    with pytest.raises(HubError) as exc2:
        download_branch(REPO, "no-such-branch", None, cache_dir=env.tmp / "c")
    assert REPO in str(exc2.value) and "no-such-branch" in str(exc2.value)


def test_unknown_sha_raises_huberror(env):
    sha = "0" * 40
    with pytest.raises(HubError) as exc:
        download_branch(REPO, MODEL_BRANCH, sha, model_dir=MODEL_DIR, cache_dir=env.tmp / "c")
    msg = str(exc.value)
    assert REPO in msg and MODEL_BRANCH in msg and sha in msg
    assert exc.value.sha == sha and exc.value.status_code == 404


def test_missing_repo_raises_huberror(env):
    with pytest.raises(HubError) as exc:
        list_dataset_branches("qk-org/does-not-exist")
    assert "qk-org/does-not-exist" in str(exc.value)
    with pytest.raises(HubError) as exc2:
        download_branch("qk-org/does-not-exist", "main", "a" * 40, cache_dir=env.tmp / "c")
    assert "qk-org/does-not-exist" in str(exc2.value) and "'main'" in str(exc2.value)


def test_no_matching_shards_raises(env):
    sha = env.hub.branch_sha(REPO, MODEL_BRANCH)
    with pytest.raises(HubError) as exc:
        download_branch(REPO, MODEL_BRANCH, sha, model_dir="not/a-model", cache_dir=env.tmp / "c")
    assert MODEL_BRANCH in str(exc.value) and sha in str(exc.value)


@pytest.mark.parametrize("bad", ["main", "abc123", "g" * 40])
def test_sha_must_be_full_commit_hash(env, bad):
    with pytest.raises(ValueError):
        download_branch(REPO, MODEL_BRANCH, bad, cache_dir=env.tmp / "c")
    assert env.hub.requests == []


@pytest.mark.parametrize("bad", ["../x", "a/../b", "a//b"])
def test_model_dir_is_validated(env, bad):
    with pytest.raises(ValueError):
        download_branch(REPO, MODEL_BRANCH, "a" * 40, model_dir=bad, cache_dir=env.tmp / "c")


# --------------------------------------------------------------------------- the fake itself


def test_fake_hub_stops_listening(tmp_path):
    (tmp_path / "o" / "r" / "main").mkdir(parents=True)
    with FakeHub(tmp_path) as hub:
        port = hub.port
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_network_guard_blocks_public_hosts(monkeypatch):
    attempts = block_non_loopback(monkeypatch)
    with pytest.raises(OSError):
        socket.getaddrinfo("huggingface.co", 443)
    assert attempts == ["getaddrinfo huggingface.co"]
