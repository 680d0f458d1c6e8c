"""The Dagster run config of the assets (`assets.analysis.AnalysisConfig`: fresh, max_workers,
attention; `assets.catalog.CatalogConfig`: revision), each given a non-default value in a real
materialisation on a temporary instance: what it changes (heads recomputed, worker processes,
attention rows, the commit downloaded) and that the stored numbers stay those of the default run."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from dagster_project.definitions import OWN_ASSETS
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from test_dagster_assets import MODEL, N_HEADS, TINY, canon, fetch, materializations, resources_for, write_config
from warehouse.sources.demo_data import write_synthetic_dataset

try:  # works whether or not tests/ is a package
    from tests.fake_hub import FakeHub, block_non_loopback, configure_hf_client
except ImportError:  # pragma: no cover
    from fake_hub import FakeHub, block_non_loopback, configure_hf_client

ANALYSIS = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & {"shard_catalog", "head_samples",
                                                                                 "head_metrics"}]


def analysis_config(**config) -> dict:
    return {"ops": {"head_analysis": {"config": config}}} if config else {}


def test_analysis_run_config_attention_overrides_the_dataset_config(tmp_path):
    """The dataset's config says no attention; `attention: "true"` in the run config computes it (a new
    run: attention is part of a run's identity) and leaves every head_metrics value as it was. `fresh`
    and `max_workers` are checked in test_dagster_assets.py (every head recomputed in two worker
    processes), resuming without `fresh` in test_run_identity.py."""
    root = write_synthetic_dataset(tmp_path / "data" / MODEL, TINY, with_truth=False)
    configs = tmp_path / "configs"
    write_config(configs, MODEL, root)  # attention: false, max_workers: 1
    resources = resources_for(tmp_path, configs)
    wh = str(tmp_path / "warehouse.duckdb")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", [MODEL])

        def run(**config) -> str:
            result = dg.materialize(ANALYSIS, partition_key=MODEL, instance=instance, resources=resources,
                                    run_config=analysis_config(**config))
            assert result.success
            return materializations(result)["head_metrics"].metadata["run_id"].value

        first = run()
        assert fetch(wh, "SELECT count(*) FROM head_attention_summary") == [(0,)]
        second = run(attention="true")
        assert second != first
        statuses = fetch(wh, "SELECT status, count(*) FROM head_attention_summary WHERE run_id = $r GROUP BY ALL",
                         {"r": second})
        assert statuses == [("exact", N_HEADS)]  # a dense capture: every head's attention from exact rows
        metrics = "SELECT * EXCLUDE (model, run_id) FROM head_metrics WHERE run_id = $r ORDER BY ALL"
        assert canon(fetch(wh, metrics, {"r": second})) == canon(fetch(wh, metrics, {"r": first}))


REPO = "qk-org/sniffed"
BRANCH = "tiny"


def test_catalog_revision_pins_the_commit_downloaded(tmp_path, monkeypatch):
    """`revision` in the catalog's run config: that commit's shards, not the branch head's."""
    attempts = block_non_loopback(monkeypatch)
    dataset = write_synthetic_dataset(tmp_path / "data", TINY, with_truth=False)
    branch = tmp_path / "hub-root" / "qk-org" / "sniffed" / BRANCH
    shutil.copytree(dataset, branch, ignore=shutil.ignore_patterns("ground_truth.json"))
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{BRANCH}.yaml").write_text(f"model: {BRANCH}\ndataset_name: {REPO}\nrevision: {BRANCH}\n"
                                            "attention: false\nmax_workers: 1\nhub_download: snapshot\n")
    resources = {
        "warehouse": WarehouseResource(path=str(tmp_path / "wh.duckdb"), exports_dir=str(tmp_path / "results")),
        "hub": HubResource(download_dir=str(tmp_path / "snapshots")),
        "datasets": DatasetsResource(configs_dir=str(configs)),
    }
    catalog = [a for a in OWN_ASSETS if "shard_catalog" in {k.to_user_string() for k in a.keys}]
    with FakeHub(tmp_path / "hub-root") as hub, dg.DagsterInstance.ephemeral() as instance:
        configure_hf_client(monkeypatch, hub, hf_home=tmp_path / "hf-home")
        instance.add_dynamic_partitions("models", [BRANCH])
        old = hub.branch_sha(REPO, BRANCH)
        other = write_synthetic_dataset(tmp_path / "other", TINY.__class__(**{**TINY.__dict__, "seed": 2}),
                                        with_truth=False)
        shutil.copy(other / "l01h01q" / "data.parquet", branch / "l01h01q" / "data.parquet")  # the branch moves on
        head = hub.branch_sha(REPO, BRANCH)
        assert head != old

        def shard_revisions(**config) -> set:
            result = dg.materialize(catalog, partition_key=BRANCH, instance=instance, resources=resources,
                                    run_config={"ops": {"shard_catalog": {"config": config}}} if config else {})
            assert result.success
            return {r for (r,) in fetch(str(tmp_path / "wh.duckdb"), "SELECT DISTINCT revision FROM shards")}

        assert shard_revisions(revision=old) == {old}
        assert (tmp_path / "snapshots" / "qk-org" / "sniffed" / old).is_dir()
        assert not (tmp_path / "snapshots" / "qk-org" / "sniffed" / head).exists()
        assert head in shard_revisions()  # without it: the branch head at run time
        assert hub.unhandled == [] and hub.errors == []
    assert attempts == []
