"""Second, independent witnesses for behaviours that only one other test defended: each test here
reaches the behaviour by another path than its first witness (the pipeline instead of the pure
function, the command line instead of the library, a file lock instead of an error message).

- the standardisation (n - 1 degrees of freedom) of the first positional component and of the
  semantic components, seen in the stored KS p-values against scipy on rows read with pyarrow;
- the uniform component weights of a head whose positions do not vary, through the pipeline;
- the CSV row order of `plasticity export` on twelve query heads (numeric, not text order);
- several warehouse files attached read-only (another process can open one while it is attached);
- Python variables never scanned as tables in the multi-file sandbox;
- one model in two warehouse files refused by `plasticity sql`;
- every error category of a damaged shard, several per dataset, in the exported head_errors.csv."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from cli.main import main
from plasticity.rotation import householder_matrix
from plasticity.synthetic import SyntheticSpec
from plasticity.types import TokenArrays
from warehouse.store import db
from warehouse.store import sandbox
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_shard, write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset
from wiring_reference import brute_force_orientation, read_rows, shard_path

DATA = SyntheticSpec(model="witness", num_layers=1, num_q_heads=12, num_k_heads=2, head_dim=8, num_examples=3,
                     seq_len=96, bucket_size=32, sliding_windows={}, seed=21)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The dataset analysed and exported through the command line (every row used: no cap)."""
    tmp = tmp_path_factory.mktemp("witness")
    root = write_synthetic_dataset(tmp / DATA.model, DATA, with_truth=False)
    wh = tmp / "wh.duckdb"
    assert main(["analyze", "--dataset_local_root", str(root), "--warehouse", str(wh), "--max_workers", "1",
                 "--attention", "false", "--output_dir", str(tmp / "results"), "--quiet"]) == 0
    assert main(["export", "--model", DATA.model, "--warehouse", str(wh), "--out", str(tmp / "csv")]) == 0
    with db.reader(wh) as con:
        cur = con.execute("SELECT * FROM head_metrics")
        names = [c[0] for c in cur.description]
        metrics = {(r["layer"], r["q_head"]): r for r in (dict(zip(names, row)) for row in cur.fetchall())}
    return root, wh, tmp / "csv", metrics


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def test_stored_ks_p_values_are_scipys_on_rows_standardised_with_n_minus_1(analysed):
    """The positional component's residual and each semantic component, standardised by the
    sample standard deviation (n - 1), then scipy's KS test: the stored p-values to 1e-9. With n
    in the denominator every p-value moves by far more than that."""
    root, _, _, metrics = analysed
    group = DATA.num_q_heads // DATA.num_k_heads
    moved = 0.0
    for q_head in (0, 7):
        q = read_rows(shard_path(root, 0, q_head, "q"))
        k = read_rows(shard_path(root, 0, q_head // group, "k"))
        X = q.vectors.astype(np.float64) * brute_force_orientation(k.bucket, k.vectors)
        p = q.position
        design = np.column_stack([np.ones_like(p), p])
        coef, *_ = np.linalg.lstsq(design, X, rcond=None)
        beta = coef[1]
        x0 = X @ (beta / np.linalg.norm(beta))
        fit = stats.linregress(p, x0)
        r = x0 - fit.intercept - fit.slope * p
        semantic = (X @ householder_matrix(beta))[:, 1:]
        stored = metrics[(0, q_head)]
        assert stored["n_q_tokens"] == q.n and semantic.shape[1] == DATA.head_dim - 1 <= 64  # all tested
        assert stored["q_resid0_ks_p"] == pytest.approx(stats.kstest(standardised(r), "norm").pvalue, rel=1e-9)
        med = np.median([stats.kstest(standardised(c), "norm").pvalue for c in semantic.T])
        assert stored["q_noise_med_ks_p"] == pytest.approx(med, rel=1e-9)
        by_n = stats.kstest((r - r.mean()) / r.std(ddof=0), "norm").pvalue
        moved = max(moved, abs(by_n / stored["q_resid0_ks_p"] - 1.0))
    assert moved > 1e-6  # precondition: the other convention would be seen


def test_a_head_whose_positions_do_not_vary_gets_uniform_component_weights(tmp_path):
    """Every query at one position: no component has positional information, and the stored
    weights are 1/d each (the documented fallback), not NaN nor zero."""
    rng = np.random.default_rng(4)
    n, d = 60, 6
    ex = np.arange(n, dtype=np.int64)
    q = TokenArrays(np.zeros(n, np.int64), ex, np.full(n, 5.0), rng.normal(size=(n, d)).astype(np.float32))
    k_pos = np.tile(np.arange(6.0), n)
    k = TokenArrays(np.zeros(6 * n, np.int64), np.repeat(ex, 6), k_pos, rng.normal(size=(6 * n, d)).astype(np.float32))
    write_shard(tmp_path / "flat", 0, 0, "q", q)
    write_shard(tmp_path / "flat", 0, 0, "k", k)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "flat", "num_layers": 1, "num_q_heads": 1, "num_k_heads": 1})
    summary = analyze_dataset(cfg, tmp_path / "flat", progress=False)
    assert summary.n_done == 1, summary
    with db.reader(cfg.warehouse) as con:
        rows = con.execute("SELECT component, component_r2, weight FROM head_component_weights ORDER BY component"
                           ).fetchall()
        (r2_pos,) = con.execute("SELECT q_R2_pos FROM head_metrics").fetchone()
    assert r2_pos == 0.0
    assert [c for c, _, _ in rows] == list(range(d))
    assert all(r2 == 0.0 for _, r2, _ in rows)
    assert [w for _, _, w in rows] == [1.0 / d] * d


def test_export_orders_rows_by_layer_and_head_as_numbers(analysed):
    """Twelve query heads: text order would put head 10 before head 2."""
    _, _, out, _ = analysed
    with open(out / "head_metrics.csv") as fh:
        heads = [(int(r["layer"]), int(r["q_head"])) for r in csv.DictReader(fh)]
    assert heads == [(0, h) for h in range(12)]
    with open(out / "head_bucket_plasticity.csv") as fh:
        cells = [(int(r["layer"]), int(r["q_head"]), int(r["q_bucket"]), int(r["k_bucket"])) for r in csv.DictReader(fh)]
    assert cells == sorted(cells) and len(set(cells)) == len(cells) and {c[1] for c in cells} == set(range(12))
    with open(out / "head_component_weights.csv") as fh:
        comps = [(int(r["layer"]), int(r["q_head"]), int(r["component"])) for r in csv.DictReader(fh)]
    assert comps == sorted(comps) and len(comps) == 12 * DATA.head_dim


# --------------------------------------------------------------------------- several warehouse files

def two_warehouses(tmp_path: Path, models=("ma", "mb")) -> tuple[Path, Path]:
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    for path, model in zip((a, b), models):
        db.ensure_schema(path)
        with db.writer(path) as con:
            con.execute("INSERT INTO runs (run_id, model) VALUES ('r', $m)", {"m": model})
    return a, b


def test_attached_files_stay_open_to_other_readers(tmp_path):
    """Attached read-only, a file takes a shared lock: another process opens it read-only while the
    union is open (a read-write attach would lock it against every other process)."""
    a, b = two_warehouses(tmp_path)
    probe = ("import duckdb, sys\n"
             "con = duckdb.connect(sys.argv[1], read_only=True)\n"
             "print(con.execute('SELECT model FROM runs').fetchone()[0])\n")
    with sandbox.sandbox([a, b]) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
        done = subprocess.run([sys.executable, "-c", probe, str(b)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "mb", done.stderr


def test_python_variables_are_not_tables_in_the_multi_file_sandbox(tmp_path, capsys):
    """Through `plasticity sql` on one and on two files: DuckDB reports Python replacement scans
    off, and a DataFrame or Arrow table in the caller's frame is no table."""
    import pandas as pd
    import pyarrow as pa

    a, b = two_warehouses(tmp_path)
    for files in ([a], [a, b]):
        flags = [arg for f in files for arg in ("--warehouse", str(f))]
        assert main(["sql", "SELECT current_setting('python_enable_replacements') AS v", *flags, "--csv"]) == 0
        assert capsys.readouterr().out.splitlines() == ["v", "False"]
        with sandbox.sandbox(files) as con:
            hidden_frame = pd.DataFrame({"x": ["TOPSECRET"]})
            hidden_table = pa.table({"x": ["TOPSECRET"]})
            assert len(hidden_frame) == hidden_table.num_rows == 1
            for name in ("hidden_frame", "hidden_table"):
                with pytest.raises(Exception, match=f"{name} does not exist"):
                    con.execute(f"SELECT * FROM {name}")


def test_one_model_in_two_files_is_refused_by_the_sql_command(tmp_path, capsys):
    a, b = two_warehouses(tmp_path, models=("same", "same"))
    code = main(["sql", "SELECT count(*) FROM runs", "--warehouse", str(a), "--warehouse", str(b)])
    err = capsys.readouterr().err
    assert code == 2 and "same" in err and "a.duckdb" in err and "b.duckdb" in err
    c, d = two_warehouses(tmp_path / "ok", models=("one", "two"))
    assert main(["sql", "SELECT count(*) AS n FROM runs", "--warehouse", str(c), "--warehouse", str(d), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "2"]


# --------------------------------------------------------------------------- error categories

def _disjoint_runs(cases) -> list[list]:
    """The damage cases of test_bad_input dealt into as few runs as possible: within a run no two
    cases touch the same shard or fail the same head (a damaged key shard fails all its heads)."""
    runs: list[list] = []
    for case in cases:
        _, target, _, _, failing = case
        for run in runs:
            failed = set().union(*(c[4] for c in run))
            if not (failing & failed) and target not in {c[1] for c in run}:
                run.append(case)
                break
        else:
            runs.append([case])
    return runs


def _error_runs():
    from test_bad_input import CASES

    # every case but the one that removes the dataset card (it changes every head's buckets)
    return _disjoint_runs([c for c in CASES if c[0] != "buckets_out_of_order"])


@pytest.mark.parametrize("cases", _error_runs(), ids=lambda cases: "+".join(c[0] for c in cases))
def test_each_error_category_reaches_the_exported_head_errors(cases, small_copy, tmp_path):
    """Several damaged shards in one dataset, analysed by the command line: head_errors.csv names
    each failing head's category (the other witness runs one damage per dataset, in the library)."""
    from test_bad_input import shard

    expected = {}
    for _, target, damage, problem, failing in cases:
        damage(shard(small_copy, *target))
        expected.update({head: problem for head in failing})
    out = tmp_path / "results"
    assert main(["analyze", "--dataset_local_root", str(small_copy), "--warehouse", str(tmp_path / "wh.duckdb"),
                 "--model", "m", "--max_workers", "1", "--attention", "false", "--output_dir", str(out),
                 "--quiet"]) in (0, 1)
    (errors_csv,) = out.glob("m/*/head_errors.csv")
    with open(errors_csv) as fh:
        got = {(int(r["layer"]), int(r["q_head"])): r["problem"] for r in csv.DictReader(fh)}
    assert got == expected
