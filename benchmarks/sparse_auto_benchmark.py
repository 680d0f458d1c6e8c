"""What `attention: auto` costs on a sparse capture, against `attention: false`.

    .venv/bin/python benchmarks/sparse_auto_benchmark.py                 # 5 interleaved pairs
    .venv/bin/python benchmarks/sparse_auto_benchmark.py --repeats 8 --keep 0.125

The capture: the tiny-llama dense fixture (18 query heads, 6 key heads, 2,048 rows each) thinned
by `warehouse.sources.demo_data.write_sparse_capture` (each position kept with probability ``--keep``,
one mask per example, layer and kind, independent for queries and keys), so no head has the 100
exact rows attention needs. Each run is `plasticity analyze` in a fresh process with the shipped
settings and a fresh warehouse, once with ``--attention false`` and once with the default
(``auto``); the pairs are interleaved (false first, then auto first, ...) so that a change in the
machine's load hits both sides alike. Measured per run: wall seconds and the CPU seconds of the
whole process tree (user + system, from the parent's RUSAGE_CHILDREN), and the 1-minute load
average when the run started. The summary gives medians, and the ratio auto / false of the
medians with the range of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from warehouse.sources.demo_data import write_sparse_capture  # noqa: E402

DENSE = REPO / "tests" / "fixtures" / "tiny-llama" / "dense" / "tinyllama"


def one_run(root: Path, wh: Path, out: Path, attention: str | None) -> dict:
    """`plasticity analyze` on `root` in a child process: wall s, tree CPU s, load average at start."""
    cmd = [sys.executable, "-m", "cli.main", "analyze", "--dataset_local_root", str(root),
           "--model", "sparse", "--warehouse", str(wh), "--output_dir", str(out), "--quiet", "--fresh"]
    if attention is not None:
        cmd += ["--attention", attention]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved pairs (default 5)")
    ap.add_argument("--keep", type=float, default=0.125, help="probability a position is kept (default 1/8)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparse-auto-") as tmp:
        tmp = Path(tmp)
        root = write_sparse_capture(DENSE, tmp / "data" / "sparse", args.keep, args.seed)
        runs: dict[str, list[dict]] = {"false": [], "auto": []}
        one_run(root, tmp / "warm.duckdb", tmp / "out", "false")  # imports into the page cache, not counted
        for i in range(args.repeats):
            order = ("false", "auto") if i % 2 == 0 else ("auto", "false")
            for mode in order:
                wh = tmp / f"{mode}-{i}.duckdb"
                runs[mode].append(one_run(root, wh, tmp / "out", None if mode == "auto" else mode))
                r = runs[mode][-1]
                print(f"pair {i + 1} {mode:5s}: wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                      f"load {r['load']:.2f}", flush=True)
    print(f"\nsparse capture: tiny-llama dense thinned to {args.keep:g} per position (seed {args.seed}), "
          f"18 heads, {args.repeats} interleaved pairs, {os.cpu_count()} CPUs")
    for key in ("wall_s", "cpu_s"):
        f = statistics.median(r[key] for r in runs["false"])
        a = statistics.median(r[key] for r in runs["auto"])
        pair = [ra[key] / rf[key] for ra, rf in zip(runs["auto"], runs["false"])]
        print(f"{key}: false median {f:.2f}, auto (default) median {a:.2f}; auto/false {a / f:.3f} "
              f"(per pair {min(pair):.3f}-{max(pair):.3f})")
    loads = [r["load"] for mode in runs.values() for r in mode]
    print(f"load average (1 min) at the runs' start: {min(loads):.2f}-{max(loads):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
