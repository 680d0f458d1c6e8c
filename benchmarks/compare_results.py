"""Bit-for-bit regression check of the analysis across code changes.

    # with the old code on the path, record a snapshot
    PYTHONPATH=/path/to/old/tree python benchmarks/compare_results.py snapshot benchmarks/out/before
    # with the new code, record another and compare
    python benchmarks/compare_results.py snapshot benchmarks/out/after
    python benchmarks/compare_results.py compare benchmarks/out/before benchmarks/out/after

The snapshot analyses a few small synthetic datasets that exercise every code
path the performance work touches (all rows and the subsample, streamed key
orientation, sliding windows, both estimators, several workers, the attention
tables) and stores every result table row by row. `compare` demands that
every value is identical (NaN equals NaN), not merely close; with ``--rtol`` it accepts
floats within that relative difference (for changes that only reorder rounding) and
reports the largest difference it saw.

Columns are matched by name. A change that redefines a column or adds columns and tables says so:

    python benchmarks/compare_results.py compare before after --rename ap_overall_se=ap_overall_se_pairs \
        --ignore-run-id

compares every column bit for bit, the renamed one with its new name, lists columns and tables
present on one side only (without failing), and accepts a different run id (which a new
``plasticity.ANALYSIS_VERSION`` makes); ``--ignore COLUMN`` leaves a column out. Snapshots written before column names were stored take them from the warehouse files
saved beside ``snapshot.pkl``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import sys
import time
from pathlib import Path

# (name, synthetic spec kwargs, config overrides)
SCENARIOS = [
    ("small_all_rows", dict(model="snap-a", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8,
                            num_examples=8, seq_len=256, bucket_size=32, sliding_windows={1: 64}, seed=3),
     {"max_workers": 1, "attention": True}),
    ("small_two_workers", dict(model="snap-a", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8,
                               num_examples=8, seq_len=256, bucket_size=32, sliding_windows={1: 64}, seed=3),
     {"max_workers": 2, "attention": False}),
    ("subsample", dict(model="snap-b", num_layers=2, num_q_heads=6, num_k_heads=2, head_dim=32,
                       num_examples=12, seq_len=1024, bucket_size=64, capture_fraction=0.6,
                       sliding_windows={1: 200}, seed=5),
     {"max_workers": 2, "attention": False, "max_tokens_per_head": 3000}),
    ("linear_diag", dict(model="snap-b", num_layers=2, num_q_heads=6, num_k_heads=2, head_dim=32,
                         num_examples=12, seq_len=1024, bucket_size=64, capture_fraction=0.6,
                         sliding_windows={1: 200}, seed=5),
     {"max_workers": 1, "attention": False, "estimator": "linear_diag", "max_tokens_per_head": 5000}),
    ("shuffled_rows", dict(model="snap-d", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=16,
                           num_examples=10, seq_len=512, bucket_size=64, capture_fraction=0.7,
                           sliding_windows={0: 128}, seed=13),
     {"max_workers": 2, "attention": False, "max_tokens_per_head": 2500, "_shuffle": True}),
    ("shuffled_all_rows", dict(model="snap-d", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=16,
                               num_examples=10, seq_len=512, bucket_size=64, capture_fraction=0.7,
                               sliding_windows={0: 128}, seed=13),
     {"max_workers": 1, "attention": True, "_shuffle": True}),
    ("wide", dict(model="snap-c", num_layers=1, num_q_heads=4, num_k_heads=1, head_dim=128,
                  num_examples=4, seq_len=2048, bucket_size=128, capture_fraction=0.8, sliding_windows={}, seed=7),
     {"max_workers": 2, "attention": False}),
    # the real trained model of tests/fixtures/tiny-llama: dense and sparse (1/8) captures
    ("tinyllama_dense", "dense/tinyllama", {"max_workers": 1, "attention": True}),
    ("tinyllama_sparse", "sparse/tinyllama_sparse", {"max_workers": 1, "attention": True}),
]
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-llama"

TABLES = ("head_metrics", "head_bucket_plasticity", "head_bucket_summary", "head_component_weights", "head_errors",
          "token_attention", "head_attention_summary", "query_scale_sweep")
EXCLUDED = {"head_errors": ("model", "run_id", "recorded_at")}


def snapshot(out: Path, data_dir: Path) -> dict:
    from plasticity.synthetic import SyntheticSpec
    from warehouse.store import db
    from warehouse.settings.config import load_config
    from warehouse.sources.demo_data import write_synthetic_dataset
    from warehouse.run.pipeline import analyze_dataset

    out.mkdir(parents=True, exist_ok=True)
    snap = {}
    for name, spec_kw, overrides in SCENARIOS:
        overrides = dict(overrides)
        shuffle = overrides.pop("_shuffle", False)
        if isinstance(spec_kw, str):  # a dataset of the repository's fixtures
            root = FIXTURE / spec_kw
        else:
            key = hashlib.sha1(repr((sorted(spec_kw.items()), shuffle)).encode()).hexdigest()[:10]
            root = data_dir / spec_kw["model"] / key
        if not (root / "README.md").exists():
            write_synthetic_dataset(root, SyntheticSpec(**spec_kw), with_truth=False)
            if shuffle:  # rows in no particular order, as a sniffer writing several batches may leave them
                import numpy as np
                import pyarrow.parquet as pq

                for i, path in enumerate(sorted(root.glob("l*h*[qk]/data.parquet"))):
                    t = pq.read_table(path)
                    pq.write_table(t.take(np.random.default_rng(i).permutation(t.num_rows)), path, row_group_size=700)
        wh = out / f"{name}.duckdb"
        for p in (wh, Path(str(wh) + ".wal")):
            p.unlink(missing_ok=True)
        cfg = load_config(None, {"warehouse": str(wh), **overrides})
        t0 = time.perf_counter()
        s = analyze_dataset(cfg, root, progress=False)
        dt = time.perf_counter() - t0
        tables, columns = {}, {}
        with db.reader(wh) as con:
            for t in TABLES:
                excluded = ", ".join(EXCLUDED.get(t, ("model", "run_id")))
                cur = con.execute(f"SELECT * EXCLUDE ({excluded}) FROM {t} ORDER BY ALL")
                columns[t] = [c[0] for c in cur.description]
                tables[t] = cur.fetchall()
        snap[name] = {"run_id": s.run_id, "tables": tables, "columns": columns}
        print(f"{name}: {s.n_done} heads, {s.n_errors} errors, {dt:.2f}s, "
              + ", ".join(f"{t}={len(r)}" for t, r in tables.items() if r))
    with open(out / "snapshot.pkl", "wb") as fh:
        pickle.dump(snap, fh)
    return snap


def snapshot_warehouses(out: Path, warehouses: list[Path]) -> dict:
    """A snapshot of warehouses written elsewhere (`run_benchmark.py`, `plasticity demo`): every table of
    each, one scenario per file named by its stem (files of one model and run id each)."""
    from warehouse.store import db

    out.mkdir(parents=True, exist_ok=True)
    snap = {}
    for wh in warehouses:
        tables, columns = {}, {}
        with db.reader(str(wh)) as con:
            run_ids = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM head_metrics").fetchall()}
            for t in TABLES:
                excluded = ", ".join(EXCLUDED.get(t, ("model", "run_id")))
                cur = con.execute(f"SELECT * EXCLUDE ({excluded}) FROM {t} ORDER BY ALL")
                columns[t] = [c[0] for c in cur.description]
                tables[t] = cur.fetchall()
        snap[wh.stem] = {"run_id": ",".join(sorted(run_ids)), "tables": tables, "columns": columns}
        print(f"{wh.stem}: " + ", ".join(f"{t}={len(r)}" for t, r in tables.items() if r))
    with open(out / "snapshot.pkl", "wb") as fh:
        pickle.dump(snap, fh)
    return snap


def _rel_diff(x, y) -> float:
    """0 for identical values (NaN equals NaN), the relative difference of two finite floats, inf otherwise."""
    if isinstance(x, float) and isinstance(y, float):
        if (math.isnan(x) and math.isnan(y)) or x == y:
            return 0.0
        if math.isfinite(x) and math.isfinite(y):
            return abs(x - y) / max(abs(x), abs(y))
        return math.inf
    return 0.0 if (type(x) is type(y) and x == y) else math.inf


def _columns(snap_dir: Path, scenario: dict, name: str) -> dict[str, list[str]]:
    """Column names of every table of a scenario: stored in the snapshot, or (older snapshots) read
    from the scenario's warehouse file beside it, in the order the snapshot selected them."""
    if "columns" in scenario:
        return scenario["columns"]
    import duckdb

    out = {}
    con = duckdb.connect(str(snap_dir / f"{name}.duckdb"), read_only=True)
    try:
        for t in scenario["tables"]:
            excluded = set(EXCLUDED.get(t, ("model", "run_id")))
            cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = $t "
                                              "ORDER BY column_index", {"t": t}).fetchall()]
            out[t] = [c for c in cols if c not in excluded]
    finally:
        con.close()
    return out


def compare(a_dir: Path, b_dir: Path, rtol: float = 0.0, ignore: tuple[str, ...] = (), ignore_run_id: bool = False,
            rename: dict[str, str] | None = None) -> int:
    """Every value of the columns both sides have identical (``rtol`` 0), or floats within ``rtol``
    relative to each other; columns named in ``ignore`` are skipped, a column ``c`` before is compared
    with ``rename[c]`` after."""
    rename = rename or {}
    a = pickle.loads((a_dir / "snapshot.pkl").read_bytes())
    b = pickle.loads((b_dir / "snapshot.pkl").read_bytes())
    bad = 0
    n_values = 0
    n_changed = 0
    worst = 0.0
    per_column: dict[tuple[str, str], float] = {}  # largest relative difference of each changed column
    notes = set()
    for name in a:
        if a[name]["run_id"] != b[name]["run_id"]:
            if ignore_run_id:
                notes.add("run ids differ (accepted)")
            else:
                print(f"{name}: run_id differs {a[name]['run_id']} != {b[name]['run_id']}")
                bad += 1
        cols_a, cols_b = _columns(a_dir, a[name], name), _columns(b_dir, b[name], name)
        for t in sorted(set(b[name]["tables"]) - set(a[name]["tables"])):
            notes.add(f"table {t} only after ({len(b[name]['tables'][t])} rows in {name})" if b[name]["tables"][t]
                      else f"table {t} only after")
        for t, rows in a[name]["tables"].items():
            if t not in b[name]["tables"]:
                print(f"{name}.{t}: table missing after")
                bad += 1
                continue
            other = b[name]["tables"][t]
            if len(rows) != len(other):
                print(f"{name}.{t}: {len(rows)} rows before, {len(other)} after")
                bad += 1
                continue
            after_of = {c: rename.get(c, c) for c in cols_a[t]}
            for c in sorted(set(cols_a[t]) - {c for c in cols_a[t] if after_of[c] in cols_b[t]}):
                notes.add(f"{t}.{c} only before")
            for c in sorted(set(cols_b[t]) - set(after_of.values())):
                notes.add(f"{t}.{c} only after")
            shared = [c for c in cols_a[t] if after_of[c] in cols_b[t] and c not in ignore]
            ia = [cols_a[t].index(c) for c in shared]
            ib = [cols_b[t].index(after_of[c]) for c in shared]
            # rows are sorted by all columns; the key columns come first, so both sides align
            for ra, rb in zip(rows, other):
                diffs = [_rel_diff(ra[i], rb[j]) for i, j in zip(ia, ib)]
                n_values += len(diffs)
                n_changed += sum(1 for x in diffs if x > 0)
                worst = max([worst, *diffs])
                for c, x in zip(shared, diffs):
                    if x > 0:
                        per_column[(t, c)] = max(per_column.get((t, c), 0.0), x)
                if max(diffs, default=0.0) > rtol:
                    print(f"{name}.{t}: row differs in {[c for c, x in zip(shared, diffs) if x > rtol]}\n"
                          f"  before {ra}\n  after  {rb}")
                    bad += 1
                    break
    for (t, c), x in sorted(per_column.items()):
        print(f"largest relative difference {t}.{c}: {x:.2e}")
    for note in sorted(notes):
        print(f"note: {note}")
    if ignore:
        print(f"not compared: {', '.join(ignore)}")
    for old, new in rename.items():
        print(f"compared {old} before with {new} after")
    verdict = "IDENTICAL" if not n_changed else (f"{n_changed} value(s) differ, largest relative difference "
                                                  f"{worst:.2e} (rtol {rtol:g})")
    print(f"compared {n_values} values in {len(a)} scenarios: {verdict}" + (f"; {bad} FAILED" if bad else ""))
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("out", type=Path)
    s.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "out" / "snapshot-data")
    s.add_argument("--warehouse", type=Path, nargs="+", metavar="FILE",
                   help="snapshot these warehouse files (one scenario each, named by the file) instead of "
                        "running the scenarios")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--rtol", type=float, default=0.0,
                   help="accept floats within this relative difference (default 0: bit for bit)")
    c.add_argument("--ignore", nargs="*", default=[], metavar="COLUMN",
                   help="columns not to compare (e.g. a column whose definition the change altered)")
    c.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW",
                   help="compare column OLD before with column NEW after")
    c.add_argument("--ignore-run-id", action="store_true",
                   help="accept different run ids (a new plasticity.ANALYSIS_VERSION changes them)")
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        if args.warehouse:
            snapshot_warehouses(args.out, args.warehouse)
        else:
            snapshot(args.out, args.data)
        return 0
    rename = dict(r.split("=", 1) for r in args.rename)
    return compare(args.before, args.after, args.rtol, tuple(args.ignore), args.ignore_run_id, rename)


if __name__ == "__main__":
    sys.exit(main())
