"""Speed and memory of `analyze_dataset`, measured on synthetic datasets of a given shape.

    .venv/bin/python benchmarks/run_benchmark.py                   # both shapes
    .venv/bin/python benchmarks/run_benchmark.py --shape first --layers 10 --workers 1
    .venv/bin/python benchmarks/run_benchmark.py --shape qwen --attention

Shapes (override any field with --layers/--q-heads/--k-heads/--dim/--rows/--buckets):

* ``first``: 30 layers x 9 query heads x 3 key heads, d = 64, ~20k rows per shard
  (every shard fits the 50k cap: all rows are used), 16 buckets.
* ``qwen``: a Qwen3-8B-like slice: 32 query heads x 8 key heads, d = 128, ~51k rows per
  shard (just over the 50k cap, so the hash subsample and the streamed key orientation
  run), 16 buckets, 2 layers by default.

For each shape the script generates the dataset once (cached under ``--out``; generation
time is not part of any figure), then, each in a fresh child process so that nothing the
parent holds is counted:

1. the **I/O floor**: read every shard (the four columns the analysis uses) with
   ``pyarrow.parquet.ParquetFile.read`` (one thread) and turn it into float64 numpy arrays,
   page cache warm: once in one process, and once split over ``--workers`` processes (started
   before the clock), which is what the same number of processes can really read on this machine;
2. the **revision hash**: `warehouse.sources.revision.content_revision` over every shard (what every local run
   makes for its run id, while its first groups compute; SHA-256 of every byte, threads), alone and
   page cache warm: wall and CPU seconds,
   also as a share of the analysis wall time;
3. the **analysis**: ``warehouse.run.pipeline.analyze_dataset`` into a fresh warehouse with
   ``--workers`` worker processes (attention off: the attention patterns are a separate feature; with
   ``--attention`` a second run with it on is reported on its own line).

It reports wall time (of ``analyze_dataset``, interpreter start-up excluded), heads/s, when the
first head's outcome arrived (the start-up: worker pool and first group, with the revision hash and
the schema alongside; the outcome is committed once the hash is done) and the
steady rate after it (heads after the 10th over the time from the 10th to the last),
the peak resident memory of the whole process tree (the child and all its worker
processes, from /proc: the peak of the summed VmRSS every 50 ms, which counts shared pages
once per process and so over-states, and the peak of the summed PSS every 0.5 s, which
shares them out), and the ratio of the analysis wall time to the I/O floor, three ways:
``ratio`` divides the single-process floor by the worker count (a perfectly parallel reader,
the strictest figure, and the one the targets are checked against); ``ratio_parallel`` uses
the floor measured with that many processes (two processes share one memory system, so they
read less than twice as fast); ``ratio_1p`` compares with the single-process floor. Results go
to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from process_memory import TreeMemorySampler  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHAPES = {
    # seq_len / bucket_size = buckets; num_examples * seq_len * capture_fraction = rows per shard
    "first": dict(layers=30, q_heads=9, k_heads=3, dim=64, rows=20_000, buckets=16, seq_len=2048,
                  windows={5: 512, 17: 512, 29: 512}),
    "qwen": dict(layers=2, q_heads=32, k_heads=8, dim=128, rows=51_000, buckets=16, seq_len=4096, windows={}),
}
#: Shape fields that --layers, --q-heads, ... override.
SHAPE_KEYS = ("layers", "q_heads", "k_heads", "dim", "rows", "buckets")
SOURCE_TREE: str | None = None  # --source: analyse with another checkout (e.g. the code before a change)
TARGET_HEADS_PER_S = {"first": 20.0, "qwen": 5.0}
TARGET_RATIO = 3.0
TARGET_RSS_MIB = 2048.0


# ----------------------------------------------------------------------------- dataset


def synthetic_spec(shape: dict, name: str):
    from plasticity.synthetic import SyntheticSpec

    seq_len = shape["seq_len"]
    bucket_size = max(1, seq_len // shape["buckets"])
    # enough examples that a capture fraction in (0.5, 1] gives the requested rows
    num_examples = max(1, -(-shape["rows"] // seq_len))
    capture = min(1.0, shape["rows"] / (num_examples * seq_len))
    return SyntheticSpec(
        model=f"bench-{name}", num_layers=shape["layers"], num_q_heads=shape["q_heads"],
        num_k_heads=shape["k_heads"], head_dim=shape["dim"], num_examples=num_examples,
        seq_len=seq_len, bucket_size=bucket_size, capture_fraction=capture,
        sliding_windows={k: v for k, v in shape["windows"].items() if k < shape["layers"]}, seed=11,
    )


def _write_layer(args) -> None:
    from plasticity import synthetic
    from warehouse.sources.demo_data import write_shard

    spec, root, layer = args
    root = Path(root)
    for k_head in range(spec.num_k_heads):
        write_shard(root, layer, k_head, "k", synthetic.make_key_shard(spec, layer, k_head))
        for q_head in range(k_head * spec.group, (k_head + 1) * spec.group):
            write_shard(root, layer, q_head, "q", synthetic.make_query_shard(spec, layer, q_head))


def ensure_dataset(spec, out: Path, workers: int) -> tuple[Path, float]:
    """Generate the dataset once (layers in parallel); returns (root, seconds spent generating)."""
    from concurrent.futures import ProcessPoolExecutor

    from warehouse.sources.demo_data import dataset_card

    key = hashlib.sha1(repr(dataclasses.asdict(spec)).encode()).hexdigest()[:10]
    root = out / "data" / f"{spec.model}-{key}"
    card = root / "README.md"
    if card.exists():
        return root, 0.0
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(root), layer) for layer in range(spec.num_layers)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_layer, jobs))
    else:
        for j in jobs:
            _write_layer(j)
    card.write_text(dataset_card(spec))  # written last: its presence marks a complete dataset
    return root, time.perf_counter() - t0


# ----------------------------------------------------------------------------- child processes


def child_env() -> dict:
    """The environment of a child: the measured source tree first on PYTHONPATH."""
    env = dict(os.environ)
    front = [SOURCE_TREE] if SOURCE_TREE else []
    env["PYTHONPATH"] = os.pathsep.join(front + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_child(args: list[str]) -> tuple[dict, TreeMemorySampler, float]:
    """Run this script in child mode; returns (its JSON answer, memory sampler, outer wall seconds)."""
    env = child_env()
    import resource

    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeMemorySampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate()
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.kill()
    outer = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the child and every worker it reaped (user + system)
    sampler.cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), sampler, outer


# ----------------------------------------------------------------------------- child modes


def read_shards_as_floats(paths: list[str]) -> int:
    """Read the bucket, example_id, position and vector columns of each shard into float64/int64
    numpy arrays (and drop them); returns the number of rows read."""
    import numpy as np
    import pyarrow.parquet as pq

    n_rows = 0
    for p in paths:
        # the fastest whole-file reader pyarrow has (pq.read_table goes through the dataset layer and
        # is ~2x slower on these files); the pipeline reads shards the same way
        t = pq.ParquetFile(p).read(columns=["bucket", "example_id", "position", "vector"], use_threads=False)
        vec = t.column("vector").combine_chunks()
        d = vec.type.list_size
        X = vec.flatten().to_numpy().astype(np.float64).reshape(-1, d)
        _ = (t.column("bucket").to_numpy().astype(np.int64), t.column("example_id").to_numpy().astype(np.int64),
             t.column("position").to_numpy().astype(np.float64))
        n_rows += X.shape[0]
        del t, vec, X, _
    return n_rows


def _warm_reader(_: int = 0) -> int:
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    return os.getpid()


def child_io_floor(root: str, processes: int = 1) -> dict:
    """Time reading every shard into float arrays, page cache warm: in this process
    (``processes`` 1), or split round-robin over that many already-started worker processes."""
    paths = [p.as_posix() for p in sorted(Path(root).glob("l*h*[qk]/data.parquet"))]
    for p in paths:  # warm the page cache the same way the analysis will find it
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    if processes <= 1:
        t0 = time.perf_counter()
        n_rows = read_shards_as_floats(paths)
        return {"seconds": time.perf_counter() - t0, "n_shards": len(paths), "n_rows": n_rows}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn")) as pool:
        while len(set(pool.map(_warm_reader, range(4 * processes)))) < processes:  # every worker up
            pass
        t0 = time.perf_counter()
        n_rows = sum(pool.map(read_shards_as_floats, [paths[i::processes] for i in range(processes)]))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "n_shards": len(paths), "n_rows": n_rows}


def child_hash(root: str) -> dict:
    """Time the dataset revision (`content_revision`, as `analyze_dataset` computes it), page cache warm;
    CPU seconds of every thread of this process."""
    import resource

    from warehouse.sources.catalog import scan_shards
    from warehouse.sources.revision import content_revision

    scan = scan_shards(root)
    for p in scan.paths:  # warm the page cache the same way the analysis will find it
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    revision = content_revision(scan.base, scan.paths)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n_bytes = sum(os.path.getsize(p) for p in scan.paths)
    return {"seconds": wall, "cpu_s": cpu, "bytes": n_bytes, "revision": revision}


def child_analyze(root: str, warehouse: str, workers: int, attention: bool, profile: str | None) -> dict:
    from warehouse.settings.config import load_config
    from warehouse.run.pipeline import analyze_dataset

    for p in (Path(warehouse), Path(warehouse + ".wal")):
        p.unlink(missing_ok=True)
    cfg = load_config(None, {"warehouse": warehouse, "max_workers": workers, "attention": attention})
    done_at: list[float] = []  # seconds since the start at which each head's outcome arrived
    t0 = time.perf_counter()

    def arrived(_outcome) -> None:
        done_at.append(time.perf_counter() - t0)

    if profile:
        import cProfile

        prof = cProfile.Profile()
        summary = prof.runcall(analyze_dataset, cfg, root, progress=False, on_outcome=arrived)
        prof.dump_stats(profile)
    else:
        summary = analyze_dataset(cfg, root, progress=False, on_outcome=arrived)
    wall = time.perf_counter() - t0
    return {"seconds": wall, **outcome_timing(done_at),
            **{k: v for k, v in dataclasses.asdict(summary).items() if k != "seconds"}}


#: Outcomes before the steady rate is taken (the pool's start and its first groups).
STEADY_AFTER = 10


def outcome_timing(done_at: list[float]) -> dict:
    """When the first head's outcome arrived (start-up: pool and first group, hash and schema alongside) and the
    steady rate: heads after the STEADY_AFTER-th over the time from it to the last one."""
    n = len(done_at)
    steady = (n - STEADY_AFTER) / (done_at[-1] - done_at[STEADY_AFTER - 1]) if n > STEADY_AFTER and \
        done_at[-1] > done_at[STEADY_AFTER - 1] else float("nan")
    return {"first_head_s": done_at[0] if n else float("nan"), "steady_heads_per_s": steady}


# ----------------------------------------------------------------------------- driver


def measure(name: str, shape: dict, args) -> list[dict]:
    spec = synthetic_spec(shape, name)
    out = Path(args.out)
    root, gen_s = ensure_dataset(spec, out, max(1, args.workers))
    n_heads = spec.num_layers * spec.num_q_heads
    print(f"[{name}] dataset {root} ({n_heads} heads; generated in {gen_s:.1f}s)" if gen_s
          else f"[{name}] dataset {root} ({n_heads} heads; cached)", file=sys.stderr)
    floor, floor_mem, _ = run_child(["--_child", "io", root.as_posix(), "1"])
    floor_np = run_child(["--_child", "io", root.as_posix(), str(args.workers)])[0] if args.workers > 1 else floor
    hashed = run_child(["--_child", "hash", root.as_posix()])[0]
    rows = []
    variants = [False, True] if args.attention else [False]
    for attention in variants:
        wh = out / f"{name}{'-attn' if attention else ''}.duckdb"
        extra = ["--_profile", str(out / f"{name}.prof")] if args.profile else []
        load_before = os.getloadavg()[0]
        res, mem, outer = run_child(["--_child", "analyze", root.as_posix(), str(wh), str(args.workers),
                                     "1" if attention else "0", *extra])
        if res["n_errors"] or res["n_done"] != n_heads:
            raise RuntimeError(f"[{name}] analysis incomplete: {res}")
        wall = res["seconds"]
        row = {
            "shape": name + (" +attention" if attention else ""),
            "layers": spec.num_layers, "q_heads": spec.num_q_heads, "k_heads": spec.num_k_heads,
            "dim": spec.head_dim, "rows_per_shard": round(floor["n_rows"] / floor["n_shards"]),
            "buckets": spec.seq_len // spec.bucket_size, "heads": n_heads, "workers": args.workers,
            "wall_s": wall, "outer_wall_s": outer, "heads_per_s": n_heads / wall,
            "first_head_s": res["first_head_s"], "steady_heads_per_s": res["steady_heads_per_s"],
            "peak_rss_mib": mem.peak_rss_kib / 1024, "peak_pss_mib": mem.peak_pss_kib / 1024,
            "max_processes": mem.max_procs, "memory_samples": mem.samples,
            "io_floor_s": floor["seconds"], "io_floor_per_worker_s": floor["seconds"] / args.workers,
            "io_floor_peak_rss_mib": floor_mem.peak_rss_kib / 1024,
            "io_floor_parallel_s": floor_np["seconds"],
            "ratio": wall / (floor["seconds"] / args.workers), "ratio_1p": wall / floor["seconds"],
            "ratio_parallel": wall / floor_np["seconds"],
            # the content hash of the dataset revision (part of every local run, alongside its first groups)
            "hash_s": hashed["seconds"], "hash_cpu_s": hashed["cpu_s"], "hash_gib": hashed["bytes"] / 2**30,
            "hash_pct_of_run": 100.0 * hashed["seconds"] / wall,
            "attention": attention,
            # other processes competing for the CPUs make every figure worse; 1-minute load averages
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
            # CPU seconds used by the whole tree (interpreter start-up included) and the mean number
            # of cores that makes over the outer wall time: well below the worker count means the
            # tree waited (on I/O, on the writer, or on other processes holding the CPUs)
            "tree_cpu_s": mem.cpu_s, "cores_used": mem.cpu_s / outer,
        }
        if not attention:
            target = TARGET_HEADS_PER_S.get(name)
            row["targets"] = {
                "heads_per_s": target, "ratio": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB,
                "met": {
                    "heads_per_s": target is None or row["heads_per_s"] >= target,
                    "ratio": row["ratio"] <= TARGET_RATIO,
                    "peak_rss_mib": row["peak_rss_mib"] < TARGET_RSS_MIB,
                },
            }
        rows.append(row)
        print(f"[{name}] {row['shape']}: {wall:.1f}s, {row['heads_per_s']:.1f} heads/s (first head after "
              f"{row['first_head_s']:.1f}s, then {row['steady_heads_per_s']:.1f} heads/s), "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB, {row['tree_cpu_s']:.1f} CPU s = {row['cores_used']:.2f} cores "
              f"(load average {load_before:.1f} before); revision hash of {row['hash_gib']:.2f} GiB: "
              f"{row['hash_s']:.2f} s ({row['hash_cpu_s']:.2f} CPU s) = {row['hash_pct_of_run']:.1f}% of the run",
              file=sys.stderr)
        if load_before > 0.5:
            print(f"[{name}] warning: the machine was busy (load average {load_before:.1f}); figures are pessimistic",
                  file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("shape", "shape", "{}"), ("heads", "heads", "{}"), ("workers", "workers", "{}"),
            ("wall_s", "wall s", "{:.1f}"), ("heads_per_s", "heads/s", "{:.1f}"),
            ("first_head_s", "1st head s", "{:.1f}"), ("steady_heads_per_s", "steady heads/s", "{:.1f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("peak_pss_mib", "peak PSS MiB", "{:.0f}"),
            ("io_floor_s", "I/O floor s", "{:.2f}"), ("io_floor_parallel_s", "floor Np s", "{:.2f}"),
            ("ratio", "ratio", "{:.2f}"), ("ratio_parallel", "ratio Np", "{:.2f}"), ("ratio_1p", "ratio 1p", "{:.2f}"),
            ("hash_s", "hash s", "{:.2f}"), ("hash_cpu_s", "hash CPU s", "{:.2f}"), ("hash_pct_of_run", "hash %", "{:.1f}")]
    cells = [[fmt.format(r[k]) for k, _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The figures as docs/performance.md shows them."""
    head = ("| shape | heads | wall s | heads/s | peak RSS MiB (PSS) | I/O floor s (1 process / N processes) "
            "| ratio (floor / N) | ratio (measured N-process floor) | CPU s per head |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        shape = (f"{r['shape']}: {r['layers']} x {r['q_heads']}q/{r['k_heads']}k, d={r['dim']}, "
                 f"{r['rows_per_shard'] / 1000:.0f}k rows, {r['buckets']} buckets")
        lines.append(f"| {shape} | {r['heads']} | {r['wall_s']:.1f} | {r['heads_per_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} ({r['peak_pss_mib']:.0f}) | {r['io_floor_s']:.2f} / {r['io_floor_parallel_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['ratio_parallel']:.2f} | "
                     f"{r['tree_cpu_s'] / r['heads']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":
        mode = argv[1]
        if mode == "io":
            res = child_io_floor(argv[2], int(argv[3]) if len(argv) > 3 else 1)
        elif mode == "hash":
            res = child_hash(argv[2])
        else:
            profile = argv[argv.index("--_profile") + 1] if "--_profile" in argv else None
            res = child_analyze(argv[2], argv[3], int(argv[4]), argv[5] == "1", profile)
        print(json.dumps(res))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["first", "qwen", "both"], default="both")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--q-heads", type=int)
    ap.add_argument("--k-heads", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--rows", type=int, help="rows per shard (approximate)")
    ap.add_argument("--buckets", type=int, help="position buckets per sequence")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(HERE / "out"), help="datasets, warehouses and results (gitignored)")
    ap.add_argument("--attention", action="store_true", help="also time a run with attention on")
    ap.add_argument("--profile", action="store_true", help="cProfile the coordinating process to OUT/<shape>.prof")
    ap.add_argument("--source", help="run the analysis with the packages of this source tree (before/after comparisons)")
    args = ap.parse_args(argv)
    global SOURCE_TREE
    SOURCE_TREE = str(Path(args.source).resolve()) if args.source else None

    names = ["first", "qwen"] if args.shape == "both" else [args.shape]
    rows = []
    for name in names:
        shape = dict(SHAPES[name])
        for key in SHAPE_KEYS:
            if getattr(args, key) is not None:
                shape[key] = getattr(args, key)
        rows += measure(name, shape, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"when": stamp, "cpus": os.cpu_count(), "python": sys.version.split()[0], "source": SOURCE_TREE or str(REPO),
              "results": rows}
    path = Path(args.out) / f"benchmark-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(format_table(rows))
    print()
    print(markdown_table(rows))
    print()
    for r in rows:
        if "targets" in r:
            missed = [k for k, ok in r["targets"]["met"].items() if not ok]
            print(f"{r['shape']}: " + ("all targets met" if not missed else "MISSED " + ", ".join(missed)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
