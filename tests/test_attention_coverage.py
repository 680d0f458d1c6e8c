"""Key coverage decides what is reported: exact rows, per-head status, attention: auto / true."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import SMALL_SPEC
from plasticity.attention import head_attention_metrics, token_attention_metrics
from plasticity.types import TokenArrays
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset


def ta(positions, examples=None, window=None, d=2, seed=0):
    positions = np.asarray(positions, dtype=float)
    n = positions.size
    examples = np.zeros(n, np.int64) if examples is None else np.asarray(examples, np.int64)
    return TokenArrays(np.zeros(n, np.int64), examples, positions,
                       np.random.default_rng(seed).normal(size=(n, d)), window)


def test_coverage_by_hand():
    # keys of example 0 at 0, 1, 1 (twice), 3; of example 1 at 0..4; queries at 0..4 of both
    k = ta([0, 1, 1, 3, 0, 1, 2, 3, 4], [0, 0, 0, 0, 1, 1, 1, 1, 1])
    q = ta([0, 1, 2, 3, 4] * 2, [0] * 5 + [1] * 5, seed=1)
    t = token_attention_metrics(q, k)
    # canonical order: (bucket, example, position)
    assert t["n_keys"].tolist() == [1, 3, 3, 4, 4, 1, 2, 3, 4, 5]  # duplicates are two keys ...
    assert t["n_visible"].tolist() == [1, 2, 3, 4, 5] * 2
    np.testing.assert_allclose(t["key_coverage"], [1, 1, 2 / 3, 3 / 4, 3 / 5, 1, 1, 1, 1, 1])  # ... one position
    assert t["exact"].tolist() == [True, True, False, False, False] + [True] * 5


def test_coverage_with_a_window():
    # window 3: a query at p sees p-2..p; keys missing at 2 only
    k = ta([0, 1, 3, 4, 5, 6], window=3)
    q = ta([0, 1, 2, 3, 4, 5, 6], window=3, seed=1)
    t = token_attention_metrics(q, k)
    assert t["n_visible"].tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert t["exact"].tolist() == [True, True, False, False, False, True, True]


def partial_head(n_missing_after: int = 40):
    """One example of 100 positions, keys missing from ``n_missing_after`` on at every third position."""
    pos = np.arange(100)
    keep = (pos < n_missing_after) | (pos % 3 != 0)
    return ta(pos, seed=1), ta(pos[keep])


@pytest.mark.parametrize("rows", ["all", "exact"])
def test_status_follows_the_number_of_exact_rows(rows):
    q, k = partial_head(40)  # rows 0..41 are exact: 42 exact rows
    _, summ, _ = head_attention_metrics(q, k, rows=rows, min_exact_rows=42)
    assert summ["status"] == "partial" and summ["n_exact_rows"] == 42 and summ["exact_row_frac"] == 0.42
    assert summ["status_reason"] == ("42 of 100 query rows (42.0%) see every key they may attend to, at positions "
                                     "0-41; the summaries use those rows only")
    assert math.isfinite(summ["mean_entropy"]) and summ["mean_n_keys"] == pytest.approx(np.mean(np.arange(1, 43)))
    _, short, sweep = head_attention_metrics(q, k, rows=rows, min_exact_rows=43)
    assert short["status"] == ("not_estimable" if rows == "all" else "skipped")
    assert short["status_reason"].startswith("not estimable from this capture: 42 of 100 query rows")
    assert math.isnan(short["mean_entropy"]) and np.isnan(sweep["mean_max_attn"]).all()
    assert short["min_exact_rows"] == 43
    q2, k2 = partial_head(100)
    assert head_attention_metrics(q2, k2, rows=rows, min_exact_rows=100)[1]["status"] == "exact"


def test_partial_head_summaries_use_exact_rows_only():
    """The summary of a partial head equals the summary of its exact rows alone."""
    q, k = partial_head(40)
    table, summ, _ = head_attention_metrics(q, k)
    exact = table["exact"]
    q_exact = TokenArrays(q.bucket[exact], q.example_id[exact], q.position[exact], q.vectors[exact])
    t2, s2, _ = head_attention_metrics(q_exact, k)
    assert s2["status"] == "exact" and s2["n_queries"] == exact.sum()
    for col in ("mean_entropy", "mean_entropy_ratio", "mean_max_attn", "mean_k_eff", "row_std", "local_attn_near",
                "local_attn_far", "qvar_l2_adjacent", "qvar_l2_distant", "qvar_pairs_adjacent", "gain"):
        assert summ[col] == s2[col], col
    # the non-exact rows were computed ("all") and are on the token table, flagged
    assert np.isfinite(table["max_attn"][~exact]).all() and not table["exact"][~exact].any()


@pytest.fixture(scope="module")
def partial_dataset(tmp_path_factory):
    """The small synthetic model with 60% of positions captured: a few exact rows per example."""
    from dataclasses import replace

    spec = replace(SMALL_SPEC, model="partial", capture_fraction=0.6, sliding_windows={})
    return write_synthetic_dataset(tmp_path_factory.mktemp("partial") / "partial", spec, with_truth=False)


def test_auto_stores_exact_rows_and_skips_heads_without_enough(partial_dataset, tmp_path):
    out = {}
    for mode in ("auto", "true"):
        cfg = load_config(None, {"warehouse": str(tmp_path / f"{mode}.duckdb"), "max_workers": 1, "model": "p",
                                 "attention": mode, "attention_min_exact_rows": 3})
        run = analyze_dataset(cfg, partial_dataset, progress=False)
        with db.reader(cfg.warehouse) as con:
            out[mode] = {
                "summary": con.execute("SELECT layer, q_head, status, n_exact_rows, mean_entropy, status_reason "
                                       "FROM head_attention_summary WHERE run_id = $r ORDER BY ALL",
                                       {"r": run.run_id}).fetchall(),
                "tokens": con.execute("SELECT layer, q_head, example_id, position, exact, entropy, k_eff "
                                      "FROM token_attention WHERE run_id = $r ORDER BY ALL",
                                      {"r": run.run_id}).fetchall(),
            }
    auto, true = out["auto"], out["true"]
    statuses = {r[2] for r in auto["summary"]}
    assert statuses <= {"partial", "skipped"} and "partial" in statuses
    # heads with enough exact rows: same summaries in both modes; too few: skipped (auto) / not estimable (true)
    for a, t in zip(auto["summary"], true["summary"]):
        assert a[:2] == t[:2] and a[3] == t[3]
        if a[2] == "partial":  # (entropy NaN when every exact row is at a position < 2)
            assert t[2] == "partial" and (a[4] == t[4] or math.isnan(a[4]) and math.isnan(t[4]))
        else:
            assert t[2] == "not_estimable" and a[3] < 3 and math.isnan(a[4]) and "attention: auto" in a[5]
    # auto stores exactly the exact rows of the computed heads; true stores every row, flagged
    partial_heads = {r[:2] for r in auto["summary"] if r[2] == "partial"}
    assert all(r[4] for r in auto["tokens"]) and {r[:2] for r in auto["tokens"]} == partial_heads
    def nan_free(rows):
        return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows]

    flagged = [r for r in true["tokens"] if r[4] and r[:2] in partial_heads]
    assert nan_free(flagged) == nan_free(auto["tokens"])
    assert len(true["tokens"]) > len(auto["tokens"]) and not all(r[4] for r in true["tokens"])


def test_attention_mode_config_and_run_ids():
    assert load_config(None, {}).attention == "auto" and load_config(None, {}).attention_min_exact_rows == 100
    for given, mode in ((True, "true"), ("yes", "true"), (False, "false"), ("OFF", "false"), ("Auto", "auto")):
        assert load_config(None, {"attention": given}).attention == mode
    with pytest.raises(ValueError, match=r"must be one of auto\|true\|false"):
        load_config(None, {"attention": "sometimes"})
    with pytest.raises(ValueError, match="attention_min_exact_rows"):
        load_config(None, {"attention_min_exact_rows": 0})
    ids = {load_config(None, over).run_id("m", "r") for over in (
        {}, {"attention": "true"}, {"attention": "false"}, {"attention_min_exact_rows": 50},
        {"attention_scales": [1.0, 2.0]})}
    assert len(ids) == 5  # each changes what is stored, so each is its own run
    # with attention off, its other settings change nothing
    assert load_config(None, {"attention": "false"}).run_id("m", "r") == \
        load_config(None, {"attention": "false", "attention_min_exact_rows": 7}).run_id("m", "r")
