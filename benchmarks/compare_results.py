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
]

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
        tables = {}
        with db.reader(wh) as con:
            for t in TABLES:
                cols = "* EXCLUDE (model, run_id, recorded_at)" if t == "head_errors" else "* EXCLUDE (model, run_id)"
                tables[t] = con.execute(f"SELECT {cols} FROM {t} ORDER BY ALL").fetchall()
        snap[name] = {"run_id": s.run_id, "tables": tables}
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


def compare(a_dir: Path, b_dir: Path, rtol: float = 0.0) -> int:
    """Every value identical (``rtol`` 0), or floats within ``rtol`` relative to each other."""
    a = pickle.loads((a_dir / "snapshot.pkl").read_bytes())
    b = pickle.loads((b_dir / "snapshot.pkl").read_bytes())
    bad = 0
    n_values = 0
    n_changed = 0
    worst = 0.0
    for name in a:
        if a[name]["run_id"] != b[name]["run_id"]:
            print(f"{name}: run_id differs {a[name]['run_id']} != {b[name]['run_id']}")
            bad += 1
        for t, rows in a[name]["tables"].items():
            other = b[name]["tables"][t]
            if len(rows) != len(other):
                print(f"{name}.{t}: {len(rows)} rows before, {len(other)} after")
                bad += 1
                continue
            for ra, rb in zip(rows, other):
                n_values += len(ra)
                diffs = [_rel_diff(x, y) for x, y in zip(ra, rb)] if len(ra) == len(rb) else [math.inf]
                n_changed += sum(1 for x in diffs if x > 0)
                worst = max([worst, *diffs])
                if max(diffs, default=0.0) > rtol:
                    print(f"{name}.{t}: row differs\n  before {ra}\n  after  {rb}")
                    bad += 1
                    break
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
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        snapshot(args.out, args.data)
        return 0
    return compare(args.before, args.after, args.rtol)


if __name__ == "__main__":
    sys.exit(main())
