"""The Hub sensor and the pinned download, with the real huggingface_hub client against
tests/fake_hub.FakeHub on 127.0.0.1 (HF_ENDPOINT), and a token that must never leak."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import dagster as dg
import pytest

from dagster_project.definitions import OWN_ASSETS, defs
from dagster_project.partitions import TAG_BRANCH, TAG_REPO, TAG_REVISION
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from dagster_project.steps import refresh_head_samples
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset

try:
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
    from tests.test_dagster_assets import TINY, canon
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client
    from test_dagster_assets import TINY, canon

REPO = "qk-org/sniffed"
TOKEN = "hf_SECRETdagster0123456789abcdef"
MODEL_DIR = "Org_Tiny"


@pytest.fixture
def setup(tmp_path, tmp_path_factory, monkeypatch):
    attempts = block_non_loopback(monkeypatch)
    dataset = tmp_path_factory.getbasetemp() / "hub_tiny_dataset"
    if not dataset.exists():
        write_synthetic_dataset(dataset, TINY, with_truth=False)
    hub_root = tmp_path / "hub-root"
    repo_dir = hub_root / "qk-org" / "sniffed"
    (repo_dir / "main").mkdir(parents=True)
    (repo_dir / "main" / "README.md").write_text("# not a model\n")
    shutil.copytree(dataset, repo_dir / "tiny-a", ignore=shutil.ignore_patterns("ground_truth.json"))
    shutil.copytree(dataset, repo_dir / "tiny-b" / MODEL_DIR, ignore=shutil.ignore_patterns("ground_truth.json"))
    (repo_dir / "tiny-b" / "README.md").write_text("# tiny b\n")

    configs = tmp_path / "configs"
    (configs / "dagster").mkdir(parents=True)
    # streamed partitions get room for one GQA group and a half: never the whole model on disk
    group_bytes = sum(p.stat().st_size for p in dataset.glob("l00h*/data.parquet"))
    (configs / "dagster" / "hub_repos.yaml").write_text(
        f"repos:\n  - dataset_name: {REPO}\n    branches: [tiny-a, tiny-b, gone]\n"
        f"    overrides: {{attention: false, max_workers: 1, download_budget_gb: {1.5 * group_bytes / 1e9!r}}}\n")
    (configs / "tiny-b.yaml").write_text(
        f"model: tiny-b-model\ndataset_name: {REPO}\nrevision: tiny-b\nmodel_dir: {MODEL_DIR}\n"
        "attention: false\nmax_workers: 1\nhub_download: snapshot\n")
    resources = {
        "warehouse": WarehouseResource(path=str(tmp_path / "wh.duckdb"), exports_dir=str(tmp_path / "results")),
        "hub": HubResource(download_dir=str(tmp_path / "snapshots")),
        "datasets": DatasetsResource(configs_dir=str(configs)),
    }
    hub = FakeHub(hub_root, required_token=TOKEN).start()
    configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home", token=TOKEN)
    instance = dg.DagsterInstance.ephemeral()
    yield {"hub": hub, "resources": resources, "instance": instance, "tmp": tmp_path, "dataset": dataset,
           "configs": configs, "budget_bytes": 1.5 * group_bytes}
    instance.dispose()
    hub.stop()
    assert attempts == [], f"non-loopback network access attempted: {attempts}"
    assert hub.unhandled == [] and hub.errors == [], (hub.unhandled, hub.errors)


def tick(s, cursor=None):
    sensor = next(x for x in defs.sensors if x.name == "hub_branches_sensor")
    with dg.build_sensor_context(instance=s["instance"], cursor=cursor,
                                 resources={"hub": s["resources"]["hub"], "datasets": s["resources"]["datasets"]}
                                 ) as ctx:
        result = sensor(ctx)
    for request in result.dynamic_partitions_requests or []:  # what the daemon does with them
        s["instance"].add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def materialize(s, request):
    selection = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & {"shard_catalog", "head_samples",
                                                                                      "head_metrics"}]
    return dg.materialize(selection, partition_key=request.partition_key, instance=s["instance"],
                          resources=s["resources"], tags=request.tags)


def test_sensor_adds_partitions_and_requests_pinned_runs(setup):
    s, hub = setup, setup["hub"]
    shas = hub.branches(REPO)
    first = tick(s)
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["tiny-a", "tiny-b-model"]]
    got = {r.partition_key: r.tags for r in first.run_requests}
    assert got == {
        "tiny-a": {TAG_REVISION: shas["tiny-a"], TAG_REPO: REPO, TAG_BRANCH: "tiny-a",
                   "plasticity/trigger": "hub_branches_sensor"},
        "tiny-b-model": {TAG_REVISION: shas["tiny-b"], TAG_REPO: REPO, TAG_BRANCH: "tiny-b",
                         "plasticity/trigger": "hub_branches_sensor"},
    }
    assert {r.run_key for r in first.run_requests} == {f"tiny-a@{shas['tiny-a']}", f"tiny-b-model@{shas['tiny-b']}"}
    assert set(s["instance"].get_dynamic_partitions("models")) == {"tiny-a", "tiny-b-model"}
    # nothing changed: no runs, no partitions
    second = tick(s, first.cursor)
    assert second.run_requests == [] and not second.dynamic_partitions_requests
    assert "no new or moved Hub branches (2 seen)" in second.skip_reason.skip_message
    # the branch moves: one run, pinned to the new sha
    new_sha = hub.write_file(REPO, "tiny-a", "README.md", "# tiny a, v2\n")
    third = tick(s, second.cursor)
    assert [(r.partition_key, r.tags[TAG_REVISION]) for r in third.run_requests] == [("tiny-a", new_sha)]
    assert not third.dynamic_partitions_requests
    # every Hub call carried the token from HF_TOKEN
    assert hub.requests and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)


def test_requested_run_downloads_the_pinned_sha_and_matches_analyze_dataset(setup, tmp_path):
    s, hub = setup, setup["hub"]
    request = {r.partition_key: r for r in tick(s).run_requests}["tiny-b-model"]
    pinned = request.tags[TAG_REVISION]
    hub.write_file(REPO, "tiny-b", "README.md", "# moved after the sensor saw it\n")  # branch moves on
    hub.clear_requests()
    result = materialize(s, request)
    assert result.success
    paths = [r.path for r in hub.requests]
    assert paths and all(pinned in p for p in paths), paths  # never the branch head
    snapshot = Path(s["resources"]["hub"].download_dir) / "qk-org" / "sniffed" / pinned
    assert (snapshot / "README.md").read_text() == "# tiny b\n"
    assert (snapshot / MODEL_DIR / "l01h01q" / "data.parquet").is_file()
    wh = s["resources"]["warehouse"].path
    with db.reader(wh) as con:
        assert con.execute("SELECT DISTINCT revision FROM shards WHERE model = 'tiny-b-model'").fetchall() == [(pinned,)]
        run_id, revision = con.execute("SELECT run_id, revision FROM runs WHERE model = 'tiny-b-model'").fetchone()
    assert revision == pinned
    # same numbers as the plain pipeline on a local copy of the same files
    cfg = load_config(s["configs"] / "tiny-b.yaml", {"warehouse": str(tmp_path / "ref.duckdb")})
    local = tmp_path / "local-copy"  # the downloaded files as plain files: root card, model_dir's shards
    shutil.copytree(snapshot, local)
    ref = analyze_dataset(cfg, local, model="tiny-b-model", revision=pinned, progress=False)
    assert ref.run_id == run_id
    for table in ("head_metrics", "head_bucket_plasticity", "head_component_weights"):
        q = f"SELECT * EXCLUDE (model) FROM {table} ORDER BY ALL"
        with db.reader(wh) as a, db.reader(cfg.warehouse) as b:
            assert canon(a.execute(q).fetchall()) == canon(b.execute(q).fetchall()), table
    # the analysis step reused the pinned snapshot: no second download
    fetched = [r for r in hub.requests if r.method == "GET" and r.path.endswith("l00h00q/data.parquet")
               and "resolve-cache" in r.path]
    assert len(fetched) == 1


def test_streamed_partition_downloads_each_shard_once_within_the_budget_and_matches_analyze_dataset(setup, tmp_path):
    s, hub = setup, setup["hub"]
    request = {r.partition_key: r for r in tick(s).run_requests}["tiny-a"]  # tiny-a streams (the default)
    pinned = request.tags[TAG_REVISION]
    hub.write_file(REPO, "tiny-a", "README.md", "# moved after the sensor saw it\n")  # branch moves on
    hub.clear_requests()
    snapshot = Path(s["resources"]["hub"].download_dir) / "qk-org" / "sniffed" / pinned
    on_disk = DiskPeak(snapshot)
    try:
        first = materialize(s, request)
        assert first.success
    finally:
        peak = on_disk.stop()
    paths = [r.path for r in hub.requests]
    assert paths and all(pinned in p for p in paths), paths  # never the branch head
    assert (snapshot / "README.md").is_file() and not list(snapshot.rglob("*.parquet"))  # streamed, then deleted
    # one partition run, one download of each shard (the catalog step lists, the analysis step downloads and
    # profiles), and never more than the budget on disk
    served = sorted(r.path.rsplit("/", 2)[-2] for r in hub.requests
                    if r.method == "GET" and r.status in (200, 206) and r.path.endswith("data.parquet"))
    assert served == sorted(p.parent.name for p in s["dataset"].glob("*/data.parquet"))
    assert 0 < peak <= s["budget_bytes"], (peak, s["budget_bytes"])
    wh = s["resources"]["warehouse"].path
    tables = ("shards", "shard_buckets", "head_samples", "head_metrics", "head_bucket_plasticity",
              "head_component_weights")
    exclude = {"shards": "model, path", "head_samples": "model, q_path, k_path"}
    with db.reader(wh) as con:
        run_id, revision = con.execute("SELECT run_id, revision FROM runs WHERE model = 'tiny-a'").fetchone()
        streamed = {t: con.execute(f"SELECT * EXCLUDE ({exclude.get(t, 'model')}) FROM {t} WHERE model = 'tiny-a' "
                                   "ORDER BY ALL").fetchall() for t in tables}
    assert revision == pinned
    assert all(row[0] is not None for row in con_rows(wh, "SELECT q_rows FROM head_samples"))  # profiled
    cfg = load_config(None, {"warehouse": str(tmp_path / "ref.duckdb"), "attention": False, "max_workers": 1})
    ref = analyze_dataset(cfg, s["dataset"], model="tiny-a", revision=pinned, progress=False)
    refresh_head_samples("tiny-a", cfg, cfg.warehouse)
    assert ref.run_id == run_id
    with db.reader(cfg.warehouse) as con:
        for table, rows in streamed.items():
            want = con.execute(f"SELECT * EXCLUDE ({exclude.get(table, 'model')}) FROM {table} ORDER BY ALL").fetchall()
            assert rows and canon(rows) == canon(want), table
    # a second run of the finished partition downloads nothing: the catalog step keeps the stored profiles
    hub.clear_requests()
    second = materialize(s, request)
    assert second.success
    assert [r for r in hub.requests if r.path.endswith("data.parquet")] == []
    # the catalog's shard checks ran before any shard was read: they say so (a warning, checked 0) instead of
    # passing on nothing; the second run's catalog holds every profile and they pass on every shard
    n_shards = len(list(s["dataset"].glob("*/data.parquet")))
    for result, passed, not_profiled in ((first, False, n_shards), (second, True, 0)):
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        for name in ("shard_schema_valid", "shard_widths_consistent"):
            check = checks[name]
            assert check.passed is passed, (name, check.description)
            assert check.metadata["not_profiled_yet"].value == not_profiled
            assert check.metadata["rows_checked"].value == n_shards - not_profiled
            assert check.severity == (dg.AssetCheckSeverity.WARN if not passed else dg.AssetCheckSeverity.ERROR)


class DiskPeak:
    """The peak bytes of the shards under a folder (whole or partly downloaded), sampled every ~2 ms by a thread."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._done = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            total = 0
            for dirpath, _, names in os.walk(self.folder):
                for name in names:
                    if name.endswith(".parquet") or name.endswith(".incomplete"):
                        try:
                            total += os.stat(os.path.join(dirpath, name)).st_size
                        except OSError:
                            pass  # deleted meanwhile
            self.peak = max(self.peak, total)
            self._done.wait(0.002)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def con_rows(path: str, query: str) -> list:
    with db.reader(path) as con:
        return con.execute(query).fetchall()


def test_token_is_never_logged_or_stored(setup):
    s = setup
    request = {r.partition_key: r for r in tick(s).run_requests}["tiny-a"]
    result = materialize(s, request)
    assert result.success
    instance = s["instance"]
    run = instance.get_run_by_id(result.run_id)
    assert TOKEN not in repr(run.run_config) and TOKEN not in repr(run.tags)
    for record in instance.all_logs(result.run_id):
        assert TOKEN not in repr(record)
    for path in s["tmp"].rglob("*"):
        if path.is_file() and "hf-home" not in path.parts:
            assert TOKEN.encode() not in path.read_bytes(), path
    for resource in s["resources"].values():
        assert TOKEN not in repr(resource)


def test_hub_problems_skip_the_tick_with_a_reason(setup):
    s = setup
    (s["configs"] / "dagster" / "hub_repos.yaml").write_text("repos:\n  - dataset_name: qk-org/missing\n")
    result = tick(s)
    assert result.run_requests == [] and not result.dynamic_partitions_requests
    assert "qk-org/missing" in result.skip_reason.skip_message
    assert "not found" in result.skip_reason.skip_message
