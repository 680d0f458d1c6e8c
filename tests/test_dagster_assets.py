"""The Dagster assets materialised for real (temp instance, real DuckDB file, real Parquet).

One module-scoped materialisation of the whole graph for the demo partition;
the tests compare what it wrote with `warehouse.run.pipeline.analyze_dataset` on
the same data, and read the metadata the UI shows.
"""

from __future__ import annotations

import base64
import csv
import math
import re
from pathlib import Path

import dagster as dg
import pytest

from dagster_project import quality
from dagster_project.definitions import OWN_ASSETS, defs
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from plasticity.synthetic import SyntheticSpec
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset

from test_operational_options import SpawnedWorkers

MODEL = "synthetic-demo"
TINY = SyntheticSpec(model=MODEL, num_layers=2, num_q_heads=2, num_k_heads=1, head_dim=8, num_examples=4,
                     seq_len=128, bucket_size=32, sliding_windows={1: 64}, seed=1)
N_HEADS = TINY.num_layers * TINY.num_q_heads
ATTENTION_TABLES = ("token_attention", "head_attention_summary", "query_scale_sweep")
RESULT_TABLES = ("head_metrics", "head_bucket_plasticity", "head_bucket_summary", "head_component_weights",
                 "head_errors", *ATTENTION_TABLES)
EXPECTED_ASSETS = {
    "shard_catalog", "bucket_statistics", "head_samples", "head_metrics", "head_bucket_plasticity",
    "head_bucket_summary", "head_component_weights", "head_errors", "csv_exports", "plasticity_curves_plot", "bucket_heatmap_plot",
    "component_weights_plot", "model_comparison_plot", *ATTENTION_TABLES,
}
EXPECTED_CHECKS = {
    ("shard_catalog", "shard_schema_valid"), ("shard_catalog", "shard_widths_consistent"),
    ("head_samples", "every_query_head_has_key_head"), ("head_samples", "query_key_widths_match"),
    ("head_metrics", "ap_overall_in_unit_interval"), ("head_metrics", "no_duplicate_rows_head_metrics"),
    ("head_bucket_plasticity", "plasticity_in_unit_interval"),
    ("head_bucket_plasticity", "no_duplicate_rows_head_bucket_plasticity"),
    ("head_bucket_summary", "no_duplicate_rows_head_bucket_summary"),
    ("head_component_weights", "weights_sum_to_one"),
    ("head_component_weights", "no_duplicate_rows_head_component_weights"),
    ("head_errors", "no_duplicate_rows_head_errors"),
    *((t, f"no_duplicate_rows_{t}") for t in ATTENTION_TABLES),
}


def write_config(configs: Path, model: str, root: Path, **extra) -> Path:
    configs.mkdir(parents=True, exist_ok=True)
    lines = [f"model: {model}", f"dataset_local_root: {root}", "attention: false", "max_workers: 1"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = configs / f"{model}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def resources_for(tmp: Path, configs: Path) -> dict:
    return {
        "warehouse": WarehouseResource(path=str(tmp / "warehouse.duckdb"), exports_dir=str(tmp / "results")),
        "hub": HubResource(download_dir=str(tmp / "hub")),
        "datasets": DatasetsResource(configs_dir=str(configs)),
    }


def fetch(path, query, params=None):
    with db.reader(path) as con:
        return con.execute(query, params or {}).fetchall()


def canon(rows):
    """Rows with NaN made comparable (NaN != NaN)."""
    return [tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagster_assets")
    root = write_synthetic_dataset(tmp / "data" / MODEL, TINY, with_truth=False)
    configs = tmp / "configs"
    write_config(configs, MODEL, root)
    resources = resources_for(tmp, configs)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    result = dg.materialize(OWN_ASSETS, partition_key=MODEL, instance=instance, resources=resources)
    yield {"tmp": tmp, "root": root, "configs": configs, "resources": resources, "instance": instance,
           "result": result, "warehouse": str(tmp / "warehouse.duckdb")}
    instance.dispose()


def materializations(result) -> dict[str, dg.AssetMaterialization]:
    return {e.materialization.asset_key.to_user_string(): e.materialization
            for e in result.get_asset_materialization_events()}


def test_definitions_list_the_whole_flow():
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys
    checks = {(k.asset_key.to_user_string(), k.name) for k in repo.asset_graph.asset_check_keys}
    assert EXPECTED_CHECKS <= checks
    job = defs.resolve_job_def("analyze_model_job")
    assert job.partitions_def.name == "models"
    assert EXPECTED_ASSETS <= {k.to_user_string() for k in job.asset_layer.asset_graph.get_all_asset_keys()}
    assert {s.name for s in defs.sensors} == {"hub_branches_sensor", "local_datasets_sensor",
                                              "family_trajectory_automation"}
    assert [s.cron_schedule for s in defs.schedules] == ["0 4 * * 1"]
    # the per-head parallelism lives inside head_analysis; the run executes in one process
    assert job.executor_def.name == "in_process"


def test_materialization_succeeds_with_every_check_passing(run):
    result = run["result"]
    assert result.success
    assert set(materializations(result)) == EXPECTED_ASSETS
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == EXPECTED_CHECKS
    assert all(evaluations.values()), evaluations
    parts = {e.partition for e in result.get_asset_materialization_events()}
    assert parts == {MODEL, None}  # None: the unpartitioned cross-model comparison


def test_warehouse_rows_equal_analyze_dataset(run, tmp_path):
    cfg = load_config(run["configs"] / f"{MODEL}.yaml", {"warehouse": str(tmp_path / "ref.duckdb")})
    ref = analyze_dataset(cfg, run["root"], model=MODEL, progress=False)
    got_runs = fetch(run["warehouse"], "SELECT run_id, revision, status, n_heads, n_done FROM runs WHERE model = $m",
                     {"m": MODEL})
    assert got_runs == [(ref.run_id, ref.revision, "succeeded", N_HEADS, N_HEADS)]
    for table in RESULT_TABLES:
        q = f"SELECT * EXCLUDE (model, run_id{', recorded_at' if table == 'head_errors' else ''}) FROM {table} " \
            "WHERE model = $m AND run_id = $r ORDER BY ALL"
        got = canon(fetch(run["warehouse"], q, {"m": MODEL, "r": ref.run_id}))
        want = canon(fetch(cfg.warehouse, q, {"m": MODEL, "r": ref.run_id}))
        assert got == want, table
        if table not in ("head_errors", *ATTENTION_TABLES):
            assert len(got) > 0
    assert fetch(run["warehouse"], "SELECT count(*) FROM head_metrics")[0][0] == N_HEADS


def test_row_counts_previews_and_plots_in_metadata(run):
    mats = materializations(run["result"])
    wh = run["warehouse"]
    run_id = fetch(wh, "SELECT run_id FROM runs WHERE model = $m", {"m": MODEL})[0][0]
    counts = {
        "shard_catalog": fetch(wh, "SELECT count(*) FROM shards WHERE model = $m", {"m": MODEL})[0][0],
        "bucket_statistics": fetch(wh, "SELECT count(*) FROM shard_buckets WHERE model = $m", {"m": MODEL})[0][0],
        "head_samples": N_HEADS,
        **{t: fetch(wh, f"SELECT count(*) FROM {t} WHERE model = $m AND run_id = $r", {"m": MODEL, "r": run_id})[0][0]
           for t in RESULT_TABLES},
    }
    assert counts["shard_catalog"] == TINY.num_layers * (TINY.num_q_heads + TINY.num_k_heads)
    for key, n in counts.items():
        assert mats[key].metadata["dagster/row_count"].value == n, key
    for key, mat in mats.items():
        assert "dagster/row_count" in mat.metadata, key
        if key not in ("head_errors", *ATTENTION_TABLES):  # empty here: no errors, attention off
            preview = mat.metadata["preview"].value
            assert preview.startswith("| ") and "\n| ---" in preview, key
    assert mats["head_metrics"].metadata["run_id"].value == run_id
    # plots: the PNG is embedded in markdown and written to disk
    for key in ("plasticity_curves_plot", "bucket_heatmap_plot", "component_weights_plot", "model_comparison_plot"):
        md = mats[key].metadata["plot"].value
        m = re.fullmatch(r"!\[\w+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
        assert m, key
        png = base64.b64decode(m.group(1))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        path = Path(mats[key].metadata["file"].value)
        assert path.read_bytes() == png
    # the curves preview is the mean AP_j per query bucket, as the bucket_plasticity view computes it
    n_qb = fetch(wh, "SELECT count(DISTINCT q_bucket) FROM head_bucket_plasticity WHERE model = $m", {"m": MODEL})[0][0]
    assert mats["plasticity_curves_plot"].metadata["dagster/row_count"].value == counts["head_bucket_plasticity"]
    assert mats["plasticity_curves_plot"].metadata["preview"].value.count("\n") == n_qb + 1
    # the plots draw the stored AP intervals (tests/test_plot_intervals.py checks what is drawn)
    n_heads = fetch(wh, "SELECT count(*) FROM head_metrics WHERE model = $m", {"m": MODEL})[0][0]
    mode = "heads" if n_heads <= 12 else "mean"
    assert mats["plasticity_curves_plot"].metadata["intervals"].value == mode
    assert mats["model_comparison_plot"].metadata["intervals"].value == mode
    # the demo dataset card's bucket size (32) sets the plot's bucket positions
    assert "| 1 | 32 |" in mats["plasticity_curves_plot"].metadata["preview"].value


def test_head_samples_pair_query_and_key_heads(run):
    rows = fetch(run["warehouse"],
                 "SELECT layer, q_head, k_head, q_rows, q_sample_rows, k_sample_rows, k_path IS NOT NULL, q_dim, k_dim "
                 "FROM head_samples WHERE model = $m ORDER BY layer, q_head", {"m": MODEL})
    n_rows = TINY.num_examples * TINY.seq_len
    assert rows == [(layer, q, q // TINY.group, n_rows, n_rows, n_rows, True, TINY.head_dim, TINY.head_dim)
                    for layer in range(TINY.num_layers) for q in range(TINY.num_q_heads)]


def test_csv_exports_have_spec_columns(run):
    mat = materializations(run["result"])["csv_exports"]
    folder = Path(mat.metadata["folder"].value)
    with open(folder / "head_metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_HEADS == mat.metadata["rows_head_metrics"].value
    assert list(rows[0])[:3] == ["layer", "q_head", "k_head"] and list(rows[0])[-1] == "ap_ci_calibrated"
    with open(folder / "head_bucket_plasticity.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["layer", "q_head", "k_head", "q_bucket", "k_bucket", "plasticity", "n_pairs"]


def test_rematerializing_replaces_rows_and_fresh_recomputes(run):
    before = {t: fetch(run["warehouse"], f"SELECT count(*) FROM {t}")[0][0] for t in RESULT_TABLES}
    selection = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & {"shard_catalog", "head_samples",
                                                                                      "head_metrics"}]
    with SpawnedWorkers() as workers:  # the dataset's config says max_workers: 1
        result = dg.materialize(
            selection, partition_key=MODEL, instance=run["instance"], resources=run["resources"],
            run_config={"ops": {"head_analysis": {"config": {"fresh": True, "max_workers": 2}}}},
        )
    assert result.success
    mat = materializations(result)["head_metrics"]
    assert mat.metadata["heads_computed_now"].value == N_HEADS  # fresh: every head again ...
    assert len(workers.pids) == 2  # ... in 2 worker processes (two GQA groups)
    after = {t: fetch(run["warehouse"], f"SELECT count(*) FROM {t}")[0][0] for t in RESULT_TABLES}
    assert after == before
    with db.reader(run["warehouse"]) as con:
        run_id = con.execute("SELECT run_id FROM runs WHERE model = $m", {"m": MODEL}).fetchone()[0]
        for name in quality.CHECKS:
            if quality.CHECKS[name].scoped_by_run:
                assert quality.evaluate(con, name, MODEL, run_id).passed, name


def test_one_warehouse_file_per_model_and_a_comparison_over_all(run, tmp_path):
    """path with {model}: every model writes its own file (one writer each); the comparison reads them all."""
    configs = tmp_path / "configs"
    for model in ("m-a", "m-b"):
        write_config(configs, model, run["root"])
    resources = resources_for(tmp_path, configs)
    resources["warehouse"] = WarehouseResource(path=str(tmp_path / "wh" / "{model}.duckdb"),
                                               exports_dir=str(tmp_path / "results"))
    wanted = {"shard_catalog", "head_samples", "head_metrics", "model_comparison_plot"}
    selection = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & wanted]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", ["m-a", "m-b"])
        for model in ("m-a", "m-b"):
            result = dg.materialize(selection, partition_key=model, instance=instance, resources=resources)
            assert result.success
    assert sorted(p.name for p in (tmp_path / "wh").glob("*.duckdb")) == ["m-a.duckdb", "m-b.duckdb"]
    for model in ("m-a", "m-b"):
        assert fetch(str(tmp_path / "wh" / f"{model}.duckdb"), "SELECT DISTINCT model FROM head_metrics") == [(model,)]
    comparison = materializations(result)["model_comparison_plot"]
    assert comparison.metadata["models"].value == 2
    assert comparison.metadata["dagster/row_count"].value == 2 * N_HEADS
    assert set(comparison.metadata["runs"].value) == {"m-a", "m-b"}


def test_a_plot_config_sets_the_plot_assets_figure_size_and_resolution(run):
    """configs/plots/<model>-heatmap.yaml's figsize and dpi reach the PNG the asset writes (as they reach
    `plasticity plot --config`): 4 x 3 inches at 50 dpi is 200 x 150 pixels."""
    import struct

    plots_dir = run["configs"] / "plots"
    plots_dir.mkdir(exist_ok=True)
    (plots_dir / f"{MODEL}-heatmap.yaml").write_text("figsize: [4, 3]\ndpi: 50\ncmap: magma\n")
    try:
        heatmap = [a for a in OWN_ASSETS if "bucket_heatmap_plot" in {k.to_user_string() for k in a.keys}]
        result = dg.materialize(heatmap, partition_key=MODEL, instance=run["instance"], resources=run["resources"])
    finally:
        (plots_dir / f"{MODEL}-heatmap.yaml").unlink()
    assert result.success
    mat = materializations(result)["bucket_heatmap_plot"]
    assert mat.metadata["plot_config"].value.endswith(f"{MODEL}-heatmap.yaml")
    png = Path(mat.metadata["file"].value).read_bytes()
    assert struct.unpack(">II", png[16:24]) == (200, 150)  # the PNG header's width and height
