"""The family assets materialised for real (temp instance, real DuckDB files, one per model), their
declarative automation, the sensors that add family partitions (local configs and a Hub repo on the fake
Hub with SmolLM3-style branch names), and the dagster.yaml of `plasticity ui`."""

from __future__ import annotations

import base64
import re
import struct
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets import analysis, catalog, families
from dagster_project.definitions import defs
from dagster_project.partitions import TAG_REVISION
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from cli.ui import DEFAULT_MAX_CONCURRENT_RUNS, dev_instance_yaml, prepare, write_instance_yaml
from plasticity.synthetic import FamilySpec, SyntheticSpec
from warehouse.store import db
from warehouse.store import sandbox
from warehouse.sources.demo_data import write_synthetic_dataset, write_synthetic_family

try:
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client

BASE = SyntheticSpec(model="x", num_layers=2, num_q_heads=2, num_k_heads=1, head_dim=4, num_examples=2, seq_len=64,
                     bucket_size=16, sliding_windows={}, seed=2)
FA = FamilySpec(family="fa", steps=(10, 100), stages=("s1", "s2"), layer_rates=(0.5, -0.5), head_scales=(0.2, 0.4),
                base=BASE)
FB = FamilySpec(family="fb", steps=(7,), stages=None, layer_rates=(0.0, 0.0), head_scales=(0.3, 0.3), base=BASE)
MODEL_ASSETS = [catalog.shard_catalog, catalog.head_samples, analysis.head_analysis]
TRAJECTORY = dg.AssetKey("family_trajectory")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family_dagster")
    configs = tmp / "configs"
    configs.mkdir()
    for fam in (FA, FB):
        for step, folder in write_synthetic_family(tmp / "data", fam, with_truth=False).items():
            stage = f"stage: {fam.stage(step)}\n" if fam.stage(step) else ""
            (configs / f"{fam.model(step)}.yaml").write_text(
                f"model: {fam.model(step)}\ndataset_local_root: {folder}\nfamily: {fam.family}\nstep: {step}\n"
                f"{stage}attention: false\nmax_workers: 1\n")
    plain = write_synthetic_dataset(tmp / "data" / "plain", BASE, with_truth=False)
    (configs / "plain.yaml").write_text(f"model: plain\ndataset_local_root: {plain}\nattention: false\nmax_workers: 1\n")
    resources = {
        "warehouse": WarehouseResource(path=str(tmp / "wh" / "{model}.duckdb"), exports_dir=str(tmp / "results")),
        "hub": HubResource(download_dir=str(tmp / "hub")),
        "datasets": DatasetsResource(configs_dir=str(configs)),
    }
    return {"tmp": tmp, "configs": configs, "resources": resources}


def tick(instance, sensor_name, resources, cursor=None):
    sensor = next(s for s in defs.sensors if s.name == sensor_name)
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
        result = sensor(ctx)
    for request in result.dynamic_partitions_requests or []:  # what the daemon does with them
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def analyse(instance, resources, model):
    result = dg.materialize(MODEL_ASSETS, partition_key=model, instance=instance, resources=resources)
    assert result.success
    return result


def requested(result) -> set[str]:
    return set(result.get_requested_partitions(TRAJECTORY)) if result.get_num_requested(TRAJECTORY) else set()


def test_a_checkpoint_analysis_reports_its_family_and_only_that_family_refreshes(setup):
    resources = setup["resources"]
    with dg.instance_for_test() as instance:
        first = tick(instance, "local_datasets_sensor", {"datasets": resources["datasets"]})
        assert sorted(instance.get_dynamic_partitions("models")) == ["fa-step-10", "fa-step-100", "fb-step-7", "plain"]
        assert sorted(instance.get_dynamic_partitions("families")) == ["fa", "fb"]
        assert [r.partitions_def_name for r in first.dynamic_partitions_requests] == ["models", "families"]
        again = tick(instance, "local_datasets_sensor", {"datasets": resources["datasets"]}, first.cursor)
        assert not again.dynamic_partitions_requests

        tick0 = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert requested(tick0) == set()  # no checkpoint analysed yet
        result = analyse(instance, resources, "fa-step-10")
        reported = [e for e in result.get_asset_materialization_events()
                    if e.asset_key == dg.AssetKey("family_checkpoints")]
        assert len(reported) == 1 and reported[0].partition == "fa"
        meta = reported[0].materialization.metadata
        assert (meta["model"].value, meta["step"].value, meta["stage"].value) == ("fa-step-10", 10, "s1")
        with db.reader(resources["warehouse"].path_for("fa-step-10")) as con:
            assert meta["run_id"].value == con.execute("SELECT run_id FROM runs").fetchone()[0]
        analyse(instance, resources, "plain")  # no family: reports nothing
        tick1 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick0.cursor)
        assert requested(tick1) == {"fa"}
        tick2 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick1.cursor)
        assert requested(tick2) == set()  # requested once, not again
        analyse(instance, resources, "fb-step-7")
        tick3 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick2.cursor)
        assert requested(tick3) == {"fb"}
        # a checkpoint finishing after the request (while the trajectory is drawn) triggers one more refresh
        analyse(instance, resources, "fa-step-100")
        instance.report_runless_asset_event(dg.AssetMaterialization("family_trajectory", partition="fa"))
        instance.report_runless_asset_event(dg.AssetMaterialization("family_trajectory", partition="fb"))
        tick4 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick3.cursor)
        assert requested(tick4) == {"fa"}
        instance.report_runless_asset_event(dg.AssetMaterialization("family_trajectory", partition="fa"))
        tick5 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick4.cursor)
        assert requested(tick5) == set()


@pytest.fixture(scope="module")
def materialized(setup):
    """Every checkpoint analysed, then family_trajectory of fa materialised (with a plot config naming q_R2_pos,
    a figure size and a resolution)."""
    resources = setup["resources"]
    (setup["configs"] / "plots").mkdir(exist_ok=True)
    (setup["configs"] / "plots" / "fa-trajectory.yaml").write_text("metric: q_R2_pos\nstep_axis: log\nfigsize: [4, 3]\ndpi: 50\n")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["fa-step-10", "fa-step-100", "fb-step-7", "plain"])
    instance.add_dynamic_partitions("families", ["fa", "fb"])
    for model in ("fa-step-10", "fa-step-100", "fb-step-7", "plain"):
        analyse(instance, resources, model)
    result = dg.materialize([families.family_checkpoints, families.family_trajectory], partition_key="fa",
                            instance=instance, resources=resources, selection=[TRAJECTORY])
    yield result, instance
    instance.dispose()


def test_family_trajectory_materialization(setup, materialized):
    result, _ = materialized
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == TRAJECTORY]
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (meta["family"], meta["checkpoints"], meta["steps"], meta["warehouse_files"]) == ("fa", 2, [10, 100], 4)
    assert meta["dagster/row_count"] == 4  # 2 checkpoints x 2 layers
    assert set(meta["runs"]) == {"fa-step-10", "fa-step-100"} and meta["lock_waits"] == 0
    for metric in ("ap_overall", "q_R2_pos"):
        png = re.search(r"base64,([A-Za-z0-9+/=]+)\)", meta[f"plot_{metric}"]).group(1)
        assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
        written = Path(meta[f"file_{metric}"]).read_bytes()
        assert written[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", written[16:24]) == (200, 150)  # the config's 4 x 3 inches at 50 dpi
    assert "| layer | 10" in meta["preview"] and "100" in meta["preview"]
    folder = Path(setup["resources"]["warehouse"].exports_dir) / "families" / "fa"
    csv = pd.read_csv(folder / "trajectory-ap_overall.csv")
    with sandbox.sandbox(setup["resources"]["warehouse"].all_paths()) as con:
        want = con.execute("SELECT * FROM family_layer_metric_trajectory WHERE family = 'fa' AND metric = 'ap_overall' "
                           "ORDER BY step, model, layer").df()
    pd.testing.assert_frame_equal(csv, want.astype({"stage": object}), check_dtype=False, rtol=1e-15)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == "checkpoints_succeeded"


def test_the_check_lists_a_checkpoint_whose_latest_run_did_not_succeed(setup, materialized):
    _, instance = materialized
    resources = setup["resources"]
    wh = resources["warehouse"].path_for("fa-step-100")
    with db.writer(wh) as con:
        con.execute("UPDATE runs SET status = 'partial'")
    try:
        result = dg.materialize([families.family_checkpoints, families.family_trajectory], partition_key="fa",
                                instance=instance, resources=resources, selection=[TRAJECTORY])
    finally:
        with db.writer(wh) as con:
            con.execute("UPDATE runs SET status = 'succeeded'")
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["not_succeeded"].value == 1 and "fa-step-100" in check.metadata["rows"].value


# --------------------------------------------------------------------------- Hub branches


HUB_REPO = "qk-org/ckpts"
BRANCHES = ("smollm3-3b-stage1-step-40000-longbench-pro-128k-plus",
            "smollm3-3b-lc-4k-to-32k-step-4000-longbench-pro-128k-plus", "smollm2-135m")


def test_hub_branches_become_checkpoints_of_their_family(tmp_path, monkeypatch):
    attempts = block_non_loopback(monkeypatch)
    dataset = write_synthetic_dataset(tmp_path / "tiny", BASE, with_truth=False)
    for branch in BRANCHES:
        shutil.copytree(dataset, tmp_path / "hub-root" / "qk-org" / "ckpts" / branch,
                        ignore=shutil.ignore_patterns("ground_truth.json"))
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "dagster" / "hub_repos.yaml")
                             .read_text())["repos"][0]["family_pattern"]
    configs = tmp_path / "configs"
    (configs / "dagster").mkdir(parents=True)
    (configs / "dagster" / "hub_repos.yaml").write_text(yaml.safe_dump({"repos": [{
        "dataset_name": HUB_REPO, "overrides": {"attention": False, "max_workers": 1}, "family_pattern": shipped}]}))
    resources = {"warehouse": WarehouseResource(path=str(tmp_path / "wh" / "{model}.duckdb"),
                                                exports_dir=str(tmp_path / "results")),
                 "hub": HubResource(download_dir=str(tmp_path / "snapshots")),
                 "datasets": DatasetsResource(configs_dir=str(configs))}
    with FakeHub(tmp_path / "hub-root") as hub, dg.instance_for_test() as instance:
        configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home")
        result = tick(instance, "hub_branches_sensor", {"hub": resources["hub"], "datasets": resources["datasets"]})
        assert sorted(instance.get_dynamic_partitions("models")) == sorted(BRANCHES)
        assert instance.get_dynamic_partitions("families") == ["smollm3-3b"]
        request = next(r for r in result.run_requests if r.partition_key == BRANCHES[1])
        run = dg.materialize(MODEL_ASSETS, partition_key=BRANCHES[1], instance=instance, resources=resources,
                             tags=request.tags)
        assert run.success
        with db.reader(resources["warehouse"].path_for(BRANCHES[1])) as con:
            assert con.execute("SELECT family, stage, step, revision FROM models").fetchall() == [
                ("smollm3-3b", "lc-4k-to-32k", 4000, request.tags[TAG_REVISION])]
        reported = [e.partition for e in run.get_asset_materialization_events()
                    if e.asset_key == dg.AssetKey("family_checkpoints")]
        assert reported == ["smollm3-3b"]
    assert attempts == []


# --------------------------------------------------------------------------- plasticity ui's dagster.yaml


def test_ui_dagster_yaml_queues_runs_one_per_partition(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    path = write_instance_yaml(home, webserver_only=False, max_concurrent_runs=3)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 3
        assert [dict(x) for x in queue.tag_concurrency_limits] == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    write_instance_yaml(home, webserver_only=False, max_concurrent_runs=5)  # unedited: rewritten
    assert path.read_text() == dev_instance_yaml(5)
    write_instance_yaml(home, webserver_only=False)  # no value given: left as it is
    assert path.read_text() == dev_instance_yaml(5)
    path.write_text(path.read_text() + "# my own note\n")
    with pytest.raises(ValueError, match="was edited"):
        write_instance_yaml(home, webserver_only=False, max_concurrent_runs=2)
    assert path.read_text().endswith("# my own note\n")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert write_instance_yaml(fresh, webserver_only=False).read_text() == dev_instance_yaml(DEFAULT_MAX_CONCURRENT_RUNS)
    old = tmp_path / "old"
    old.mkdir()
    from cli import ui

    (old / "dagster.yaml").write_text(ui._DAGSTER_YAML_DEV_BEFORE)  # what earlier versions wrote
    assert write_instance_yaml(old, webserver_only=False, max_concurrent_runs=4).read_text() == dev_instance_yaml(4)


def test_ui_prepare_registers_families(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("PLASTICITY_WATCH_FILE", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    write_instance_yaml(home, webserver_only=False)
    keys = prepare(home, demo=False, configs_dir=str(setup["configs"]))
    assert sorted(keys) == ["fa-step-10", "fa-step-100", "fb-step-7", "plain"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert sorted(instance.get_dynamic_partitions("families")) == ["fa", "fb"]
