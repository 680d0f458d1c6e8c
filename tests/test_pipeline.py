"""End to end: synthetic shards -> DuckDB warehouse -> CSV, checked by value."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import read_ground_truth
from warehouse.store.export import export_csvs
from warehouse.run.pipeline import analyze_dataset

SPEC_HEAD_COLUMNS = (
    "layer,q_head,k_head,n_q_tokens,n_k_tokens,d_model,q_R2_pos,q_beta_norm,q_R2_scalar,q_mae_baseline,"
    "q_mae_proj,q_mae_ratio,q_resid0_skew,q_resid0_kurt,q_resid0_ks_p,q_noise_med_abs_skew,"
    "q_noise_med_abs_kurt,q_noise_med_ks_p,q_noise_frac_ks_p_lt_alpha,ap_overall,ap_overall_se,estimator,"
    "model,run_id,ap_overall_ci_low,ap_overall_ci_high,ap_se_df,n_examples,ap_ci_calibrated"
).split(",")


def run(root, tmp_path, name="wh", **overrides):
    cfg = load_config(None, {"warehouse": str(tmp_path / f"{name}.duckdb"), "max_workers": 1,
                             "attention": False, **overrides})
    return cfg, analyze_dataset(cfg, root, progress=False)


def fetch(cfg, query, params=None):
    with db.reader(cfg.warehouse) as con:
        return con.execute(query, params or {}).fetchall()


def all_results(cfg, summary):
    p = {"m": summary.model, "r": summary.run_id}
    return {
        t: fetch(cfg, f"SELECT * EXCLUDE (model, run_id) FROM {t} WHERE model=$m AND run_id=$r ORDER BY ALL", p)
        for t in ("head_metrics", "head_bucket_plasticity", "head_bucket_summary", "head_component_weights")
    }


@pytest.fixture(scope="module")
def demo_run(demo_dataset, tmp_path_factory):
    return run(demo_dataset, tmp_path_factory.mktemp("wh"))


def test_estimator_recovers_ground_truth(demo_dataset, demo_run):
    cfg, summary = demo_run
    assert summary.n_errors == 0 and summary.n_done == 16
    truth = {(t["layer"], t["q_head"]): t["ap_true"] for t in read_ground_truth(demo_dataset)}
    rows = fetch(cfg, "SELECT layer, q_head, ap_overall FROM head_metrics")
    errors = [abs(ap - truth[(layer, q)]) for layer, q, ap in rows]
    assert len(errors) == 16
    assert float(np.mean(errors)) <= 0.01, errors
    aps = [ap for *_, ap in rows]
    assert min(aps) < 0.05 and max(aps) > 0.95  # the demo spans ~0 to ~1


def test_pure_noise_head_has_plasticity_one(demo_run):
    cfg, _ = demo_run
    # layer 0, last q head is the generator's zero-mean head
    (ap,), = fetch(cfg, "SELECT ap_overall FROM head_metrics WHERE layer=0 AND q_head=3")
    assert ap > 0.99


def test_gqa_mapping_and_metric_ranges(demo_run):
    cfg, _ = demo_run
    rows = fetch(cfg, "SELECT q_head, k_head, ap_overall, ap_overall_se, d_model, n_q_tokens, estimator FROM head_metrics")
    for q, k, ap, se, d, n, est in rows:
        assert k == q // 2
        assert 0.0 <= ap <= 1.0 and se >= 0.0
        assert d == 16 and n == 16 * 512 and est == "bucket_full_cov"
    sums = fetch(cfg, "SELECT layer, q_head, sum(weight) FROM head_component_weights GROUP BY ALL")
    assert len(sums) == 16 and all(abs(s - 1.0) < 1e-12 for *_, s in sums)


def test_sliding_window_restricts_key_buckets(demo_run):
    cfg, _ = demo_run
    # layer 3 has window 128 over buckets of 64 positions: maxpos_k(c) = 64c+63 >= 64j-128 <=> c >= j-2
    cells = fetch(cfg, "SELECT DISTINCT q_bucket, k_bucket FROM head_bucket_plasticity WHERE layer = 3")
    assert cells and all(j - 2 <= c < j for j, c in cells)
    assert {(j, c) for j, c in cells} == {(j, c) for j in range(1, 8) for c in range(max(0, j - 2), j)}
    full = fetch(cfg, "SELECT DISTINCT q_bucket, k_bucket FROM head_bucket_plasticity WHERE layer = 0")
    assert {(j, c) for j, c in full} == {(j, c) for j in range(1, 8) for c in range(j)}
    assert not fetch(cfg, "SELECT * FROM head_bucket_plasticity WHERE q_bucket = 0")


def test_csv_export_has_spec_columns(demo_run, tmp_path):
    cfg, summary = demo_run
    files = export_csvs(cfg.warehouse, summary.model, summary.run_id, tmp_path)
    with open(files["head_metrics"]) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == SPEC_HEAD_COLUMNS
    assert len(rows) == 17
    with open(files["head_bucket_plasticity"]) as fh:
        header = next(csv.reader(fh))
    assert header == ["layer", "q_head", "k_head", "q_bucket", "k_bucket", "plasticity", "n_pairs"]
    with open(files["head_component_weights"]) as fh:
        header = next(csv.reader(fh))
    assert header == ["layer", "q_head", "k_head", "component", "component_r2", "weight"]
    # values survive the round trip to the last digit
    (ap,), = fetch(cfg, "SELECT ap_overall FROM head_metrics WHERE layer=1 AND q_head=2")
    row = next(r for r in rows[1:] if r[0] == "1" and r[1] == "2")
    assert float(row[SPEC_HEAD_COLUMNS.index("ap_overall")]) == ap


def test_rerun_is_idempotent_and_resumes(small_dataset, tmp_path):
    cfg, first = run(small_dataset, tmp_path)
    before = all_results(cfg, first)
    _, again = run(small_dataset, tmp_path)
    assert again.run_id == first.run_id and again.n_computed == 0 and again.n_skipped == first.n_heads
    cfg2 = load_config(None, {"warehouse": cfg.warehouse, "max_workers": 1, "attention": False})
    redo = analyze_dataset(cfg2, small_dataset, progress=False, resume=False)
    assert redo.n_computed == first.n_heads
    assert all_results(cfg, first) == before  # replaced, not duplicated
    (n_runs,), = fetch(cfg, "SELECT count(*) FROM runs")
    assert n_runs == 1


def test_same_seed_same_bits_across_workers_and_threads(small_dataset, tmp_path):
    cfg1, s1 = run(small_dataset, tmp_path, "one", max_workers=1, duckdb_threads=1)
    cfg2, s2 = run(small_dataset, tmp_path, "two", max_workers=2, duckdb_threads=2)
    assert s1.run_id == s2.run_id
    r1, r2 = all_results(cfg1, s1), all_results(cfg2, s2)
    for table in r1:
        assert len(r1[table]) == len(r2[table]) > 0
        for a, b in zip(r1[table], r2[table]):
            assert all((x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)), table


def test_other_seed_changes_pairs_but_not_regression(small_dataset, tmp_path):
    cfg0, s0 = run(small_dataset, tmp_path, "s0", seed=0)
    cfg1, s1 = run(small_dataset, tmp_path, "s1", seed=1)
    assert s0.run_id != s1.run_id
    a = fetch(cfg0, "SELECT q_R2_pos, ap_overall FROM head_metrics ORDER BY layer, q_head")
    b = fetch(cfg1, "SELECT q_R2_pos, ap_overall FROM head_metrics ORDER BY layer, q_head")
    assert [x[0] for x in a] == [x[0] for x in b]  # all rows used: regression identical
    assert [x[1] for x in a] != [x[1] for x in b]  # pair sampling depends on the seed


def test_subsample_cap_is_respected_and_deterministic(small_dataset, tmp_path):
    cfg, s = run(small_dataset, tmp_path, "cap", max_tokens_per_head=500)
    rows = fetch(cfg, "SELECT n_q_tokens, n_k_tokens FROM head_metrics")
    assert rows and all(n_q == 500 and n_k == 500 for n_q, n_k in rows)
    cfg2, s2 = run(small_dataset, tmp_path, "cap2", max_tokens_per_head=500, duckdb_threads=2)
    assert all_results(cfg, s) == all_results(cfg2, s2)


def test_linear_diag_estimator_recorded(small_dataset, tmp_path):
    cfg, s = run(small_dataset, tmp_path, "ld", estimator="linear_diag")
    rows = fetch(cfg, "SELECT estimator, ap_overall FROM head_metrics")
    assert rows and all(e == "linear_diag" and 0 <= ap <= 1 for e, ap in rows)


def test_catalog_lists_every_shard_profiled_when_only_some_layers_run(small_dataset, tmp_path):
    # shards are profiled as their groups are submitted and the rest while the workers compute;
    # the catalog must still hold every shard, profiled exactly as the SQL definition says
    from warehouse.sources.catalog import ShardInfo, find_shards
    from warehouse.sources.shard_profile import profile_shard_sql

    cfg, summary = run(small_dataset, tmp_path, "part", max_workers=2, layers=[1])
    assert summary.n_done == 4 and summary.n_errors == 0
    got = {r[0]: r[1:] for r in fetch(
        cfg, "SELECT path, n_rows, dim, sliding_window, n_examples, n_buckets, min_position, max_position "
             "FROM shards WHERE model = $m", {"m": summary.model})}
    shards = find_shards(small_dataset)
    assert len(got) == len(shards) == 2 * (4 + 2)
    con = db.memory_connection()
    try:
        for info in shards:
            ref = profile_shard_sql(con, ShardInfo(info.layer, info.head, info.kind, info.path))
            row = ref.row()
            assert got[info.path] == (row["n_rows"], row["dim"], row["sliding_window"], row["n_examples"],
                                      row["n_buckets"], row["min_position"], row["max_position"]), info.path
            assert row["n_rows"] == 8 * 256 and row["dim"] == 8
            stored = fetch(
                cfg, "SELECT bucket, n_rows, min_position, max_position, mean_position FROM shard_buckets "
                     "WHERE model = $m AND layer = $l AND head = $h AND kind = $k ORDER BY bucket",
                {"m": summary.model, "l": info.layer, "h": info.head, "k": info.kind})
            assert stored == [(b.bucket, b.n_rows, b.min_position, b.max_position, b.mean_position)
                              for b in ref.buckets], info.path
            assert len(stored) == row["n_buckets"] > 1
    finally:
        con.close()


def test_workers_do_not_rerun_the_parents_main_module(small_dataset, tmp_path):
    # Spawned workers would otherwise import the parent's __main__ (Dagster's or pytest's command
    # line in practice); here a main script that leaves a mark each time it is imported.
    import subprocess
    import sys
    from pathlib import Path

    marks = tmp_path / "imports.txt"
    script = tmp_path / "main_script.py"
    repo = Path(__file__).resolve().parent.parent
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        f"open({str(marks)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "from warehouse.settings.config import load_config\n"
        "from warehouse.run.pipeline import analyze_dataset\n"
        "if __name__ == '__main__':\n"
        f"    cfg = load_config(None, {{'warehouse': {str(tmp_path / 'w.duckdb')!r}, 'max_workers': 2, 'attention': False}})\n"
        f"    s = analyze_dataset(cfg, {str(small_dataset)!r}, model='m', progress=False)\n"
        "    assert s.n_done == s.n_heads and not s.n_errors, s\n"
        "    assert __file__ == sys.argv[0] and __spec__ is None  # the parent's own module is restored\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert len(marks.read_text().split()) == 1  # imported by the parent only
