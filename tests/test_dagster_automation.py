"""The local-dataset sensor, the weekly schedule and the comparison's automation condition."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone

import dagster as dg
import pytest

from dagster_project.definitions import OWN_ASSETS, defs
from dagster_project.partitions import TAG_REVISION
from dagster_project.resources import DatasetsResource
from warehouse.sources.demo_data import write_synthetic_dataset

try:
    from tests.test_dagster_assets import MODEL, TINY, write_config
except ImportError:  # pragma: no cover
    from test_dagster_assets import MODEL, TINY, write_config


def by_name(items, name):
    return next(x for x in items if getattr(x, "name", None) == name
                or (isinstance(x, dg.AssetsDefinition) and x.node_def.name == name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("auto") / MODEL, TINY, with_truth=False)


def local_tick(instance, configs, cursor=None):
    sensor = by_name(defs.sensors, "local_datasets_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"datasets": DatasetsResource(configs_dir=str(configs))}) as ctx:
        result = sensor(ctx)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_local_sensor_registers_datasets_and_reruns_on_change(dataset, tmp_path):
    root = tmp_path / MODEL
    shutil.copytree(dataset, root)
    configs = tmp_path / "configs"
    write_config(configs, MODEL, root)
    write_config(configs, "not-there", tmp_path / "missing")  # a config whose folder does not exist
    with dg.DagsterInstance.ephemeral() as instance:
        first = local_tick(instance, configs)
        assert [r.partition_keys for r in first.dynamic_partitions_requests] == [[MODEL]]
        (request,) = first.run_requests
        assert request.partition_key == MODEL and request.tags[TAG_REVISION].startswith("stat-")
        assert instance.get_dynamic_partitions("models") == [MODEL]
        second = local_tick(instance, configs, first.cursor)
        assert second.run_requests == [] and "1 seen" in second.skip_reason.skip_message
        shutil.copy(dataset / "l00h00q" / "data.parquet", root / "l01h01q" / "data.parquet")  # shards change
        third = local_tick(instance, configs, second.cursor)
        assert [r.partition_key for r in third.run_requests] == [MODEL]
        assert third.run_requests[0].tags[TAG_REVISION] != request.tags[TAG_REVISION]
        # an in-place edit that keeps the size and the file's mtime still moves the fingerprint (ctime)
        path = root / "l01h00q" / "data.parquet"
        st = os.stat(path)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        fourth = local_tick(instance, configs, third.cursor)
        assert [r.partition_key for r in fourth.run_requests] == [MODEL]


def test_schedule_requests_every_registered_model():
    schedule = by_name(defs.schedules, "weekly_reanalysis_schedule")
    when = datetime(2026, 1, 5, 4, 0, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when) as ctx:
            assert isinstance(schedule(ctx), dg.SkipReason)
        instance.add_dynamic_partitions("models", ["b-model", "a-model"])
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when) as ctx:
            requests = schedule(ctx)
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("a-model", "a-model@20260105T0400"), ("b-model", "b-model@20260105T0400")]
    assert schedule.job_name == "analyze_model_job"


def test_comparison_redraws_when_any_model_updates_even_if_others_never_ran():
    comparison = by_name(OWN_ASSETS, "model_comparison_plot")
    analysis = by_name(OWN_ASSETS, "head_analysis")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", [MODEL, "never-analysed"])
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0
        instance.report_runless_asset_event(dg.AssetMaterialization("head_metrics", partition=MODEL))
        second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert second.get_num_requested(comparison.key) == 1
        assert second.total_requested == 1
    assert analysis.partitions_def.name == "models"
