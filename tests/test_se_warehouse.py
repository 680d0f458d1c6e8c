"""The example-jackknife standard errors end to end: what the warehouse stores (head_metrics SE
columns, head_bucket_summary, the bucket_plasticity view) equals what the analysis computed, the
intervals are the t-intervals of those numbers, and the CSVs keep the upstream columns."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.stats import t as student_t

from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.store.export import export_csvs
from warehouse.run.pipeline import analyze_dataset
from warehouse.run.group import compute_group
from warehouse.run.planning import find_catalog, plan_groups, profile_catalog

SUMMARY_COLUMNS = ("q_bucket", "n_queries", "mean_position", "n_cells", "n_pairs", "ap", "ap_se", "ap_ci_low",
                   "ap_ci_high", "ap_se_pairs")
SE_COLUMNS = ("ap_overall_se", "ap_overall_se_pairs", "ap_overall_ci_low", "ap_overall_ci_high", "ap_se_df",
              "n_examples", "ap_ci_calibrated")


@pytest.fixture(scope="module", params=["bucket_full_cov", "linear_diag"])
def analysed(request, small_dataset, tmp_path_factory):
    cfg = load_config(None, {"warehouse": str(tmp_path_factory.mktemp("se") / "wh.duckdb"), "max_workers": 1,
                             "attention": False, "estimator": request.param})
    summary = analyze_dataset(cfg, small_dataset, progress=False)
    assert summary.n_errors == 0 and summary.n_done == 8
    return cfg, summary, small_dataset


def fetch(cfg, query, params=None):
    with db.reader(cfg.warehouse) as con:
        return con.execute(query, params or {}).fetchall()


def test_stored_values_are_the_computed_ones(analysed):
    cfg, summary, root = analysed
    outcomes = [o for task in plan_groups(profile_catalog(find_catalog(root, cfg)), cfg) for o in compute_group(task)]
    assert len(outcomes) == 8
    for o in outcomes:
        key = {"l": o.layer, "q": o.q_head, "r": summary.run_id}
        row = fetch(cfg, f"SELECT {', '.join(SE_COLUMNS)} FROM head_metrics WHERE layer=$l AND q_head=$q AND run_id=$r",
                    key)
        assert row == [tuple(o.result.metrics[c] for c in SE_COLUMNS)]
        rows = fetch(cfg, f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM head_bucket_summary "
                          "WHERE layer=$l AND q_head=$q AND run_id=$r ORDER BY q_bucket", key)
        want = list(zip(*(o.result.bucket_summary_rows[c].tolist() for c in SUMMARY_COLUMNS)))
        assert len(rows) == len(want) > 0
        for got, exp in zip(rows, want):
            assert all(a == b or (np.isnan(a) and np.isnan(b)) for a, b in zip(got, exp))


def test_summary_agrees_with_cells_metrics_and_intervals(analysed):
    cfg, summary, _ = analysed
    p = {"r": summary.run_id}
    # one summary row per query bucket with a non-NaN AP_j, the same AP_j, cells and pairs as the cells give
    view = fetch(cfg, "SELECT layer, q_head, q_bucket, plasticity, n_cells, n_pairs, ap_se, ap_ci_low, ap_ci_high "
                      "FROM bucket_plasticity WHERE run_id=$r AND n_cells > 0 ORDER BY ALL", p)
    table = fetch(cfg, "SELECT layer, q_head, q_bucket, ap, n_cells, n_pairs, ap_se, ap_ci_low, ap_ci_high "
                       "FROM head_bucket_summary WHERE run_id=$r ORDER BY ALL", p)
    assert len(view) == len(table) > 0
    for v, t in zip(view, table):
        assert v[:3] == t[:3] and v[4:] == t[4:]
        assert v[3] == pytest.approx(t[3], rel=1e-13)
    heads = fetch(cfg, "SELECT layer, q_head, ap_overall, ap_overall_se, ap_overall_ci_low, ap_overall_ci_high, "
                       "ap_se_df, n_examples, estimator FROM head_metrics WHERE run_id=$r", p)
    for layer, q_head, ap, se, lo, hi, df, n_ex, est in heads:
        assert n_ex == 8 and df == 7  # the small dataset's 8 examples, one group each
        rows = [r for r in fetch(cfg, "SELECT n_queries, n_cells, ap, ap_se, ap_ci_low, ap_ci_high FROM "
                                      "head_bucket_summary WHERE run_id=$r AND layer=$l AND q_head=$q",
                                 {**p, "l": layer, "q": q_head})]
        n, cells, aps, ses, los, his = map(np.array, zip(*rows))
        weights = n if est == "bucket_full_cov" else cells
        assert ap == pytest.approx(np.sum(weights * aps) / np.sum(weights), rel=1e-13)
        q = student_t.ppf(0.975, df)
        assert 0.0 < se < 0.5 and np.all(ses > 0)
        assert (lo, hi) == (pytest.approx(max(0.0, ap - q * se), rel=1e-14), pytest.approx(min(1.0, ap + q * se), rel=1e-14))
        np.testing.assert_allclose(los, np.clip(aps - q * ses, 0, 1), rtol=1e-14)
        np.testing.assert_allclose(his, np.clip(aps + q * ses, 0, 1), rtol=1e-14)


def test_csv_exports_keep_spec_columns(analysed, tmp_path):
    cfg, summary, _ = analysed
    files = export_csvs(cfg.warehouse, summary.model, summary.run_id, tmp_path)
    assert set(files) == {"head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors"}
    with open(files["head_metrics"]) as fh:
        header = next(csv.reader(fh))
    # the upstream columns first and in their order, then ours (model, run and the interval with its flag)
    assert header[19:22] == ["ap_overall", "ap_overall_se", "estimator"] and len(header) == 29
    assert header[22:] == ["model", "run_id", "ap_overall_ci_low", "ap_overall_ci_high", "ap_se_df", "n_examples",
                           "ap_ci_calibrated"]


def test_comments_cover_the_new_columns(tmp_path):
    from warehouse.store import db

    db.ensure_schema(tmp_path / "wh.duckdb")
    with db.reader(tmp_path / "wh.duckdb") as con:
        comments = dict(((t, c), x) for t, c, x in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns()").fetchall())
    summary_cols = [c for (t, c) in comments if t == "head_bucket_summary"]
    assert len(summary_cols) == 16  # with ap_ci_calibrated
    for key in [("head_bucket_summary", c) for c in summary_cols] + [("head_metrics", c) for c in SE_COLUMNS] + [
            ("bucket_plasticity", c) for c in ("ap_se", "ap_ci_low", "ap_ci_high", "n_queries")]:
        assert comments[key], key
