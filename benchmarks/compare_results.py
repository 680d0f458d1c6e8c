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

TABLES = ("head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors",
          "token_attention", "head_attention_summary", "query_scale_sweep")


def snapshot(out: Path, data_dir: Path) -> dict:
    from plasticity.synthetic import SyntheticSpec
    from warehouse import db
    from warehouse.config import load_config
    from warehouse.demo_data import write_synthetic_dataset
    from warehouse.pipeline import analyze_dataset

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
                cols = "* EXCLUDE (model, run_id, recorded_at)" if t == "head_errors" else "* EXCLUDE (model, run_id)"
                cur = con.execute(f"SELECT {cols} FROM {t} ORDER BY ALL")
                tables[t] = cur.fetchall()
                columns[t] = [d[0] for d in cur.description]
        snap[name] = {"run_id": s.run_id, "tables": tables, "columns": columns}
        print(f"{name}: {s.n_done} heads, {s.n_errors} errors, {dt:.2f}s, "
              + ", ".join(f"{t}={len(r)}" for t, r in tables.items() if r))
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


#: Columns that identify a row of each table (rows are matched on them when both snapshots
#: recorded their column names).
ROW_KEYS = {
    "head_metrics": ("layer", "q_head"),
    "head_bucket_plasticity": ("layer", "q_head", "q_bucket", "k_bucket"),
    "head_component_weights": ("layer", "q_head", "component"),
    "head_errors": ("layer", "q_head"),
    "token_attention": ("layer", "q_head", "example_id", "position"),
    "head_attention_summary": ("layer", "q_head"),
    "query_scale_sweep": ("layer", "q_head", "scale"),
}


def _keyed(rows, columns, table):
    idx = [columns.index(c) for c in ROW_KEYS[table]]
    return {tuple(r[i] for i in idx): r for r in rows}


def compare(a_dir: Path, b_dir: Path, rtol: float = 0.0, *, ignore_run_id: bool = False,
            ignore_columns: tuple[str, ...] = (), scenarios: tuple[str, ...] = ()) -> int:
    """Every value identical (``rtol`` 0), or floats within ``rtol`` relative to each other.

    When both snapshots recorded column names, rows are matched on `ROW_KEYS` and only the
    columns both have are compared (columns added or dropped are listed, as are rows only one
    side has); ``ignore_columns`` are left out. Otherwise rows are compared in order, whole.
    """
    a = pickle.loads((a_dir / "snapshot.pkl").read_bytes())
    b = pickle.loads((b_dir / "snapshot.pkl").read_bytes())
    bad = 0
    n_values = 0
    n_changed = 0
    worst = 0.0
    for name in a:
        if scenarios and name not in scenarios:
            continue
        if name not in b:
            print(f"{name}: missing from {b_dir}")
            bad += 1
            continue
        if a[name]["run_id"] != b[name]["run_id"] and not ignore_run_id:
            print(f"{name}: run_id differs {a[name]['run_id']} != {b[name]['run_id']}")
            bad += 1
        for t, rows in a[name]["tables"].items():
            other = b[name]["tables"][t]
            ca, cb = a[name].get("columns", {}).get(t), b[name].get("columns", {}).get(t)
            if ca is not None and cb is not None:
                common = [c for c in ca if c in cb and c not in ignore_columns]
                added, dropped = [c for c in cb if c not in ca], [c for c in ca if c not in cb]
                if (added or dropped) and rows:
                    print(f"{name}.{t}: columns added {added}, dropped {dropped}; comparing {len(common)}")
                ka, kb = _keyed(rows, ca, t), _keyed(other, cb, t)
                only_a, only_b = ka.keys() - kb.keys(), kb.keys() - ka.keys()
                if only_a or only_b:
                    print(f"{name}.{t}: {len(only_a)} row(s) only before, {len(only_b)} only after "
                          f"(of {len(ka)} / {len(kb)})")
                    bad += 1
                ia, ib = [ca.index(c) for c in common], [cb.index(c) for c in common]
                pairs = [([ka[k][i] for i in ia], [kb[k][i] for i in ib], k) for k in sorted(ka.keys() & kb.keys())]
            else:
                if len(rows) != len(other):
                    print(f"{name}.{t}: {len(rows)} rows before, {len(other)} after")
                    bad += 1
                    continue
                common = None
                pairs = [(ra, rb, None) for ra, rb in zip(rows, other)]
            reported = 0
            for ra, rb, key in pairs:
                n_values += len(ra)
                diffs = [_rel_diff(x, y) for x, y in zip(ra, rb)] if len(ra) == len(rb) else [math.inf]
                n_changed += sum(1 for x in diffs if x > 0)
                worst = max([worst, *diffs])
                if max(diffs, default=0.0) > rtol:
                    bad += 1
                    if reported < 3:
                        cols = [c for c, d in zip(common, diffs) if d > rtol] if common else "?"
                        print(f"{name}.{t}: row {key} differs in {cols}\n  before {ra}\n  after  {rb}")
                    reported += 1
            if reported > 3:
                print(f"{name}.{t}: ... {reported} rows differ in all")
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
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--rtol", type=float, default=0.0,
                   help="accept floats within this relative difference (default 0: bit for bit)")
    c.add_argument("--ignore-run-id", action="store_true",
                   help="do not require equal run ids (a change that bumps plasticity.ANALYSIS_VERSION)")
    c.add_argument("--ignore-columns", nargs="*", default=(), help="columns left out of the comparison")
    c.add_argument("--scenarios", nargs="*", default=(), help="compare only these scenarios")
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        snapshot(args.out, args.data)
        return 0
    return compare(args.before, args.after, args.rtol, ignore_run_id=args.ignore_run_id,
                   ignore_columns=tuple(args.ignore_columns), scenarios=tuple(args.scenarios))


if __name__ == "__main__":
    sys.exit(main())
