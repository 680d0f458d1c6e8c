"""The default path: every entry point with the shipped settings, on three kinds of data.

Data: (a) the demo (`plasticity demo`'s synthetic dataset), (b) the tiny-llama dense capture (a
trained model, every position), (c) a sparse capture made from (b) by `write_sparse_capture`
(independent query and key position masks per example, layer and kind). Settings: none changed.
The only options given are locations (dataset folder, warehouse file, output folders), because
the tests write only under tmp_path; the model name is given where the folder name would differ
between runs of one dataset.

Entry points: the CLI commands (`demo`, `analyze`, `export`, `sql`, `plot` kinds,
`attention-plot` kinds, `validate`) run in this process on (a), (b), (c); the whole Dagster job
with the shipped `configs/*.yaml` copied unmodified: launched through the webserver's GraphQL
as the UI's "Materialize all" launches it on (a) (tests/test_dagster_webserver.py, one webserver
start for the suite), and one run requested by the local-datasets sensor (b) and one by the
weekly schedule (c), executed with the request's partition and tags.
Every run must succeed and its stored rows must satisfy their definitions (`check_stored_rows`).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_SPEC, TINY_LLAMA
from cli.main import main as cli_main
from dagster_project.definitions import defs
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from plasticity.attention.visibility import count_exact_rows
from warehouse.store import db
from warehouse.run.attention_plan import read_positions
from warehouse.sources.demo_data import write_sparse_capture

try:
    from tests.test_dagster_assets import EXPECTED_ASSETS
except ImportError:  # pragma: no cover
    from test_dagster_assets import EXPECTED_ASSETS

REPO_ROOT = Path(__file__).resolve().parents[1]
DENSE = TINY_LLAMA / "dense" / "tinyllama"
SPARSE_KEEP, SPARSE_SEED = 0.25, 1  # a layer keeps a few exact rows (asserted below), far under 100
DEMO = DEMO_SPEC.model
DENSE_MODEL, SPARSE_MODEL = "tinyllama", "tinyllama-sparse"
N_HEADS = {DEMO: DEMO_SPEC.num_layers * DEMO_SPEC.num_q_heads, DENSE_MODEL: 18, SPARSE_MODEL: 18}


def run_cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


def fetch(warehouse, query: str, **params) -> pd.DataFrame:
    with db.reader(str(warehouse)) as con:
        cur = con.execute(query, params)
        return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])


# --------------------------------------------------------------------------- the stored rows, by definition


def check_stored_rows(warehouse, model: str, shards: Path) -> dict:
    """Assert the latest run of `model` against the definitions of its rows; returns counts."""
    (run_id,) = fetch(warehouse, "SELECT run_id FROM runs WHERE model = $m ORDER BY started_at DESC LIMIT 1",
                      m=model)["run_id"]
    q = dict(m=model, r=run_id)
    run = fetch(warehouse, "SELECT * FROM runs WHERE model = $m AND run_id = $r", **q).iloc[0]
    assert run["status"] == "succeeded" and run["n_errors"] == 0, dict(run)
    assert fetch(warehouse, "SELECT count(*) AS n FROM head_errors WHERE model = $m AND run_id = $r", **q)["n"][0] == 0
    heads = fetch(warehouse, "SELECT * FROM head_metrics WHERE model = $m AND run_id = $r ORDER BY layer, q_head", **q)
    assert len(heads) == N_HEADS[model]
    group = heads["q_head"].max() // (heads["k_head"].max() + 1) + 1  # q heads per key head
    assert (heads["k_head"] == heads["q_head"] // group).all()
    for h in heads.itertuples():  # rows analysed: every row of the shard, up to the default cap of 50000
        n_rows = pq.ParquetFile(shards / f"l{h.layer:02d}h{h.q_head:02d}q" / "data.parquet").metadata.num_rows
        assert h.n_q_tokens == min(n_rows, 50000)
    assert ((heads["ap_overall"] >= 0) & (heads["ap_overall"] <= 1)).all()
    weights = fetch(warehouse, "SELECT layer, q_head, sum(weight) AS total FROM head_component_weights "
                               "WHERE model = $m AND run_id = $r GROUP BY ALL", **q)
    assert len(weights) == len(heads) and np.allclose(weights["total"], 1.0, rtol=0, atol=1e-9)

    summary = fetch(warehouse, "SELECT * FROM head_attention_summary WHERE model = $m AND run_id = $r "
                               "ORDER BY layer, q_head", **q)
    assert len(summary) == len(heads)  # attention: auto is on by default
    tokens = fetch(warehouse, "SELECT * FROM token_attention WHERE model = $m AND run_id = $r", **q)
    # n_exact_rows by its definition: query rows whose every visible key position was captured
    for s in summary.itertuples():
        qp = read_positions(str(shards / f"l{s.layer:02d}h{s.q_head:02d}q" / "data.parquet"))
        kp = read_positions(str(shards / f"l{s.layer:02d}h{s.q_head // group:02d}k" / "data.parquet"))
        assert s.n_exact_rows == count_exact_rows(qp[0], qp[1], kp[0], kp[1], qp[2]), (s.layer, s.q_head)
        stored = tokens[(tokens["layer"] == s.layer) & (tokens["q_head"] == s.q_head)]
        if s.status == "skipped":  # nothing computed, nothing stored, summaries NaN
            assert len(stored) == 0 and math.isnan(s.mean_entropy) and math.isnan(s.max_row_sum_error)
        else:  # the exact rows, each one stored
            assert s.status in ("exact", "partial") and len(stored) == s.n_exact_rows
    if len(tokens):
        t = tokens
        assert t["exact"].all() and (t["key_coverage"] == 1).all()
        window = t.merge(summary[["layer", "q_head", "sliding_window"]], on=["layer", "q_head"])["sliding_window"]
        visible = np.where(window.isna(), t["position"] + 1, np.minimum(t["position"] + 1, window.fillna(0)))
        assert (t["n_visible"] == visible).all() and (t["n_keys"] == t["n_visible"]).all()
        assert t["entropy"].isna().eq(t["position"] < 2).all()  # entropy undefined below position 2
        late = t["position"] >= 2
        np.testing.assert_allclose(t.loc[late, "entropy_ratio"],
                                   t.loc[late, "entropy"] / np.log(t.loc[late, "n_keys"]), rtol=1e-12)
        assert ((t["max_attn"] >= 1 / t["n_keys"] - 1e-12) & (t["max_attn"] <= 1 + 1e-12)).all()
        assert ((t["k_eff"] >= 1) & (t["k_eff"] <= t["n_keys"])).all()
    return {"run_id": run_id, "heads": len(heads), "tokens": len(tokens),
            "statuses": sorted(set(summary["status"])), "exact_rows": int(summary["n_exact_rows"].sum())}


def check_exports(folder: Path, warehouse, model: str, run_id: str) -> None:
    """Every exported file holds the rows the warehouse holds for the run (CSV and Parquet)."""
    q = dict(m=model, r=run_id)
    for table in ("head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors",
                  "head_attention_summary", "query_scale_sweep"):
        n = fetch(warehouse, f"SELECT count(*) AS n FROM {table} WHERE model = $m AND run_id = $r", **q)["n"][0]
        assert len(pd.read_csv(folder / f"{table}.csv")) == n, table
    n_tokens = fetch(warehouse, "SELECT count(*) AS n FROM token_attention WHERE model = $m AND run_id = $r", **q)
    assert pq.ParquetFile(folder / "token_attention.parquet").metadata.num_rows == n_tokens["n"][0]


# --------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def sparse_root(tmp_path_factory) -> Path:
    return write_sparse_capture(DENSE, tmp_path_factory.mktemp("sparse") / SPARSE_MODEL, SPARSE_KEEP, SPARSE_SEED)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli(tmp_path_factory, demo_dataset, sparse_root):
    """`plasticity demo` and `plasticity analyze` on the three datasets, shipped defaults."""
    tmp = tmp_path_factory.mktemp("cli")
    wh, out = tmp / "warehouse.duckdb", tmp / "results"
    data = tmp / "data"
    shutil.copytree(demo_dataset, data / DEMO)  # the files `demo` would generate (same spec), not regenerated
    runs = {DEMO: run_cli("demo", "--data", data, "--warehouse", wh, "--output_dir", out, "--quiet")}
    for model, root in ((DENSE_MODEL, DENSE), (SPARSE_MODEL, sparse_root)):
        runs[model] = run_cli("analyze", "--dataset_local_root", root, "--model", model, "--warehouse", wh,
                              "--output_dir", out, "--quiet")
    roots = {DEMO: data / DEMO, DENSE_MODEL: DENSE, SPARSE_MODEL: sparse_root}
    return {"tmp": tmp, "warehouse": wh, "out": out, "runs": runs, "roots": roots}


@pytest.mark.parametrize("model", [DEMO, DENSE_MODEL, SPARSE_MODEL])
def test_cli_analyze_on_defaults_stores_rows_by_their_definitions(cli, model):
    code, text = cli["runs"][model]
    assert code == 0, text
    got = check_stored_rows(cli["warehouse"], model, cli["roots"][model])
    if model == SPARSE_MODEL:  # every head below 100 exact rows, some with a few: none stored
        assert got["statuses"] == ["skipped"] and got["tokens"] == 0 and got["exact_rows"] > 0
    else:
        assert got["statuses"] == ["exact"] and got["tokens"] > 0
    # analyze/demo export the run: every file, Parquet included, matches the warehouse
    check_exports(cli["out"] / model / got["run_id"], cli["warehouse"], model, got["run_id"])


@pytest.mark.parametrize("model", [DEMO, DENSE_MODEL, SPARSE_MODEL])
def test_cli_read_commands_on_defaults(cli, model):
    wh, tmp = cli["warehouse"], cli["tmp"]
    run_id = check_stored_rows(wh, model, cli["roots"][model])["run_id"]
    code, text = run_cli("export", "--model", model, "--warehouse", wh, "--out", tmp / "export" / model)
    assert code == 0, text
    check_exports(tmp / "export" / model, wh, model, run_id)
    code, text = run_cli("sql", f"SELECT count(*) AS n FROM latest_head_metrics WHERE model = '{model}'",
                         "--warehouse", wh)
    assert code == 0 and text.split()[-1] == str(N_HEADS[model]), text
    for kind in ("curves", "heatmap", "components", "compare"):
        png = tmp / "plots" / f"{model}-{kind}.png"
        code, text = run_cli("plot", kind, "--model", model, "--warehouse", wh, "--output", png)
        assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (kind, text)
    # a trajectory is drawn for a family of checkpoints; without one the command says what it needs
    code, text = run_cli("plot", "trajectory", "--model", model, "--warehouse", wh, "--output", tmp / "t.png")
    assert code == 2 and "family" in text
    png = tmp / "plots" / f"{model}-classes.png"
    code, text = run_cli("attention-plot", "classes", "--model", model, "--warehouse", wh, "--output", png)
    assert code == 0 and png.is_file(), text
    png = tmp / "plots" / f"{model}-scale.png"
    code, text = run_cli("attention-plot", "scale", "--model", model, "--warehouse", wh, "--output", png)
    if model == SPARSE_MODEL:  # no head is estimable: nothing to draw, said plainly
        assert code == 2 and "estimable" in text and not png.exists(), text
    else:
        assert code == 0 and png.is_file(), text
    code, text = run_cli("validate", "--model", model, "--warehouse", wh)
    assert code == 0 and "CONCLUSION:" in text, text


# --------------------------------------------------------------------------- Dagster


def shipped_configs(folder: Path, extra: dict[str, Path]) -> Path:
    """configs/ copied unmodified, plus a config with nothing but a name and a folder per extra dataset."""
    shutil.copytree(REPO_ROOT / "configs", folder)
    for model, root in extra.items():
        (folder / f"{model}.yaml").write_text(f"model: {model}\ndataset_local_root: {root}\n")
    return folder


@pytest.fixture(scope="module")
def automation(tmp_path_factory, sparse_root):
    tmp = tmp_path_factory.mktemp("automation")
    configs = shipped_configs(tmp / "configs", {DENSE_MODEL: DENSE, SPARSE_MODEL: sparse_root})
    resources = {"warehouse": WarehouseResource(path=str(tmp / "warehouse.duckdb"), exports_dir=str(tmp / "results")),
                 "hub": HubResource(download_dir=str(tmp / "hub")),
                 "datasets": DatasetsResource(configs_dir=str(configs))}
    with dg.instance_for_test() as instance:  # a schedule's context needs an instance with a reference
        yield {"tmp": tmp, "configs": configs, "resources": resources, "instance": instance}


def execute_request(automation, request: dg.RunRequest):
    job = defs.resolve_job_def("analyze_model_job")
    tags = {k: v for k, v in (request.tags or {}).items() if k != "dagster/partition"}
    return job.execute_in_process(partition_key=request.partition_key, tags=tags, instance=automation["instance"],
                                  resources=automation["resources"], raise_on_error=False)


ATTENTION_ASSETS = {"attention_validation_report", "attention_class_plot", "attention_scale_plot"}


def assert_whole_job_succeeded(result, estimable: bool) -> None:
    """No step failed and every asset was materialised; the query-scale plot only when some head's
    attention is estimable (without one there is no sweep to draw, and the asset says so)."""
    failures = [e for e in result.all_events if e.is_step_failure]
    assert result.success and not failures, [str(e.event_specific_data.error)[:2000] for e in failures]
    done = {e.materialization.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == EXPECTED_ASSETS | ATTENTION_ASSETS - (set() if estimable else {"attention_scale_plot"})


def test_sensor_requested_run_on_the_dense_capture(automation):
    sensor = next(s for s in defs.sensors if s.name == "local_datasets_sensor")
    instance = automation["instance"]
    with dg.build_sensor_context(instance=instance, resources={"datasets": automation["resources"]["datasets"]}) as ctx:
        tick = sensor(ctx)
    for request in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    requested = {r.partition_key: r for r in tick.run_requests}
    # every local dataset with shards (the shipped demo's folder is not generated here)
    assert set(requested) == {DENSE_MODEL, SPARSE_MODEL}
    result = execute_request(automation, requested[DENSE_MODEL])
    assert_whole_job_succeeded(result, estimable=True)
    got = check_stored_rows(automation["resources"]["warehouse"].path, DENSE_MODEL, DENSE)
    assert got["statuses"] == ["exact"] and got["tokens"] == 18 * 2048


def test_schedule_requested_run_on_the_sparse_capture(automation, sparse_root):
    schedule = next(s for s in defs.schedules if s.name == "weekly_reanalysis_schedule")
    instance = automation["instance"]
    present = set(instance.get_dynamic_partitions("models"))
    instance.add_dynamic_partitions("models", [m for m in (DENSE_MODEL, SPARSE_MODEL) if m not in present])
    when = datetime(2026, 1, 5, 4, 0, tzinfo=timezone.utc)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when) as ctx:
        requests = {r.partition_key: r for r in schedule(ctx)}
    result = execute_request(automation, requests[SPARSE_MODEL])
    assert_whole_job_succeeded(result, estimable=False)
    got = check_stored_rows(automation["resources"]["warehouse"].path, SPARSE_MODEL, sparse_root)
    assert got["statuses"] == ["skipped"] and got["tokens"] == 0 and got["exact_rows"] > 0
    exports = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
               for e in result.get_asset_materialization_events()}["csv_exports"]
    assert exports["rows_token_attention"].value == 0 and exports["rows_head_attention_summary"].value == 18
