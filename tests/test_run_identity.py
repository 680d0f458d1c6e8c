"""One dataset, one run: the head layout is resolved (config, card or shards) before the run
id, so the same data and settings give the same run id whichever command or asset launches the run,
and wherever the layout came from; the `models` table records what was resolved."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from cli.main import main
from dagster_project.definitions import OWN_ASSETS
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "synthetic-demo"


def fetch(path, query, params=None):
    with db.reader(path) as con:
        return con.execute(query, params or {}).fetchall()


def test_demo_analyze_and_dagster_store_one_run(demo_dataset, tmp_path):
    data = tmp_path / "data"
    root = data / MODEL
    shutil.copytree(demo_dataset, root)
    wh = tmp_path / "warehouse.duckdb"
    same = ["--attention", "false", "--max_workers", "1", "--warehouse", str(wh), "--output_dir", str(tmp_path / "out"),
            "--quiet"]
    assert main(["demo", "--data", str(data), *same]) == 0
    assert main(["analyze", "--config", str(REPO / "configs" / "synthetic-demo.yaml"), "--dataset_local_root", str(root),
                 *same]) == 0
    # the Dagster partition synthetic-demo, from a copy of the same config file
    configs = tmp_path / "configs"
    configs.mkdir()
    text = (REPO / "configs" / "synthetic-demo.yaml").read_text()
    text = text.replace("dataset_local_root: data/demo/synthetic-demo", f"dataset_local_root: {root}")
    assert f"dataset_local_root: {root}" in text
    (configs / "synthetic-demo.yaml").write_text(text + "attention: false\nmax_workers: 1\n")
    resources = {
        "warehouse": WarehouseResource(path=str(wh), exports_dir=str(tmp_path / "results")),
        "hub": HubResource(download_dir=str(tmp_path / "hub")),
        "datasets": DatasetsResource(configs_dir=str(configs)),
    }
    selection = [a for a in OWN_ASSETS if {k.to_user_string() for k in a.keys} & {"shard_catalog", "head_samples",
                                                                                      "head_metrics"}]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        result = dg.materialize(selection, partition_key=MODEL, instance=instance, resources=resources)
    assert result.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization
            for e in result.get_asset_materialization_events()}
    assert mats["head_metrics"].metadata["heads_computed_now"].value == 0  # resumed: nothing recomputed
    runs = fetch(wh, "SELECT run_id, revision, status, n_done FROM runs WHERE model = $m", {"m": MODEL})
    assert len(runs) == 1 and runs[0][2:] == ("succeeded", 16), runs
    assert mats["head_metrics"].metadata["run_id"].value == runs[0][0]
    assert fetch(wh, "SELECT count(*), count(DISTINCT run_id) FROM head_metrics") == [(16, 1)]
    # what the catalog resolved: the config's layout, the card's uniform buckets of 64, dense capture
    assert fetch(wh, "SELECT model, num_layers, num_q_heads, num_k_heads, layout_source, bucket_scheme, bucket_size, "
                     "sampling_strategy, q_capture_probability, k_capture_probability, card_model_name FROM models") == [
        (MODEL, 4, 4, 2, "config", "uniform", 64, "all", 1.0, 1.0, MODEL)]


def without_layout(card: Path) -> None:
    card.write_text("".join(line for line in card.read_text().splitlines(keepends=True)
                            if not line.startswith(("num_layers", "num_q_heads", "num_k_heads"))))


def test_layout_source_does_not_change_the_run(small_copy, tmp_path):
    def run(name, overrides=None):
        cfg = load_config(None, {"warehouse": str(tmp_path / f"{name}.duckdb"), "max_workers": 1, "attention": False,
                                 "model": "m", **(overrides or {})})
        summary = analyze_dataset(cfg, small_copy, progress=False)
        rows = fetch(cfg.warehouse, "SELECT * EXCLUDE (model, run_id) FROM head_metrics ORDER BY ALL")
        source = fetch(cfg.warehouse, "SELECT layout_source, num_layers, num_q_heads, num_k_heads FROM models")
        return summary.run_id, summary.revision, rows, source

    card = run("card")
    config = run("config", {"num_q_heads": 4, "num_k_heads": 2})
    without_layout(small_copy / "README.md")
    shards = run("shards")
    assert [r[3] for r in (card, config, shards)] == [[("card", 2, 4, 2)], [("config", 2, 4, 2)], [("shards", 2, 4, 2)]]
    assert card[:2] == config[:2] == shards[:2]
    assert card[2] == config[2] == shards[2] and len(card[2]) == 8
    # a different layout is a different run
    other = run("other", {"num_q_heads": 4, "num_k_heads": 4})
    assert other[0] != card[0]


def test_models_row_is_replaced_not_duplicated(small_dataset, tmp_path):
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "m", "dataset_name": "org/x"})
    first = analyze_dataset(cfg, small_dataset, progress=False)
    analyze_dataset(cfg, small_dataset, progress=False, resume=False)
    rows = fetch(cfg.warehouse, "SELECT model, dataset_name, revision, layout_source, bucket_scheme, bucket_size FROM models")
    assert rows == [("m", "org/x", first.revision, "card", "uniform", 32)]


def test_new_columns_have_comments(tmp_path):
    import sql

    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)
    with db.writer(wh) as con:
        con.execute(sql.load("comments"))
    rows = fetch(wh, "SELECT table_name, column_name, comment FROM duckdb_columns() "
                     "WHERE table_name IN ('models', 'catalog_problems') OR (table_name, column_name) IN "
                     "(('shards', 'problem'), ('head_samples', 'plan_problem'))")
    assert len(rows) == 20 + 6 + 2 and all(c for *_, c in rows), [r for r in rows if not r[2]]


def test_card_bucket_facts_are_part_of_the_run(small_copy, tmp_path):
    """What the card says about buckets changes which heads pass the checks: a new card is a new run."""
    def run_id(name):
        cfg = load_config(None, {"warehouse": str(tmp_path / f"{name}.duckdb"), "max_workers": 1, "attention": False,
                                 "model": "m", "layers": [0]})
        return analyze_dataset(cfg, small_copy, progress=False)

    first = run_id("a")
    card = small_copy / "README.md"
    card.write_text(card.read_text().replace("bucket_size: 32", "bucket_size: 16"))
    second = run_id("b")
    assert second.revision == first.revision and second.run_id != first.run_id
    assert second.n_errors == 4  # layer 0's query shards now disagree with the card's scheme
