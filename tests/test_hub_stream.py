"""Streamed Hub runs (warehouse.run.hub_stream) against tests/fake_hub.py with the real huggingface_hub client:
every stored value equals a run over a complete local copy of the same commit, the shards on disk stay
within the budget and are deleted, a failed or corrupt download is an error on its heads that the next
run retries, downloading only what unfinished heads need, and a branch moving mid-run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

try:  # works whether or not tests/ is a package
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client

from plasticity.synthetic import SyntheticSpec
from stored_rows import stored_rows
from cli.main import resolve_dataset
from warehouse.run.pipeline import analyze_dataset
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.sources.hub import download_branch
from warehouse.sources.hub_files import streamed_dir

REPO = "qk-org/sniffed"
BRANCH = "tiny-stream"
MODEL_DIR = "Org_Tiny"
SPEC = SyntheticSpec(model="Org/Tiny", num_layers=3, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                     seq_len=96, bucket_size=32, sliding_windows={1: 64}, seed=3)
N_HEADS = SPEC.num_layers * SPEC.num_q_heads


@pytest.fixture
def env(tmp_path, tmp_path_factory, monkeypatch):
    attempts = block_non_loopback(monkeypatch)
    dataset = tmp_path_factory.getbasetemp() / "hub_stream_dataset"
    if not dataset.exists():
        write_synthetic_dataset(dataset, SPEC, with_truth=False)
    branch_dir = tmp_path / "hub-root" / "qk-org" / "sniffed" / BRANCH
    shutil.copytree(dataset, branch_dir / MODEL_DIR, ignore=shutil.ignore_patterns("ground_truth.json", "README.md"))
    shutil.copy(dataset / "README.md", branch_dir / "README.md")
    hub = FakeHub(tmp_path / "hub-root", lfs_suffixes=(".parquet",)).start()
    configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home")
    group_bytes = max(sum(p.stat().st_size for p in (branch_dir / MODEL_DIR).glob(f"l{layer:02d}h*/data.parquet"))
                      for layer in range(SPEC.num_layers)) / SPEC.num_k_heads
    yield {"hub": hub, "tmp": tmp_path, "group_bytes": group_bytes, "branch_dir": branch_dir}
    hub.stop()
    assert attempts == [], f"non-loopback network access attempted: {attempts}"
    assert hub.unhandled == [] and hub.errors == [], (hub.unhandled, hub.errors)


def config(env, name: str, **extra):
    keys = {"dataset_name": REPO, "revision": BRANCH, "model_dir": MODEL_DIR, "attention": "false",
            "max_workers": 1, "warehouse": str(env["tmp"] / f"{name}.duckdb"),
            "dataset_cache_dir": str(env["tmp"] / "downloads"),
            # room for one group and a half: the next group downloads while one computes, never more
            "download_budget_gb": 1.5 * env["group_bytes"] / 1e9, **extra}
    return load_config(None, keys)


def streamed_run(env, name: str, on_outcome=None, **extra):
    cfg = config(env, name, **extra)
    root, model, sha, files = resolve_dataset(cfg)
    assert files is not None and root == files.local_dir
    return cfg, files, analyze_dataset(cfg, root, model=model, revision=sha, progress=False, hub=files,
                                       on_outcome=on_outcome)


def shards_served(hub) -> list[str]:
    """The shard folders whose bytes the Hub sent (a GET answered with a body; redirects carry none), sorted."""
    return sorted(r.path.rsplit("/", 2)[-2] for r in hub.requests
                  if r.method == "GET" and r.status in (200, 206) and r.path.endswith("data.parquet"))


def parquet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


def shard_bytes_on_disk(folder: Path) -> int:
    """Bytes of every file but the card and huggingface_hub's small bookkeeping: shards and partial downloads."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md"
               and not p.name.endswith((".metadata", ".lock")))


def _same_config(column: str, value):
    if column == "config_json":  # the two runs write to different warehouse files, by construction
        config = json.loads(value)
        config.pop("warehouse")
        return json.dumps(config, sort_keys=True)
    return value


def table_rows(path: str) -> dict[str, list]:
    """Every table's rows, sorted, without the time columns."""
    return stored_rows(path, normalise=_same_config)


def test_streamed_run_stores_what_a_run_over_the_complete_copy_stores_within_the_budget(env):
    seen_on_disk: list[int] = []
    folder = streamed_dir(env["tmp"] / "downloads", REPO, env["hub"].branch_sha(REPO, BRANCH))
    cfg, files, summary = streamed_run(env, "streamed", on_outcome=lambda o: seen_on_disk.append(
        shard_bytes_on_disk(folder)))
    assert files.local_dir == folder
    assert summary.n_done == N_HEADS and summary.n_errors == 0 and summary.revision == files.sha
    budget = cfg.download_budget_gb * 1e9
    assert seen_on_disk and max(seen_on_disk) <= budget, (max(seen_on_disk), budget)
    # the stream's own account: every shard's bytes once, never more than the budget held at once
    assert summary.downloads["downloaded_bytes"] == parquet_bytes(env["branch_dir"] / MODEL_DIR)
    assert 0 < summary.downloads["peak_held_bytes"] <= budget
    assert parquet_bytes(files.local_dir) == 0  # every shard deleted once its group was committed
    assert (files.local_dir / "README.md").is_file()
    # the reference: the whole branch at the same commit, downloaded to the same folder, analysed as a local copy
    local = download_branch(REPO, BRANCH, files.sha, model_dir=MODEL_DIR, local_dir=files.local_dir)
    assert parquet_bytes(local) > 0
    ref_cfg = config(env, "reference")
    ref = analyze_dataset(ref_cfg, files.local_dir, model=BRANCH, revision=files.sha, progress=False)
    assert ref.run_id == summary.run_id
    streamed, reference = table_rows(cfg.warehouse), table_rows(ref_cfg.warehouse)
    assert streamed["shards"] and streamed["head_metrics"] and streamed["shard_buckets"]
    for table in reference:
        assert streamed[table] == reference[table], table
    assert all(r[-1] is None for r in streamed["shards"])  # no shard has an error


def test_keep_downloads_keeps_the_shards_and_a_killed_runs_partial_files_go(env):
    # what a run killed mid-download leaves beside a shard: the next run removes it
    folder = streamed_dir(env["tmp"] / "downloads", REPO, env["hub"].branch_sha(REPO, BRANCH))
    stale = folder / MODEL_DIR / "l01h00q" / ".data.parquet.x1y2z3.incomplete"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    _, files, summary = streamed_run(env, "kept", keep_downloads=True)
    assert summary.n_done == N_HEADS
    assert not stale.exists()
    assert parquet_bytes(files.local_dir) == parquet_bytes(env["branch_dir"] / MODEL_DIR)


def test_failed_download_is_an_error_on_its_heads_and_the_next_run_downloads_only_it(env):
    hub = env["hub"]
    broken_q = f"{MODEL_DIR}/l01h03q/data.parquet"
    corrupt_k = f"{MODEL_DIR}/l02h00k/data.parquet"
    hub.failing_paths.add(broken_q)
    hub.corrupt_paths.add(corrupt_k)
    cfg, files, first = streamed_run(env, "retry")
    assert (first.n_done, first.n_errors) == (N_HEADS - 3, 3)  # l1 q3, and both query heads of l2's key head 0
    with duckdb.connect(cfg.warehouse, read_only=True) as con:
        errors = con.execute("SELECT layer, q_head, problem, file, message FROM head_errors ORDER BY ALL").fetchall()
    assert [(r[0], r[1], r[2]) for r in errors] == [(1, 3, "download_failed"), (2, 0, "download_failed"),
                                                    (2, 1, "download_failed")]
    assert errors[0][3].endswith("l01h03q/data.parquet") and f"downloading {broken_q} failed" in errors[0][4]
    assert errors[1][3].endswith("l02h00k/data.parquet") and "SHA-256" in errors[1][4]
    assert parquet_bytes(files.local_dir) == 0
    # the Hub recovers: the next run downloads the three unfinished heads' shards and nothing else
    hub.failing_paths.clear()
    hub.corrupt_paths.clear()
    hub.clear_requests()
    _, _, second = streamed_run(env, "retry")
    assert second.run_id == first.run_id and (second.n_computed, second.n_errors) == (3, 0)
    fetched = shards_served(hub)
    assert fetched == ["l01h01k", "l01h03q", "l02h00k", "l02h00q", "l02h01q"]


def test_a_branch_moving_mid_run_changes_nothing_stored(env):
    hub = env["hub"]
    moved = []

    def move_once(_outcome):
        if not moved:  # after the first head: rewrite every shard of the branch (a new commit)
            for path in sorted((env["branch_dir"] / MODEL_DIR).glob("*/data.parquet")):
                path.write_bytes(b"not parquet any more")
            moved.append(hub.branch_sha(REPO, BRANCH))

    cfg, files, summary = streamed_run(env, "moving", on_outcome=move_once)
    assert moved and moved[0] != files.sha
    assert summary.revision == files.sha and summary.n_done == N_HEADS and summary.n_errors == 0


def test_an_interrupted_run_resumes_downloading_only_the_unfinished_heads_shards(env):
    hub = env["hub"]
    seen = []

    def interrupt(_outcome):  # Ctrl-C while the third group's results arrive: three groups are committed
        seen.append(_outcome)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streamed_run(env, "resumed", on_outcome=interrupt)
    cfg = config(env, "resumed")
    with duckdb.connect(cfg.warehouse, read_only=True) as con:
        status = con.execute("SELECT status FROM runs").fetchall()
        done = con.execute("SELECT layer, k_head FROM head_metrics GROUP BY ALL ORDER BY ALL").fetchall()
    assert status == [("interrupted",)] and done == [(0, 0), (0, 1), (1, 0)]
    hub.clear_requests()
    _, files, second = streamed_run(env, "resumed")
    assert (second.n_computed, second.n_errors, second.n_done) == (6, 0, N_HEADS)
    # the three unfinished groups' key and query shards, nothing downloaded only for its profile
    assert shards_served(hub) == ["l01h01k", "l01h02q", "l01h03q", "l02h00k", "l02h00q", "l02h01k", "l02h01q",
                                  "l02h02q", "l02h03q"]
    download_branch(REPO, BRANCH, files.sha, model_dir=MODEL_DIR, local_dir=files.local_dir)
    ref_cfg = config(env, "uninterrupted")
    ref = analyze_dataset(ref_cfg, files.local_dir, model=BRANCH, revision=files.sha, progress=False)
    assert ref.run_id == second.run_id
    resumed, reference = table_rows(cfg.warehouse), table_rows(ref_cfg.warehouse)
    for table in reference:
        assert resumed[table] == reference[table], table


def test_a_second_streamed_run_into_the_same_folder_waits_then_stops_naming_it(env):
    """Two runs streaming one commit into one folder would delete each other's shards and partial
    downloads: the folder's lock file (beside it, not in the dataset root) makes the second one wait
    for lock_timeout_s, then stop with one error naming the folder, before it downloads anything."""
    import fcntl

    from warehouse.sources.hub import HubError

    folder = streamed_dir(env["tmp"] / "downloads", REPO, env["hub"].branch_sha(REPO, BRANCH))
    lock = folder.with_name(folder.name + ".stream-lock")
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running streamed run holds (another open file description)
    try:
        with pytest.raises(HubError, match="another streamed run is downloading into .*waited 0.3s"):
            streamed_run(env, "second", lock_timeout_s=0.3)
        assert shards_served(env["hub"]) == []
    finally:
        os.close(fd)
    _, files, summary = streamed_run(env, "second")  # the holder gone: the run goes ahead
    assert summary.n_done == N_HEADS and summary.n_errors == 0
    assert not any(p.name.endswith(".stream-lock") for p in files.local_dir.rglob("*"))
