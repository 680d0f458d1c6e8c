"""CPU cost and memory of the attention patterns: the same analysis with attention off and on.

    .venv/bin/python benchmarks/attention_benchmark.py                      # both shapes, 2 repeats
    .venv/bin/python benchmarks/attention_benchmark.py --shape qwen --repeats 1
    .venv/bin/python benchmarks/attention_benchmark.py --source /path/to/main/checkout   # the code before

Dense captures (every position of every example, so every query row is exact and attention
runs on all of them), generated once under ``--out``:

* ``first``: 2 layers x 9 query heads x 3 key heads, d = 64, 10 examples x 2048 positions (18 heads);
* ``qwen``:  1 layer x 8 query heads x 2 key heads, d = 128, 12 examples x 4096 positions (49,152 rows
  per shard, under the 50k cap; 8 heads).

Each configuration runs `analyze_dataset` in a fresh child process tree (`run_benchmark.run_child`:
``--workers`` spawned workers, one BLAS thread each) and reports the CPU seconds of the whole tree
(user + system, interpreter start-up included) per head and its peak RSS: attention off, attention
on with a warm numba cache (the measured tree's own cache, filled before the first run), and -- once per shape -- attention on with an empty numba cache
(``NUMBA_CACHE_DIR`` pointed at a new directory), whose extra CPU is the kernels' cold compile (once,
by the background warm-up of `warehouse/run/kernel_cache.py`, plus its start-up). ``attention cost`` = (on - off) / heads. The machine is shared: figures are CPU, not
wall, and each configuration is repeated (min and max shown). Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import run_benchmark  # noqa: E402

SHAPES = {
    "first": dict(layers=2, q_heads=9, k_heads=3, dim=64, rows=10 * 2048, buckets=16, seq_len=2048, windows={}),
    "qwen": dict(layers=1, q_heads=8, k_heads=2, dim=128, rows=12 * 4096, buckets=16, seq_len=4096, windows={}),
}


def run(root: Path, wh: Path, workers: int, attention: bool, cache_dir: str | None) -> dict:
    """One analysis in a child process tree: its JSON answer plus tree CPU s and peak RSS."""
    saved = os.environ.get("NUMBA_CACHE_DIR")
    if cache_dir is not None:
        os.environ["NUMBA_CACHE_DIR"] = cache_dir
    try:
        res, mem, outer = run_benchmark.run_child(["--_child", "analyze", root.as_posix(), str(wh), str(workers),
                                                   "1" if attention else "0"])
    finally:
        if cache_dir is not None:
            if saved is None:
                os.environ.pop("NUMBA_CACHE_DIR", None)
            else:
                os.environ["NUMBA_CACHE_DIR"] = saved
    if res["n_errors"]:
        raise RuntimeError(f"analysis had errors: {res}")
    return {"cpu_s": mem.cpu_s, "peak_rss_mib": mem.peak_rss_kib / 1024, "wall_s": outer, "heads": res["n_done"],
            "loadavg": os.getloadavg()[0]}


def measure(name: str, args) -> dict:
    shape = SHAPES[name]
    spec = run_benchmark.synthetic_spec(shape, f"attn-{name}")
    assert spec.capture_fraction == 1.0, "the attention benchmark needs dense captures"
    out = Path(args.out)
    root, _ = run_benchmark.ensure_dataset(spec, out, max(1, args.workers))
    wh = out / f"attn-{name}.duckdb"
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as cold:
        rows["on (cold numba cache)"] = [run(root, wh, args.workers, True, cold)]
    # the warm runs use the measured tree's own numba cache: fill it first (a tree never run before
    # would otherwise compile inside the first "warm" run)
    subprocess.run([sys.executable, "-m", "warehouse.run.kernel_warmup", "attention"], check=True,
                   env=run_benchmark.child_env())
    for _ in range(args.repeats):
        for label, attention in (("off", False), ("on", True)):
            rows[label].append(run(root, wh, args.workers, attention, None))
    n = rows["off"][0]["heads"]
    summary = {"shape": name, "heads": n, "workers": args.workers, "runs": rows}
    for label, runs in rows.items():
        cpu = [r["cpu_s"] / n for r in runs]
        summary[label] = {"cpu_s_per_head": [min(cpu), max(cpu)],
                          "peak_rss_mib": [min(r["peak_rss_mib"] for r in runs), max(r["peak_rss_mib"] for r in runs)]}
    off = [r["cpu_s"] for r in rows["off"]]
    on = [r["cpu_s"] for r in rows["on"]]
    summary["attention_cpu_s_per_head"] = [(min(on) - max(off)) / n, (max(on) - min(off)) / n]
    summary["cold_compile_cpu_s"] = rows["on (cold numba cache)"][0]["cpu_s"] - min(on)
    return summary


def table(results: list[dict]) -> str:
    lines = ["| shape | heads | attention | CPU s per head (min-max) | peak RSS MiB |", "|---|---:|---|---:|---:|"]
    for r in results:
        for label in ("off", "on", "on (cold numba cache)"):
            c, m = r[label]["cpu_s_per_head"], r[label]["peak_rss_mib"]
            lines.append(f"| {r['shape']} | {r['heads']} | {label} | {c[0]:.2f}-{c[1]:.2f} | {m[0]:.0f}-{m[1]:.0f} |")
    lines.append("")
    for r in results:
        a = r["attention_cpu_s_per_head"]
        lines.append(f"{r['shape']}: attention costs {a[0]:.2f}-{a[1]:.2f} CPU s per head; an empty numba cache adds "
                     f"{r['cold_compile_cpu_s']:.1f} CPU s to the run (the kernels compiled once, warehouse/run/kernel_cache.py)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["first", "qwen", "both"], default="both")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out"), help="datasets, warehouses and results (gitignored)")
    ap.add_argument("--source", help="run the analysis with the packages of this source tree (before/after)")
    args = ap.parse_args(argv)
    run_benchmark.SOURCE_TREE = str(Path(args.source).resolve()) if args.source else None
    names = ["first", "qwen"] if args.shape == "both" else [args.shape]
    results = [measure(name, args) for name in names]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"attention-benchmark-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"source": run_benchmark.SOURCE_TREE or str(HERE.parent), "results": results},
                               indent=1))
    print(table(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
