"""The per-head profiler of benchmarks/ runs on a small generated shape and its figures add up."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_profile_head_stages_add_up_to_the_head(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_head.py"), "--shape", "first", "--layers", "2",
         "--q-heads", "4", "--k-heads", "2", "--dim", "16", "--rows", "1500", "--buckets", "8",
         "--groups", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    head = re.search(r"first: (\d+) heads \((\d+) groups\), CPU per head ([\d.]+) ms", out)
    assert head, out
    assert (int(head[1]), int(head[2])) == (4, 2)  # 2 groups of 2 query heads after the warm-up group
    rows = {m[1].strip(): (float(m[2]), float(m[3]))
            for m in re.finditer(r"^ {2,}(\S.*?)\s+(-?[\d.]+) ms\s+(-?[\d.]+)%$", out, re.M)}
    top = ["load: key shard + orientation sums (share of the group)", "load: query shard", "analyze_head"]
    assert sum(rows[k][0] for k in top) == _approx(float(head[3]))
    assert sum(rows[k][1] for k in top) == _approx(100.0, 0.2)
    stages = ["canonical order (q and k)", "oriented queries X_q (float64 copy)", "position regression",
              "rotated query pass (bucket covariances)", "scalar predictability",
              "first-component normality", "semantic normality + KS", "example groups (jackknife)",
              "pair plasticity", "aggregation", "example jackknife: query side and replicates",
              "bucket summary", "other (small steps, result assembly)"]
    assert sum(rows[k][0] for k in stages) == _approx(rows["analyze_head"][0], 0.6)
    pair_parts = ["pair draws", "AP and its slopes (with the jackknife)", "pair side of the jackknife (syrk)"]
    assert sum(rows[k][0] for k in pair_parts) <= rows["pair plasticity"][0] + 0.2
    jk_parts = ["query quadratic forms (trmm)", "per-run sums of the queries"]
    assert sum(rows[k][0] for k in jk_parts) <= rows["example jackknife: query side and replicates"][0] + 0.2
    assert all(rows[k][0] > 0 for k in ("rotated query pass (bucket covariances)", "pair plasticity",
                                        "example jackknife: query side and replicates"))
    floors = re.findall(r"^  (Arrow decode|quadratic forms|bucket covariances|KS sort).*?([\d.]+) ms$", out, re.M)
    assert [f[0] for f in floors] == ["Arrow decode", "quadratic forms", "bucket covariances", "KS sort"], out


def test_worker_memory_reports_each_step_of_a_worker(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "worker_memory.py"), "--shape", "first", "--layers", "2",
         "--q-heads", "4", "--k-heads", "2", "--dim", "16", "--rows", "1500", "--buckets", "8",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = re.findall(r"^  (\S.*?)\s+([\d.]+)(?: +([+-][\d.]+))?\s+([\d.]+)(?: +([+-][\d.]+))?"
                      r"\s+([\d.]+)(?: +([+-][\d.]+))?\s+([\d.]+)$", out, re.M)
    labels = [r[0] for r in rows]
    # the per-head analysis runs numba kernels: a worker's warm-up imports numba and loads them
    assert labels == ["interpreter", "analysis code imported (a worker's warm-up)", "GQA group 1 analysed (2 heads)",
                      "GQA group 2 analysed (2 heads)", "numba imported (already, by the analysis)", labels[-1]], out
    assert labels[-1].startswith("a ") and "numba kernel" in labels[-1]
    vm, anon, file_, hwm = ([float(r[i]) for r in rows] for i in (1, 3, 5, 7))
    for i in range(len(rows)):
        assert anon[i] + file_[i] <= vm[i] + 0.2 <= hwm[i] + 0.4  # VmRSS = anon + file (+ shmem) <= its peak
        if i:
            assert float(rows[i][2]) == _approx(vm[i] - vm[i - 1], 0.15)  # the printed change is the change
    assert abs(vm[4] - vm[3]) < 1  # numba was already there: importing it again costs nothing


def _approx(value, abs_tol=0.35):
    import pytest

    return pytest.approx(value, abs=abs_tol)  # each printed figure is rounded to 0.1 ms


def _snapshot(path: Path, run_id: str, tables: dict, columns: dict) -> Path:
    import pickle

    path.mkdir()
    (path / "snapshot.pkl").write_bytes(pickle.dumps({"s": {"run_id": run_id, "tables": tables, "columns": columns}}))
    return path


def test_compare_results_matches_columns_by_name(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compare_results
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    before = _snapshot(tmp_path / "a", "r1", {"head_metrics": [(0, 0, 0.5, 0.01)]},
                       {"head_metrics": ["layer", "q_head", "ap_overall", "ap_overall_se"]})
    after = _snapshot(tmp_path / "b", "r2", {"head_metrics": [(0, 0, 0.5, 0.03, 0.01)], "head_bucket_summary": [(1,)]},
                      {"head_metrics": ["layer", "q_head", "ap_overall", "ap_overall_se", "ap_overall_se_pairs"],
                       "head_bucket_summary": ["q_bucket"]})
    assert compare_results.compare(before, after) == 1  # run id and the redefined column differ
    assert compare_results.compare(before, after, ignore=("ap_overall_se",), ignore_run_id=True) == 0
    assert compare_results.compare(before, after, ignore_run_id=True,
                                   rename={"ap_overall_se": "ap_overall_se_pairs"}) == 0
    out = capsys.readouterr().out
    assert "head_metrics.ap_overall_se_pairs only after" in out and "table head_bucket_summary only after" in out
    changed = _snapshot(tmp_path / "c", "r2", {"head_metrics": [(0, 0, 0.5000001, 0.03, 0.01)]},
                        {"head_metrics": ["layer", "q_head", "ap_overall", "ap_overall_se", "ap_overall_se_pairs"]})
    assert compare_results.compare(before, changed, ignore=("ap_overall_se",), ignore_run_id=True) == 1
    assert compare_results.compare(before, changed, rtol=1e-6, ignore=("ap_overall_se",), ignore_run_id=True) == 0


def test_no_inverse_probability_estimate_earns_its_standard_error():
    """On the sparse tiny-llama capture, inverse-probability (HT) weights make entropy
    worse, cannot change the near-key mass (1/pi cancels in the ratio), and where they bring a sum
    closer to the truth the result is still many standard errors off in most heads -- so none is
    offered as an estimate with a standard error (README, Attention)."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ht_sparse_study import PI_CARD, study

    df, pis = study()
    assert abs(np.mean(pis) - PI_CARD) < 0.01  # the shards agree with the card's sampler
    by = {name: g for name, g in df.groupby("quantity")}
    assert len(df) == 18 * len(by)
    for name in ("mean_entropy", "mean_entropy_ratio", "local_bias_ratio"):  # HT further from the truth
        assert by[name].err_ht.mean() > by[name].err_unc.mean(), name
    np.testing.assert_allclose(by["near_mass_frac"].ht, by["near_mass_frac"].uncorrected, rtol=1e-12)
    for name in ("mean_log_normaliser", "local_attn_near", "local_attn_far", "row_std"):  # closer, not calibrated
        g = by[name]
        assert (g.err_ht < g.err_unc).all(), name
        assert (g.z.abs() <= 2).sum() <= 10, name  # a calibrated SE would cover ~17 of 18


def test_run_benchmark_times_the_first_head_and_the_steady_rate():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run_benchmark
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # 4 s of start-up, then the 10th head at 4.9 s and one head every 0.1 s: 10 heads/s
    done_at = [4.0 + 0.1 * i for i in range(40)]
    timing = run_benchmark.outcome_timing(done_at)
    assert timing["first_head_s"] == 4.0
    assert timing["steady_heads_per_s"] == _approx(10.0, 1e-9)
    short = run_benchmark.outcome_timing([1.0, 2.0])  # too few heads for a steady rate
    assert short["first_head_s"] == 1.0 and math.isnan(short["steady_heads_per_s"])


def test_hub_benchmark_writes_its_figures_and_finds_the_streamed_run_identical(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hub_benchmark.py"), "--out", str(tmp_path), "--layers", "2",
         "--q-heads", "2", "--k-heads", "1", "--rows", "600", "--dim", "8", "--rate-mb-s", "20",
         "--budget-gb", "0.0001", "--workers", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    (written,) = tmp_path.glob("hub-benchmark-*.json")
    result = json.loads(written.read_text())
    for key in ("wall_s", "download_only_s", "compute_only_s", "peak_disk_bytes", "disk_budget_bytes"):
        assert result[key] > 0, key
    assert result["identical_to_local"] is True and result["differing_tables"] == []
    assert result["disk_budget_bytes"] == 100_000 and 0 < result["peak_disk_bytes"] <= 100_000
    # the stream's account: the dataset's bytes once, within the budget; the tools' CPU reported apart
    assert result["stream"]["downloaded_bytes"] == result["dataset_bytes"]
    assert 0 < result["stream"]["peak_held_bytes"] <= 100_000
    assert result["server_cpu_s"]["streamed"] >= 0 and result["disk_sampler_cpu_s"] >= 0
    assert '"identical_to_local": true' in out.stdout
