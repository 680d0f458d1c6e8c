"""Attention patterns on a real trained model: the tiny-llama fixture (tests/fixtures/tiny-llama).

The dense capture holds every position of 4 sequences of 512 bytes, so every query row is
exact and the rebuilt attention is the model's: per-head means, sweep cells and per-token
rows must match ``truth/`` (computed from the model's own attention probabilities in float64;
the captures are float32, hence ~1e-6). The sparse capture keeps each position with
probability 1/8, independently for queries and keys: no row sees all its keys, so nothing
may be reported as exact, and the validation report must say "not estimable".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_LLAMA, read_shard
from plasticity.attention import SWEEP_COLUMNS, head_attention_metrics
from warehouse.store import db
from warehouse.present.attention_plots import class_counts_data, scale_sweep_data
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset
from warehouse.present.validation import model_report

DENSE = TINY_LLAMA / "dense" / "tinyllama"
SPARSE = TINY_LLAMA / "sparse" / "tinyllama_sparse"
LAYERS, Q_HEADS, GROUP = 3, 6, 3
HEADS = [(layer, q_head) for layer in range(LAYERS) for q_head in range(Q_HEADS)]
#: head_truth.csv columns and ours (same names); the class, monotonicity and pair counts are compared exactly
MEANS = ("mean_entropy", "mean_entropy_ratio", "mean_max_attn", "row_std", "mean_query_norm", "local_attn_near",
         "local_attn_far", "local_bias_ratio", "same_token_attn", "diff_token_attn", "same_token_ratio",
         "qvar_l2_adjacent", "qvar_l2_distant", "gain", "gain_r2")
TOKEN_VALUES = ("entropy", "entropy_ratio", "max_attn", "row_std", "query_norm")


@pytest.fixture(scope="module")
def truth():
    return {
        "head": pd.read_csv(TINY_LLAMA / "truth" / "head_truth.csv").set_index(["layer", "q_head"]),
        "sweep": pd.read_csv(TINY_LLAMA / "truth" / "sweep_truth.csv").set_index(["layer", "q_head", "scale"]),
        "token": pd.read_csv(TINY_LLAMA / "truth" / "token_truth.csv.gz"),
    }


def heads_of(root, **kwargs):
    out = {}
    for layer, q_head in HEADS:
        q = read_shard(root, layer, q_head, "q")
        k = read_shard(root, layer, q_head // GROUP, "k")
        out[(layer, q_head)] = head_attention_metrics(q, k, **kwargs)
    return out


@pytest.fixture(scope="module")
def dense():
    return heads_of(DENSE, rows="exact", min_exact_rows=100)


def test_dense_capture_every_head_mean_matches_the_model(dense, truth):
    for key, (table, summ, _) in dense.items():
        want = truth["head"].loc[key]
        assert summ["status"] == "exact" and summ["n_exact_rows"] == summ["n_queries"] == want["n_queries"] == 2048
        assert table["exact"].all() and (table["key_coverage"] == 1.0).all()
        for col in MEANS:
            assert summ[col] == pytest.approx(want[col], rel=1e-6), (key, col)
        assert summ["mean_k_eff"] == want["mean_k_eff"], key  # k_eff exactly, row by row (below)
        assert summ["attn_class"] == want["attn_class"]
        assert summ["entropy_monotonic"] == bool(want["entropy_monotonic"])
        assert (summ["qvar_pairs_adjacent"], summ["qvar_pairs_distant"]) == \
            (want["qvar_pairs_adjacent"], want["qvar_pairs_distant"])


def test_dense_capture_every_sweep_cell_matches_the_model(dense, truth):
    n_cells = 0
    for key, (_, _, sweep) in dense.items():
        for i, scale in enumerate(sweep["scale"]):
            want = truth["sweep"].loc[(*key, scale)]
            for col in SWEEP_COLUMNS[1:]:
                if col == "mean_k_eff":
                    assert sweep[col][i] == want[col], (key, scale)
                else:
                    assert sweep[col][i] == pytest.approx(want[col], rel=1e-6), (key, scale, col)
                n_cells += 1
    assert n_cells == len(HEADS) * 5 * 5  # heads x scales x statistics


def test_dense_capture_every_token_row_matches_the_model(dense, truth):
    tok = truth["token"]
    for key, (table, _, _) in dense.items():
        want = tok[(tok.layer == key[0]) & (tok.q_head == key[1])]
        mine = pd.DataFrame({c: table[c] for c in ("example_id", "position", "k_eff", *TOKEN_VALUES)})
        both = want.merge(mine, on=["example_id", "position"], suffixes=("_truth", ""), validate="one_to_one")
        assert len(both) == len(want) == len(mine) == 2048
        np.testing.assert_array_equal(both["k_eff"], both["k_eff_truth"], err_msg=str(key))
        for col in TOKEN_VALUES:
            # float32 captures: ~1e-6 per weight (relative error grows only where a value is tiny)
            np.testing.assert_allclose(both[col], both[f"{col}_truth"], rtol=1e-5, atol=5e-6, equal_nan=True,
                                       err_msg=f"{key} {col}")


def visible_positions_captured(q, k) -> np.ndarray:
    """Per query row, by plain sets: are all positions 0..p of its example among the keys?"""
    keys = {}
    for e, p in zip(k.example_id.tolist(), k.position.tolist()):
        keys.setdefault(e, set()).add(int(p))
    return np.array([set(range(int(p) + 1)) <= keys.get(e, set())
                     for e, p in zip(q.canonical().example_id.tolist(), q.canonical().position.tolist())])


@pytest.mark.parametrize("rows", ["all", "exact"])
def test_sparse_capture_nothing_is_reported_as_exact(rows):
    for layer, q_head in [(0, 0), (1, 4), (2, 5)]:
        q = read_shard(SPARSE, layer, q_head, "q")
        k = read_shard(SPARSE, layer, q_head // GROUP, "k")
        table, summ, sweep = head_attention_metrics(q, k, rows=rows, min_exact_rows=100)
        truly_exact = visible_positions_captured(q, k)
        np.testing.assert_array_equal(table["exact"], truly_exact)
        assert summ["n_exact_rows"] == truly_exact.sum() < 100
        assert summ["status"] == ("not_estimable" if rows == "all" else "skipped")
        assert summ["status_reason"].startswith("not estimable from this capture")
        assert 0.08 < summ["mean_key_coverage"] < 0.17  # keys kept with probability 1/8
        facts = ("mean_query_norm", "mean_key_coverage", "local_window")  # of the capture, not of attention
        for col, value in summ.items():
            if col.startswith(("mean_", "local_", "same_", "diff_", "qvar_l2", "gain")) and col not in facts:
                assert math.isnan(value), col
        assert summ["attn_class"] == "unknown" and summ["entropy_monotonic"] is None
        assert summ["qvar_pairs_adjacent"] == summ["qvar_pairs_distant"] == 0
        for col in SWEEP_COLUMNS[1:]:
            assert np.isnan(sweep[col]).all()
        if rows == "exact":  # nothing computed
            assert np.isnan(table["max_attn"]).all() and math.isnan(summ["max_row_sum_error"])
        else:  # every row with a key computed (over its captured keys) and flagged
            has = table["n_keys"] > 0
            assert np.isfinite(table["max_attn"][has]).all() and summ["max_row_sum_error"] < 1e-12


def analyse(root, tmp_path, model, **overrides):
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "model": model,
                             **overrides})
    summary = analyze_dataset(cfg, root, progress=False)
    assert summary.n_errors == 0 and summary.n_done == len(HEADS)
    return cfg, summary


def fetch(cfg, query, **params):
    with db.reader(cfg.warehouse) as con:
        cur = con.execute(query, params)
        return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])


def test_dense_capture_through_the_warehouse(tmp_path, truth):
    cfg, run = analyse(DENSE, tmp_path, "tinyllama")
    summ = fetch(cfg, "SELECT * FROM head_attention_summary WHERE run_id = $r", r=run.run_id)
    summ = summ.set_index(["layer", "q_head"]).sort_index()
    assert (summ["status"] == "exact").all() and len(summ) == len(HEADS)
    for col in MEANS:
        np.testing.assert_allclose(summ[col], truth["head"].loc[summ.index, col], rtol=1e-6, err_msg=col)
    np.testing.assert_array_equal(summ["mean_k_eff"], truth["head"].loc[summ.index, "mean_k_eff"])
    n_tokens = fetch(cfg, "SELECT count(*) AS n, bool_and(exact) AS all_exact FROM token_attention")
    assert n_tokens["n"][0] == len(HEADS) * 2048 and n_tokens["all_exact"][0]
    report = model_report(cfg.warehouse, "tinyllama")
    assert report.counts["failures"] == 0 and report.counts["warnings"] == 0
    assert "Attention is reconstructed correctly and shows structure." in report.text
    assert "[PASS] Keys captured densely in every head" in report.text


@pytest.mark.parametrize("mode", ["auto", "true"])
def test_sparse_capture_through_the_warehouse(tmp_path, mode):
    cfg, run = analyse(SPARSE, tmp_path, "tinyllama-sparse", attention=mode)
    summ = fetch(cfg, "SELECT * FROM head_attention_summary WHERE run_id = $r", r=run.run_id)
    assert len(summ) == len(HEADS)
    assert set(summ["status"]) == {"skipped" if mode == "auto" else "not_estimable"}
    assert summ["mean_entropy"].isna().all() and summ["gain"].isna().all()
    tokens = fetch(cfg, "SELECT count(*) AS n, count(*) FILTER (WHERE exact) AS n_exact, "
                        "count(*) FILTER (WHERE key_coverage = 1) AS n_full FROM token_attention")
    if mode == "auto":  # no cost, no rows: nothing to store for a sparse capture
        assert tokens["n"][0] == 0
    else:  # every query stored, none of them flagged exact unless it saw every key
        assert tokens["n"][0] == summ["n_queries"].sum() and tokens["n_exact"][0] == tokens["n_full"][0]
    report = model_report(cfg.warehouse, "tinyllama-sparse")
    assert report.counts["failures"] == 0
    assert "heads: 18 (0 estimable from this capture; 18 not estimable from this capture)" in report.text
    conclusion = report.text[report.text.index("CONCLUSION:"):]
    assert "Attention is not estimable from this capture" in conclusion
    assert "reconstructed correctly" not in report.text and "[PASS] Local bias" not in report.text
    # the plots: every head in the class plot's "not estimable" bar; no sweep to draw
    _, counts = class_counts_data(cfg.warehouse, "tinyllama-sparse")
    assert counts["not estimable"].tolist() == counts["heads"].tolist() == [Q_HEADS] * LAYERS
    with pytest.raises(LookupError, match="no head .* is estimable from this capture"):
        scale_sweep_data(cfg.warehouse, "tinyllama-sparse")
    if mode == "auto":
        materialized = materialize_attention_assets(cfg.warehouse, "tinyllama-sparse", tmp_path)
        assert set(materialized) == {"attention_validation_report", "attention_class_plot"}
        assert materialized["attention_validation_report"]["estimable_heads"].value == 0


def materialize_attention_assets(warehouse, model, tmp_path) -> dict:
    """The attention assets of one partition in a temporary Dagster instance: {asset: metadata}."""
    import dagster as dg

    from assets import attention as assets_attention
    from dagster_project.resources import WarehouseResource

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [model])
    try:
        result = dg.materialize(
            [assets_attention.attention_validation_report, assets_attention.attention_scale_plot,
             assets_attention.attention_class_plot], partition_key=model, instance=instance,
            resources={"warehouse": WarehouseResource(path=str(warehouse), exports_dir=str(tmp_path / "results"))})
        assert result.success
        return {e.materialization.asset_key.to_user_string(): e.materialization.metadata
                for e in result.get_asset_materialization_events()}
    finally:
        instance.dispose()
