"""The Hub and download options of `plasticity analyze`, each non-default on the command line against
tests/fake_hub.py with the real huggingface_hub client: `hub_download`, `keep_downloads`,
`download_max_workers`, `dataset_cache_dir`, `revision`, `model_dir`. Each changes where or how the
shards are downloaded, never a stored value (or, for `revision` and `model_dir`, which data are
analysed). `download_budget_gb` is checked in test_hub_stream.py (the bytes on disk stay within it).

One fake Hub serves the module: branch `tiny` holds two models' shards (`Org_Tiny`, `Org_Next`),
branch `other` a third capture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:  # works whether or not tests/ is a package
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client

from cli.main import main
from plasticity.synthetic import SyntheticSpec
from test_operational_options import assert_same_values, stored
from warehouse.store import db
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.sources.hub_files import streamed_dir

REPO = "qk-org/sniffed"
BRANCH, OTHER = "tiny", "other"
SPEC = SyntheticSpec(model="Org/Tiny", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                     seq_len=64, bucket_size=16, sliding_windows={}, seed=3)
NEXT = SyntheticSpec(model="Org/Next", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                     seq_len=64, bucket_size=16, sliding_windows={}, seed=4)  # the card's layout, other data
OTHER_SPEC = SyntheticSpec(model="Org/Tiny", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                           seq_len=64, bucket_size=16, sliding_windows={}, seed=8)


def branch_files(folder: Path, spec: SyntheticSpec, model_dir: str, tmp: Path) -> None:
    data = write_synthetic_dataset(tmp / f"src-{spec.seed}", spec, with_truth=False)
    shutil.copytree(data, folder / model_dir, ignore=shutil.ignore_patterns("ground_truth.json", "README.md"))
    if not (folder / "README.md").exists():
        shutil.copy(data / "README.md", folder / "README.md")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub-options")
    root = tmp / "hub-root"
    branch_files(root / "qk-org" / "sniffed" / BRANCH, SPEC, "Org_Tiny", tmp)
    branch_files(root / "qk-org" / "sniffed" / BRANCH, NEXT, "Org_Next", tmp)
    branch_files(root / "qk-org" / "sniffed" / OTHER, OTHER_SPEC, "Org_Tiny", tmp)
    # 400 kB/s over all downloads together: a shard (~10 kB) takes long enough that parallel downloads overlap
    with pytest.MonkeyPatch.context() as mp, FakeHub(root, lfs_suffixes=(".parquet",),
                                                     rate_limit_bytes_per_s=400e3) as server:
        attempts = block_non_loopback(mp)
        configure_hf_client(mp, server, hf_home=tmp / "hf-home")
        yield {"server": server, "tmp": tmp, "hf_cache": tmp / "hf-home" / "hub",
               "branch_dir": root / "qk-org" / "sniffed" / BRANCH}
        assert attempts == [], f"non-loopback network access attempted: {attempts}"
        assert server.unhandled == [] and server.errors == [], (server.unhandled, server.errors)


def analyze(hub, name: str, *flags: str, own_cache: bool = True) -> Path:
    """`plasticity analyze` of the Hub dataset into its own warehouse and (`own_cache`) cache folder."""
    run = hub["tmp"] / name
    argv = ["analyze", "--dataset_name", REPO, "--warehouse", str(run / "wh.duckdb"), "--output_dir",
            str(run / "results"), "--attention", "false", "--max_workers", "1", "--quiet"]
    for key, value in (("--revision", BRANCH), ("--model_dir", "Org_Tiny"),
                       ("--dataset_cache_dir", str(run / "cache") if own_cache else None)):
        if key not in flags and value is not None:
            argv += [key, value]
    hub["server"].clear_requests()
    assert main(argv + list(flags)) == 0
    return run


def parquet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))  # snapshots' symlinks: their blobs' sizes


def ap_by_head(warehouse: Path) -> dict:
    with db.reader(warehouse) as con:
        return {(layer, h): ap for layer, h, ap in con.execute("SELECT layer, q_head, ap_overall FROM head_metrics")
                .fetchall()}


def branch_sha(hub, branch: str = BRANCH) -> str:
    return hub["server"].branch_sha(REPO, branch)


@pytest.fixture(scope="module")
def streamed(hub):
    """The defaults: streamed, one group's shards at a time, deleted once committed."""
    run = analyze(hub, "streamed")
    assert parquet_bytes(run / "cache") == 0
    assert (streamed_dir(run / "cache", REPO, branch_sha(hub)) / "README.md").is_file()
    with db.reader(run / "wh.duckdb") as con:
        assert con.execute("SELECT model, revision, n_done FROM runs").fetchall() == [
            (BRANCH, branch_sha(hub), SPEC.num_layers * SPEC.num_q_heads)]
    return {"values": stored(run / "wh.duckdb"), "wh": run / "wh.duckdb"}


def test_snapshot_downloads_and_keeps_the_whole_branch(hub, streamed):
    run = analyze(hub, "snapshot", "--hub_download", "snapshot")
    assert_same_values(stored(run / "wh.duckdb"), streamed["values"])
    # the branch at its commit (the model's shards and the card) in the cache folder, kept after the run
    assert parquet_bytes(run / "cache") == parquet_bytes(hub["branch_dir"] / "Org_Tiny") > 0
    assert {p.parent.parent.name for p in (run / "cache").rglob("*.parquet")} == {"Org_Tiny"}


def test_keep_downloads_keeps_the_streamed_shards(hub, streamed):
    run = analyze(hub, "kept", "--keep_downloads", "true")
    assert_same_values(stored(run / "wh.duckdb"), streamed["values"])
    folder = streamed_dir(run / "cache", REPO, branch_sha(hub))
    assert parquet_bytes(folder) == parquet_bytes(hub["branch_dir"] / "Org_Tiny") > 0  # only the model's shards


@pytest.mark.parametrize("workers", [1, 4])
def test_download_max_workers_bounds_the_files_downloading_at_once(hub, streamed, workers):
    run = analyze(hub, f"workers-{workers}", "--download_max_workers", str(workers))
    assert_same_values(stored(run / "wh.duckdb"), streamed["values"])
    seen = hub["server"].max_file_bodies_in_flight
    # one group = 3 files (2 query shards and their key shard), all within the default budget at once
    assert seen == 1 if workers == 1 else seen >= 2, seen


def test_dataset_cache_dir_receives_the_downloads(hub, streamed):
    """Without the key, downloads go to huggingface_hub's cache; with it, there and nowhere else."""
    own = hub["tmp"] / "own-cache"
    before = parquet_bytes(hub["hf_cache"]), sorted(hub["hf_cache"].rglob("*"))
    run = analyze(hub, "cache-dir", "--dataset_cache_dir", str(own), "--keep_downloads", "true")
    assert_same_values(stored(run / "wh.duckdb"), streamed["values"])
    assert parquet_bytes(own) == parquet_bytes(hub["branch_dir"] / "Org_Tiny")
    assert (parquet_bytes(hub["hf_cache"]), sorted(hub["hf_cache"].rglob("*"))) == before
    # and the default: huggingface_hub's cache folder
    default = analyze(hub, "default-cache", "--keep_downloads", "true", own_cache=False)
    assert parquet_bytes(hub["hf_cache"]) == parquet_bytes(hub["branch_dir"] / "Org_Tiny")
    assert not (default / "cache").exists()


def test_revision_analyses_that_branch_at_its_commit(hub, streamed):
    run = analyze(hub, "other", "--revision", OTHER)
    with db.reader(run / "wh.duckdb") as con:
        assert con.execute("SELECT model, revision FROM runs").fetchall() == [(OTHER, branch_sha(hub, OTHER))]
    aps = ap_by_head(run / "wh.duckdb")
    assert branch_sha(hub, OTHER) != branch_sha(hub)
    fetched = [r.path for r in hub["server"].requests if "/resolve" in r.path]
    assert fetched and all(branch_sha(hub, OTHER) in p for p in fetched), fetched  # pinned to its commit
    base = ap_by_head(streamed["wh"])
    assert aps.keys() == base.keys() and all(aps[h] != base[h] for h in base)  # the other branch's data


def test_model_dir_picks_the_model_within_the_branch(hub, streamed):
    run = analyze(hub, "next", "--model_dir", "Org_Next")
    fetched = [r.path for r in hub["server"].requests if r.path.endswith(".parquet")]
    assert fetched and all("/Org_Next/" in p for p in fetched), fetched
    aps, base = ap_by_head(run / "wh.duckdb"), ap_by_head(streamed["wh"])
    assert aps.keys() == base.keys() and all(aps[h] != base[h] for h in base)  # the other model's data
