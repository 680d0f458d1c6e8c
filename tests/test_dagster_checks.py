"""Asset checks fail on tables and shards we corrupt on purpose, and pass on clean ones."""

from __future__ import annotations

import shutil
from dataclasses import replace

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from dagster_project import quality, steps
from dagster_project.definitions import OWN_ASSETS
from dagster_project.registry import DatasetEntry
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import shard_table, write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset

try:
    from tests.test_dagster_assets import MODEL, TINY, resources_for, write_config
except ImportError:  # pragma: no cover
    from test_dagster_assets import MODEL, TINY, resources_for, write_config


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A warehouse with one analysed model, its shard catalog and its head_samples rows."""
    tmp = tmp_path_factory.mktemp("checks")
    root = write_synthetic_dataset(tmp / MODEL, TINY, with_truth=False)
    wh = str(tmp / "clean.duckdb")
    cfg = load_config(None, {"warehouse": wh, "max_workers": 1, "attention": False})
    summary = analyze_dataset(cfg, root, model=MODEL, progress=False)
    steps.refresh_head_samples(MODEL, cfg, wh)
    return wh, summary.run_id


def corrupted(clean, tmp_path, statement: str) -> str:
    wh, _ = clean
    copy = str(tmp_path / "corrupt.duckdb")
    shutil.copy(wh, copy)
    with db.writer(copy) as con:
        con.execute(statement)
    return copy


def evaluate(path, name, run_id):
    with db.reader(path) as con:
        return quality.evaluate(con, name, MODEL, run_id)


def test_every_check_passes_on_the_clean_warehouse(clean):
    wh, run_id = clean
    for name in quality.CHECKS:
        outcome = evaluate(wh, name, run_id)
        assert outcome.passed and outcome.n_violations == 0, outcome.message
        # head_errors and the attention tables are empty in this run (no errors, attention off)
        empty = ("head_errors", "token_attention", "head_attention_summary", "query_scale_sweep")
        assert outcome.n_checked > 0 or name in {f"no_duplicate_rows_{t}" for t in empty}, name


CORRUPTIONS = [
    # (check, statement, columns identifying the offending row, expected values)
    ("ap_overall_in_unit_interval",
     "UPDATE head_metrics SET ap_overall = CASE WHEN layer = 1 AND q_head = 0 THEN 1.25 "
     "WHEN layer = 0 AND q_head = 0 THEN 'NaN'::DOUBLE ELSE ap_overall END",
     ("layer", "q_head"), [(1, 0)]),
    ("plasticity_in_unit_interval",
     "UPDATE head_bucket_plasticity SET plasticity = -0.01 WHERE layer = 0 AND q_head = 1 AND q_bucket = 2 "
     "AND k_bucket = 1",
     ("layer", "q_head", "q_bucket", "k_bucket"), [(0, 1, 2, 1)]),
    ("weights_sum_to_one",
     "UPDATE head_component_weights SET weight = weight * 1.01 WHERE layer = 0 AND q_head = 1",
     ("layer", "q_head"), [(0, 1)]),
    ("no_duplicate_rows_head_metrics",
     "INSERT INTO head_metrics SELECT * FROM head_metrics WHERE layer = 1 AND q_head = 1",
     ("layer", "q_head", "n_copies"), [(1, 1, 2)]),
    ("no_duplicate_rows_head_bucket_plasticity",
     "INSERT INTO head_bucket_plasticity SELECT * FROM head_bucket_plasticity WHERE layer = 0 AND q_head = 0 "
     "AND q_bucket = 3 AND k_bucket = 0",
     ("layer", "q_head", "q_bucket", "k_bucket", "n_copies"), [(0, 0, 3, 0, 2)]),
    ("no_duplicate_rows_head_component_weights",
     "INSERT INTO head_component_weights SELECT * FROM head_component_weights WHERE layer = 1 AND q_head = 0 "
     "AND component = 5",
     ("layer", "q_head", "component", "n_copies"), [(1, 0, 5, 2)]),
    ("shard_schema_valid",
     "UPDATE shards SET error = 'x: ragged vectors' WHERE layer = 1 AND kind = 'k'",
     ("layer", "head", "kind"), [(1, 0, "k")]),
    ("shard_widths_consistent",
     "UPDATE shards SET dim = 4 WHERE layer = 1 AND kind = 'q' AND head = 1",
     ("dim", "n_shards"), [(8, 5), (4, 1)]),
    ("every_query_head_has_key_head",
     "UPDATE head_samples SET k_path = NULL WHERE layer = 1",
     ("layer", "q_head", "k_head"), [(1, 0, 0), (1, 1, 0)]),
    ("query_key_widths_match",
     "UPDATE head_samples SET q_dim = 16 WHERE layer = 0 AND q_head = 1",
     ("layer", "q_head", "q_dim", "k_dim"), [(0, 1, 16, 8)]),
]


@pytest.mark.parametrize("name,statement,columns,expected", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_check_fails_on_a_corrupted_table(clean, tmp_path, name, statement, columns, expected):
    _, run_id = clean
    path = corrupted(clean, tmp_path, statement)
    outcome = evaluate(path, name, run_id)
    assert not outcome.passed
    assert outcome.n_violations == len(expected)
    got = [tuple(v.item() if hasattr(v, "item") else v for v in row)
           for row in outcome.violations[list(columns)].itertuples(index=False)]
    assert got == expected
    # the other checks of the same table are unaffected (a duplicated weight row also breaks its head's sum)
    also_fails = {"weights_sum_to_one"} if name == "no_duplicate_rows_head_component_weights" else set()
    for other in quality.checks_for(quality.CHECKS[name].table):
        if other != name:
            assert evaluate(path, other, run_id).passed == (other not in also_fails), other


def test_checks_are_scoped_to_the_model_and_run(clean, tmp_path):
    _, run_id = clean
    path = corrupted(clean, tmp_path, "UPDATE head_metrics SET ap_overall = 7, run_id = 'older-run' "
                                      "WHERE layer = 0 AND q_head = 0")
    assert evaluate(path, "ap_overall_in_unit_interval", run_id).passed
    assert not evaluate(path, "ap_overall_in_unit_interval", "older-run").passed


def write_narrow_shard(path, width: int) -> None:
    """Rewrite a shard with vectors cut to `width` columns (valid Parquet, wrong width)."""
    t = pq.read_table(path)
    vec = np.asarray(t.column("vector").combine_chunks().flatten()).reshape(len(t), -1)[:, :width]
    from plasticity.types import TokenArrays

    rows = TokenArrays(bucket=t.column("bucket").to_numpy(), example_id=t.column("example_id").to_numpy(),
                       position=t.column("position").to_numpy().astype(float), vectors=vec,
                       sliding_window=t.column("sliding_window")[0].as_py())
    pq.write_table(shard_table(rows), path)


def test_dagster_run_on_bad_shards_fails_its_checks_but_keeps_good_heads(tmp_path):
    spec = replace(TINY, num_layers=3, sliding_windows={})
    root = write_synthetic_dataset(tmp_path / "data" / MODEL, spec, with_truth=False)
    shutil.rmtree(root / "l00h00k")  # layer 0 loses its key head
    write_narrow_shard(root / "l01h01q" / "data.parquet", 4)  # width 4 vs the key's 8
    (root / "l02h00k" / "data.parquet").write_bytes(b"PAR1 truncated")  # unreadable key shard
    configs = tmp_path / "configs"
    write_config(configs, MODEL, root, num_layers=3, num_q_heads=2, num_k_heads=1)
    resources = resources_for(tmp_path, configs)
    selection = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & {"shard_catalog", "head_samples",
                                                                                      "head_metrics"}]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        result = dg.materialize(selection, partition_key=MODEL, instance=instance, resources=resources)
    assert result.success  # bad input fails heads and checks, never the run
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    failed = {name for name, e in checks.items() if not e.passed}
    assert failed == {"shard_schema_valid", "shard_widths_consistent", "every_query_head_has_key_head",
                      "query_key_widths_match"}
    md = checks["every_query_head_has_key_head"].metadata["offending_rows"].value
    assert "| 0 | 0 | 0 |" in md and "| 0 | 1 | 0 |" in md
    assert checks["shard_schema_valid"].metadata["violations"].value == 1
    assert "l02h00k" in checks["shard_schema_valid"].metadata["offending_rows"].value
    assert checks["query_key_widths_match"].metadata["violations"].value == 1
    mats = {e.materialization.asset_key.to_user_string(): e.materialization
            for e in result.get_asset_materialization_events()}
    # (0,0), (0,1): no key shard; (1,1): width mismatch; (2,0), (2,1): unreadable key shard
    assert mats["head_errors"].metadata["dagster/row_count"].value == 5
    assert mats["head_metrics"].metadata["dagster/row_count"].value == 1
    assert mats["head_metrics"].metadata["status"].value == "partial"
    # results of the good head pass their checks
    assert checks["ap_overall_in_unit_interval"].passed and checks["weights_sum_to_one"].passed


def test_entry_run_config_points_at_the_dataset(tmp_path):
    entry = DatasetEntry("m", "local", local_root=tmp_path / "ds")
    cfg = entry.run_config(max_workers=3)
    assert cfg.model == "m" and cfg.dataset_local_root == str(tmp_path / "ds") and cfg.max_workers == 3


def test_dagster_catalog_stops_when_the_layout_cannot_be_known(tmp_path):
    """No head counts in the config or the card, and a sparse shard set: the catalog step fails with a
    message asking for them, and nothing is written."""
    spec = replace(TINY, num_layers=2, num_q_heads=4, num_k_heads=2)
    root = write_synthetic_dataset(tmp_path / "data" / MODEL, spec, with_truth=False)
    (root / "README.md").unlink()
    shutil.rmtree(root / "l01h02q")
    configs = tmp_path / "configs"
    write_config(configs, MODEL, root)
    resources = resources_for(tmp_path, configs)
    selection = [a for a in OWN_ASSETS if "shard_catalog" in {k.to_user_string() for k in a.keys}]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        result = dg.materialize(selection, partition_key=MODEL, instance=instance, resources=resources,
                                raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "l01h02q" in message and "num_q_heads" in message
    assert not (tmp_path / "warehouse.duckdb").exists()
