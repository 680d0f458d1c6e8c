"""Attention patterns in the warehouse: shards -> attention tables -> CSV, report, plots, Dagster assets.

One module-scoped analysis of the small synthetic dataset (dense capture, token_str,
a sliding window on layer 1) with the default ``attention: auto``; every table is compared
with `plasticity.attention.head_attention_metrics` called directly on rows read from the
Parquet shards with pyarrow (not through the warehouse loader).
"""

from __future__ import annotations

import csv
import math
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SMALL_SPEC, read_shard
from plasticity.attention import SUMMARY_COLUMNS, SWEEP_COLUMNS, TOKEN_COLUMNS, gain_ratio, head_attention_metrics
from warehouse.store import db
from warehouse.store.attention_export import ATTENTION_EXPORTS
from warehouse.store.export import export_attention
from warehouse.present.attention_plots import (
    class_counts_data,
    default_heads,
    plot_attention_classes,
    plot_scale_sweep,
    scale_sweep_data,
)
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset
from warehouse.present.validation import model_report, parse_head

MODEL = "small-attn"
N_HEADS = SMALL_SPEC.num_layers * SMALL_SPEC.num_q_heads
N_TOKENS = SMALL_SPEC.num_examples * SMALL_SPEC.seq_len
WINDOWS = SMALL_SPEC.sliding_windows  # {1: 64}


@pytest.fixture(scope="module")
def analysed(small_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn_pipeline")
    cfg = load_config(None, {"warehouse": str(tmp / "wh.duckdb"), "max_workers": 1, "model": MODEL})
    assert cfg.attention == "auto"
    summary = analyze_dataset(cfg, small_dataset, progress=False)
    assert summary.n_errors == 0 and summary.n_done == N_HEADS
    direct = {}
    group = SMALL_SPEC.num_q_heads // SMALL_SPEC.num_k_heads
    for layer in range(SMALL_SPEC.num_layers):
        for q_head in range(SMALL_SPEC.num_q_heads):
            q = read_shard(small_dataset, layer, q_head, "q")
            k = read_shard(small_dataset, layer, q_head // group, "k")
            direct[(layer, q_head)] = head_attention_metrics(q, k, scales=tuple(cfg.attention_scales), rows="exact",
                                                             min_exact_rows=cfg.attention_min_exact_rows)
    return {"cfg": cfg, "summary": summary, "direct": direct, "tmp": tmp, "root": small_dataset}


def fetch(cfg, query, params=None):
    with db.reader(cfg.warehouse) as con:
        cur = con.execute(query, params or {})
        return [d[0] for d in cur.description], cur.fetchall()


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)
    return a == b


# ----------------------------------------------------------------------------- tables


def test_summary_rows_equal_direct_computation_with_sql_types(analysed):
    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    names, rows = fetch(cfg, "SELECT * EXCLUDE (model, run_id) FROM head_attention_summary "
                             "WHERE model = $m AND run_id = $r ORDER BY layer, q_head", {"m": MODEL, "r": run_id})
    assert names == ["layer", "q_head", "k_head", *SUMMARY_COLUMNS]
    assert len(rows) == N_HEADS
    for row in rows:
        got = dict(zip(names, row))
        want = analysed["direct"][(got["layer"], got["q_head"])][1]
        for col in SUMMARY_COLUMNS:
            assert same(got[col], want[col]), (got["layer"], got["q_head"], col, got[col], want[col])
        # types as stored: NULL window, real booleans and strings
        assert got["sliding_window"] == WINDOWS.get(got["layer"])
        assert isinstance(got["entropy_monotonic"], bool) and got["entropy_monotonic"] is True
        assert got["attn_class"] in ("sharp", "medium", "uniform")
        assert got["max_future_weight"] == 0.0 and got["max_row_sum_error"] < 1e-12
        assert got["mean_key_coverage"] == 1.0 and got["n_queries"] == N_TOKENS
        assert got["status"] == "exact" and got["n_exact_rows"] == N_TOKENS and got["exact_row_frac"] == 1.0
        assert got["min_exact_rows"] == 100
        assert math.isfinite(got["same_token_ratio"])  # token_str reached the computation
    _, types = fetch(cfg, "SELECT DISTINCT typeof(sliding_window), typeof(entropy_monotonic), typeof(attn_class), "
                          "typeof(qvar_pairs_distant) FROM head_attention_summary")
    assert types == [("INTEGER", "BOOLEAN", "VARCHAR", "BIGINT")]
    _, nulls = fetch(cfg, "SELECT layer, count(*) FILTER (WHERE sliding_window IS NULL) FROM head_attention_summary "
                          "GROUP BY layer ORDER BY layer")
    assert nulls == [(0, SMALL_SPEC.num_q_heads), (1, 0)]


def test_every_attention_column_has_a_comment(analysed):
    _, rows = fetch(analysed["cfg"], "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE table_name "
                                      "IN ('token_attention', 'head_attention_summary', 'query_scale_sweep')")
    keys = {"model", "run_id", "layer", "q_head", "k_head"}
    columns = {(t, c) for t, c, _ in rows if c not in keys}
    assert len(columns) == len(TOKEN_COLUMNS) + len(SUMMARY_COLUMNS) + len(SWEEP_COLUMNS)
    assert [(t, c) for t, c, comment in rows if c not in keys and not comment] == []


def test_token_and_sweep_rows_equal_direct_computation(analysed):
    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    p = {"m": MODEL, "r": run_id}
    token_cols = ", ".join(TOKEN_COLUMNS)
    for (layer, q_head), (table, _, sweep) in analysed["direct"].items():
        _, rows = fetch(cfg, f"SELECT {token_cols} FROM token_attention WHERE model = $m AND run_id = $r "
                             f"AND layer = {layer} AND q_head = {q_head} ORDER BY bucket, example_id, position", p)
        assert len(rows) == N_TOKENS
        got = {c: np.array([r[i] for r in rows]) for i, c in enumerate(TOKEN_COLUMNS)}
        for col in TOKEN_COLUMNS:  # the direct table is in canonical (bucket, example, position) order too
            if table[col].dtype.kind in "iu":
                assert np.array_equal(got[col].astype(np.int64), table[col]), (layer, q_head, col)
            else:
                np.testing.assert_allclose(got[col].astype(float), table[col], rtol=1e-12, atol=1e-15,
                                           equal_nan=True, err_msg=f"{layer} {q_head} {col}")
        _, srows = fetch(cfg, f"SELECT {', '.join(SWEEP_COLUMNS)} FROM query_scale_sweep WHERE model = $m "
                              f"AND run_id = $r AND layer = {layer} AND q_head = {q_head} ORDER BY scale", p)
        assert [r[0] for r in srows] == [0.5, 0.75, 1.0, 1.25, 1.5]
        for i, col in enumerate(SWEEP_COLUMNS):
            np.testing.assert_allclose([r[i] for r in srows], sweep[col], rtol=1e-12, atol=1e-15)
    # windowed layer: nobody sees more than the window
    _, mx = fetch(cfg, "SELECT layer, max(n_keys), max(n_visible) FROM token_attention GROUP BY layer ORDER BY layer")
    assert mx == [(0, SMALL_SPEC.seq_len, SMALL_SPEC.seq_len), (1, WINDOWS[1], WINDOWS[1])]


def test_attention_export(analysed, tmp_path):
    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    files = export_attention(cfg.warehouse, MODEL, None, tmp_path)
    assert set(files) == set(ATTENTION_EXPORTS)
    assert files["token_attention"].name == "token_attention.parquet"
    expected = {
        "head_attention_summary": ["layer", "q_head", "k_head", *SUMMARY_COLUMNS],
        "query_scale_sweep": ["layer", "q_head", "k_head", *SWEEP_COLUMNS],
    }
    n_rows = {"head_attention_summary": N_HEADS, "query_scale_sweep": N_HEADS * 5}
    for table in expected:
        with open(files[table], newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == expected[table], table
        assert len(rows) - 1 == n_rows[table], table
    # per-token rows: zstd Parquet, the warehouse's rows in (layer, q_head, example_id, position) order
    meta = pq.ParquetFile(files["token_attention"]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    tokens = pq.read_table(files["token_attention"])
    assert tokens.column_names == ["layer", "q_head", "k_head", *TOKEN_COLUMNS]
    assert tokens.num_rows == N_HEADS * N_TOKENS
    assert str(tokens.schema.field("position").type) == "int64" and str(tokens.schema.field("exact").type) == "bool"
    _, rows = fetch(cfg, f"SELECT layer, q_head, k_head, {', '.join(TOKEN_COLUMNS)} FROM token_attention "
                         "WHERE model = $m AND run_id = $r ORDER BY layer, q_head, example_id, position, bucket",
                    {"m": MODEL, "r": run_id})
    for i, col in enumerate(tokens.column_names):
        got, want = tokens.column(col).to_pylist(), [r[i] for r in rows]
        if col == "position":
            want = [int(v) for v in want]
        assert all(same(a, b) for a, b in zip(got, want)), col
    with open(files["head_attention_summary"], newline="") as fh:
        summ = list(csv.DictReader(fh))
    direct = analysed["direct"][(1, 2)][1]
    row = next(r for r in summ if (r["layer"], r["q_head"]) == ("1", "2"))
    assert float(row["gain"]) == pytest.approx(direct["gain"], rel=1e-12)
    assert row["sliding_window"] == str(WINDOWS[1]) and row["attn_class"] == direct["attn_class"]
    assert row["status"] == "exact"
    assert {r["sliding_window"] for r in summ if r["layer"] == "0"} == {""}  # NULL
    # same shape as warehouse.store.export.EXPORTS; once merged there, the entries must be these
    from warehouse.store.export import EXPORTS

    for table, spec in ATTENTION_EXPORTS.items():
        assert EXPORTS.get(table, spec) == spec, table


# ----------------------------------------------------------------------------- validation report


def test_validation_report_from_the_warehouse(analysed):
    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    res = model_report(cfg.warehouse, MODEL, gain_pairs=[((1, 2), (0, 0))])
    text = res.text
    assert res.run_id == run_id and res.n_heads == N_HEADS
    assert f"model: {MODEL}\nrun: {run_id}\nheads: {N_HEADS} ({N_HEADS} estimable from this capture)\n" in text
    assert "[PASS] All rows sum to 1 within 1e-06" in text
    assert "[PASS] No future key has weight" in text
    assert "[PASS] No key outside the sliding window has weight in 4 windowed heads" in text
    assert "[PASS] Keys captured densely in every head" in text
    assert "[SKIP] Repeated tokens" not in text  # token_str was captured
    assert res.counts["failures"] == 0 and not res.failed
    assert res.counts["passed"] + res.counts["warnings"] == res.counts["checks"]
    gains = {(h["layer"], h["q_head"]): h["gain"] for h in res.heads}
    want = gain_ratio(analysed["direct"][(1, 2)][1]["gain"], analysed["direct"][(0, 0)][1]["gain"])
    assert res.gains[0].ratio == pytest.approx(want, rel=1e-12)
    assert res.gains[0].ratio == pytest.approx(gains[(1, 2)] / gains[(0, 0)], rel=1e-12)
    assert f"gain ratio L1 H2 / L0 H0: {gains[(1, 2)]:.4f} / {gains[(0, 0)]:.4f} = {want:.2f}x" in text
    with pytest.raises(LookupError, match="no run"):
        model_report(cfg.warehouse, MODEL, "not-a-run")
    with pytest.raises(LookupError, match="head 9:9"):
        model_report(cfg.warehouse, MODEL, gain_pairs=[((9, 9), (0, 0))])
    assert parse_head("L12:H0") == (12, 0) == parse_head("12:0")
    with pytest.raises(ValueError):
        parse_head("twelve")


def test_validation_cli_and_a_broken_reconstruction(analysed, tmp_path, capsys):
    from cli.main import main

    cfg = analysed["cfg"]
    assert main(["validate", "--model", MODEL, "--warehouse", cfg.warehouse, "--gain-ratio", "1:2", "0:0",
                 "--unicode", "--out", str(tmp_path / "r.txt")]) == 0
    out = capsys.readouterr().out
    assert "[PASS] \u2713 All rows sum to 1" in out and "gain ratio L1 H2 / L0 H0" in out
    assert (tmp_path / "r.txt").read_text(encoding="utf-8") == out
    # a warehouse whose reconstruction leaked weight onto a future key: FAIL, exit status 1
    broken = tmp_path / "broken.duckdb"
    shutil.copy(cfg.warehouse, broken)
    con = duckdb.connect(str(broken))
    con.execute("UPDATE head_attention_summary SET max_future_weight = 0.0078 WHERE layer = 1 AND q_head = 3")
    con.close()
    assert main(["validate", "--model", MODEL, "--warehouse", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] Non-causal attention in 1/8 heads (max future weight: 0.0078)" in out
    assert "L1 H3 (kv 1)" in out and "reconstruction is wrong" in out
    assert main(["validate", "--model", "ghost", "--warehouse", cfg.warehouse]) == 2
    assert "no run of model 'ghost'" in capsys.readouterr().err


def test_report_needs_attention_rows(small_dataset, tmp_path):
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "no-attn", "layers": "0"})
    analyze_dataset(cfg, small_dataset, progress=False)
    with pytest.raises(LookupError, match="attention: false"):
        model_report(cfg.warehouse, "no-attn")
    with pytest.raises(LookupError, match="attention: false"):
        scale_sweep_data(cfg.warehouse, "no-attn")


# ----------------------------------------------------------------------------- plots


def _png_pixels(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    return img


def test_scale_plot_draws_the_sweep_of_the_chosen_heads(analysed, tmp_path):
    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    res = plot_scale_sweep(cfg.warehouse, MODEL, None, tmp_path / "p" / "scale.png", heads=[(1, 2), (0, 1)],
                           metrics=("entropy", "max_attn", "k_eff"))
    assert res.run_id == run_id and res.path == tmp_path / "p" / "scale.png"
    img = _png_pixels(res.path)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    data = res.data
    assert sorted(set(data["head"])) == ["L0 H1", "L1 H2"]
    assert len(data) == 2 * 3 * 5
    for (layer, q_head) in [(1, 2), (0, 1)]:
        _, summ, sweep = analysed["direct"][(layer, q_head)]
        for metric, col in (("entropy", "mean_entropy"), ("max_attn", "mean_max_attn"), ("k_eff", "mean_k_eff")):
            sub = data[(data["layer"] == layer) & (data["q_head"] == q_head) & (data["metric"] == metric)]
            assert sub["scale"].tolist() == [0.5, 0.75, 1.0, 1.25, 1.5]
            np.testing.assert_allclose(sub["value"], sweep[col], rtol=1e-12)
        np.testing.assert_allclose(data.loc[data["head"] == f"L{layer} H{q_head}", "gain"], summ["gain"], rtol=1e-12)
    # default heads: all 8 heads are more than 6 -> the 3 highest- and 3 lowest-gain ones
    _, default = scale_sweep_data(cfg.warehouse, MODEL)
    gains = sorted(((s["gain"], key) for key, (_, s, _) in analysed["direct"].items()))
    want = sorted({key for _, key in gains[:3] + gains[-3:]})
    assert sorted({(int(a), int(b)) for a, b in zip(default["layer"], default["q_head"])}) == want
    with pytest.raises(LookupError, match="7:7"):
        scale_sweep_data(cfg.warehouse, MODEL, heads=[(7, 7)])
    with pytest.raises(ValueError, match="unknown metric"):
        scale_sweep_data(cfg.warehouse, MODEL, metrics=("perplexity",))


def test_default_heads_selection():
    import pandas as pd

    small = pd.DataFrame({"layer": [1, 0], "q_head": [0, 3], "gain": [0.2, float("nan")]})
    assert default_heads(small) == [(0, 3), (1, 0)]
    many = pd.DataFrame({"layer": [0] * 8, "q_head": list(range(8)),
                         "gain": [0.5, 0.1, float("nan"), 0.3, 0.9, 0.2, 0.4, 0.05]})
    assert default_heads(many) == [(0, 0), (0, 1), (0, 4), (0, 5), (0, 6), (0, 7)]


def test_class_plot_counts_heads_per_layer(analysed, tmp_path):
    cfg = analysed["cfg"]
    res = plot_attention_classes(cfg.warehouse, MODEL, None, tmp_path / "classes.png")
    _png_pixels(res.path)
    want = {}
    for (layer, _), (_, summ, _) in analysed["direct"].items():
        want.setdefault(layer, {"sharp": 0, "medium": 0, "uniform": 0})[summ["attn_class"]] += 1
    got = {int(r.layer): {c: int(getattr(r, c)) for c in ("sharp", "medium", "uniform")}
           for r in res.data.itertuples(index=False)}
    assert got == want
    assert res.data["heads"].tolist() == [SMALL_SPEC.num_q_heads] * SMALL_SPEC.num_layers
    assert res.data.equals(class_counts_data(cfg.warehouse, MODEL)[1])


def test_attention_plot_cli(analysed, tmp_path, capsys):
    from cli.main import main

    cfg = analysed["cfg"]
    out = tmp_path / "s.png"
    assert main(["attention-plot", "scale", "--model", MODEL, "--warehouse", cfg.warehouse, "--heads", "0:1", "1:3",
                 "--metrics", "entropy_ratio", "--output", str(out)]) == 0
    assert "2 head(s): L0 H1, L1 H3" in capsys.readouterr().out and out.stat().st_size > 1000
    assert main(["attention-plot", "classes", "--model", MODEL, "--warehouse", cfg.warehouse,
                 "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["attention-plot", "scale", "--model", MODEL, "--warehouse", cfg.warehouse, "--heads", "5:5",
                 "--output", str(out)]) == 2


# ----------------------------------------------------------------------------- Dagster


def test_dagster_assets_materialize(analysed, small_dataset, tmp_path):
    dg = pytest.importorskip("dagster")
    from assets import attention as assets_attention
    from dagster_project.resources import WarehouseResource

    cfg, run_id = analysed["cfg"], analysed["summary"].run_id
    wh = tmp_path / "wh.duckdb"
    shutil.copy(cfg.warehouse, wh)
    # a second model analysed without attention: its assets materialize nothing
    analyze_dataset(load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False,
                                       "model": "no-attn", "layers": "0"}), small_dataset, progress=False)
    defs_assets = [assets_attention.attention_validation_report, assets_attention.attention_scale_plot,
                   assets_attention.attention_class_plot]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL, "no-attn"])
    resources = {"warehouse": WarehouseResource(path=str(wh), exports_dir=str(tmp_path / "results"))}
    try:
        result = dg.materialize(defs_assets, partition_key=MODEL, instance=instance, resources=resources)
        assert result.success
        mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
                for e in result.get_asset_materialization_events()}
        assert set(mats) == {"attention_validation_report", "attention_scale_plot", "attention_class_plot"}
        rep = mats["attention_validation_report"]
        assert rep["run_id"].value == run_id and rep["failures"].value == 0 and rep["heads"].value == N_HEADS
        assert rep["rows_token_attention"].value == N_HEADS * N_TOKENS
        assert rep["rows_query_scale_sweep"].value == N_HEADS * 5
        assert "[PASS] All rows sum to 1" in rep["report"].value and f"model: {MODEL}" in rep["report"].value
        report_file = tmp_path / "results" / MODEL / run_id / "attention_validation.txt"
        assert report_file.read_text(encoding="utf-8") in rep["report"].value
        for name in ("attention_scale_plot", "attention_class_plot"):
            md = mats[name]
            assert md["plot"].value.startswith("![") and "data:image/png;base64," in md["plot"].value
            assert (tmp_path / "results" / MODEL / run_id / "plots" / f"{name}.png").stat().st_size > 1000
            assert "|" in md["preview"].value
        assert mats["attention_class_plot"]["dagster/row_count"].value == SMALL_SPEC.num_layers
        skipped = dg.materialize(defs_assets, partition_key="no-attn", instance=instance, resources=resources)
        assert skipped.success and not skipped.get_asset_materialization_events()
    finally:
        instance.dispose()
    # the code location loads them, partitioned like the rest of the flow
    from dagster_project.definitions import defs

    graph = defs.get_repository_def().asset_graph
    for a in defs_assets:
        node = graph.get(a.key)
        assert node.partitions_def.name == "models"
        assert {k.to_user_string() for k in node.parent_keys} == {"head_attention_summary"}
