"""A streamed Hub run against its two lower bounds: downloading the branch, and analysing it locally.

    .venv/bin/python benchmarks/hub_benchmark.py --out DIR
    .venv/bin/python benchmarks/hub_benchmark.py --out DIR --rate-mb-s 50 --budget-gb 0.12 --layers 2

A synthetic dataset (generated once under DIR/data; by default 8 layers x 8 query heads x 4 key heads,
d = 128, 12k rows per shard, ~6.5 MB a shard, 32 GQA groups of ~20 MB, 0.65 GB; the budget holds 8 groups) is served as one branch by the test suite's Hub-compatible server
(tests/fake_hub.py) on 127.0.0.1, its file bodies capped at ``--rate-mb-s`` over all connections
together (one shared link), and read with the real huggingface_hub client. Three timings, in this order:

1. **streamed**: ``hub_download: stream`` as `plasticity analyze` runs it (listing, card, then each
   GQA group downloaded within ``--budget-gb``, analysed, committed and deleted); the bytes under the
   download folder are sampled every 20 ms for ``peak_disk_bytes``;
2. **download-only**: the whole branch at the same commit into the same folder
   (`warehouse.sources.hub.download_branch`, ``--download-workers`` parallel files);
3. **compute-only**: `analyze_dataset` over that complete local copy, revision = the commit sha, into
   a fresh warehouse (page cache warm, like the streamed run's freshly downloaded shards).

``identical_to_local`` is true when every row of every table of the two warehouses is equal (times
left out, and the warehouse file's name in the recorded config). Views are not compared: a view that
averages floats (layer_plasticity) sums them in storage order, which follows the order heads were
committed in, so it may differ in the last bits between any two runs, streamed or not. Target: ``wall_s`` <= 1.15 x
max(download_only_s, compute_only_s), ``peak_disk_bytes`` <= ``disk_budget_bytes``. The machine may be
shared: the load average is recorded with the figures. Writes DIR/hub-benchmark-<time>.json and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import run_benchmark  # noqa: E402

REPO_ID = "bench/qk-sniffed"
BRANCH = "bench-model"
TARGET_RATIO = 1.15


def peak_shard_bytes(folder: str, interval: float) -> None:
    """Sample the bytes of the shards under `folder`, whole or partly downloaded, every `interval` seconds:
    every file but the card and huggingface_hub's bookkeeping (a few hundred bytes a file). Prints the
    peak when its standard input closes."""
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    peak = 0
    while True:
        last = done.is_set()
        total = 0
        for dirpath, _, names in os.walk(folder):
            for name in names:
                if name == "README.md" or name.endswith((".metadata", ".lock")):
                    continue
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass  # deleted meanwhile
        peak = max(peak, total)
        if last:
            break
        done.wait(interval)
    print(peak, flush=True)


class DiskSampler:
    """`peak_shard_bytes` every 20 ms in a child process: walking the folder costs ~1.3 ms of CPU a sample,
    which would otherwise hold the run's own interpreter lock; its CPU is reported apart (`cpu_s`)."""

    def __init__(self, folder: Path, interval: float = 0.02):
        self.folder, self.interval, self.proc = folder, interval, None

    def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--_sample", str(self.folder), str(self.interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> int:
        out, _ = self.proc.communicate(timeout=30)
        return int(out.strip())


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(root: str, rate_bytes_per_s: float, max_bytes: int) -> None:
    """The fake Hub in its own process (as a remote Hub would be: its threads never hold this
    process's GIL): prints its endpoint, serves until its standard input closes."""
    from tests.fake_hub import FakeHub

    with FakeHub(root, rate_limit_bytes_per_s=rate_bytes_per_s, lfs_suffixes=(".parquet",),
                 max_bytes_per_branch=max_bytes) as hub:
        hub.warm()  # its listing's SHA-256s are computed before any timing
        print(hub.endpoint, flush=True)
        sys.stdin.read()


class ServedHub:
    """`serve` in a child process; `.endpoint` as `tests.fake_hub.configure_hf_client` wants it."""

    def __init__(self, root: Path, rate_bytes_per_s: float, max_bytes: int):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(root), str(rate_bytes_per_s),
                                      str(max_bytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake Hub did not start: {self.endpoint!r}")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        return _proc_cpu_s(self.proc.pid)

    def __enter__(self) -> "ServedHub":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def table_rows(path: str) -> dict[str, list]:
    import duckdb

    out = {}
    with duckdb.connect(path, read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall():
            rows = con.execute(f"SELECT * FROM {table} ORDER BY ALL")
            cols = [d[0] for d in rows.description]
            out[table] = [tuple(_comparable(c, v) for c, v in zip(cols, r)) for r in rows.fetchall()]
    return out


def _comparable(column: str, value):
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, datetime.datetime):
        return "a time"
    if column == "config_json":
        config = json.loads(value)
        config.pop("warehouse", None)
        return json.dumps(config, sort_keys=True)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_serve"]:
        serve(argv[1], float(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["--_sample"]:
        peak_shard_bytes(argv[1], float(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="results (and the generated dataset) go here")
    ap.add_argument("--rate-mb-s", type=float, default=50.0, help="the served link's cap, MB/s")
    ap.add_argument("--budget-gb", type=float, default=0.16, help="download_budget_gb of the streamed run")
    ap.add_argument("--download-workers", type=int, default=8, help="download_max_workers")
    ap.add_argument("--workers", type=int, default=None, help="analysis worker processes (default: CPUs)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--k-heads", type=int, default=4)
    ap.add_argument("--rows", type=int, default=12_000)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)

    import pytest

    from tests.fake_hub import configure_hf_client
    from warehouse.run.pipeline import analyze_dataset
    from warehouse.settings.config import load_config
    from warehouse.sources.hub import download_branch, get_branch
    from warehouse.sources.hub_files import open_branch

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(layers=args.layers, q_heads=args.q_heads, k_heads=args.k_heads, dim=args.dim, rows=args.rows,
                 buckets=16, seq_len=4096, windows={})
    spec = run_benchmark.synthetic_spec(shape, "hub")
    data, gen_s = run_benchmark.ensure_dataset(spec, out, workers=os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="hub-bench-", dir=out))
    try:
        branch_dir = work / "hub-root" / REPO_ID / BRANCH
        shutil.copytree(data, branch_dir)  # the fake Hub reads its branches from disk
        dataset_bytes = sum(p.stat().st_size for p in branch_dir.rglob("data.parquet"))
        with pytest.MonkeyPatch.context() as mp, \
                ServedHub(work / "hub-root", args.rate_mb_s * 1e6, 4 * dataset_bytes) as hub:
            configure_hf_client(mp, hub, hf_home=work / "hf-home")
            keys = {"dataset_name": REPO_ID, "revision": BRANCH, "attention": "false",
                    "download_budget_gb": args.budget_gb, "download_max_workers": args.download_workers,
                    "max_workers": args.workers}
            cfg = load_config(None, {**keys, "warehouse": str(work / "streamed.duckdb")})
            sha = get_branch(REPO_ID, BRANCH).sha
            folder = work / "download"
            # 1. streamed
            sampler = DiskSampler(folder)
            folder.mkdir()
            sampler.start()
            t0, cpu0, server0 = time.perf_counter(), os.times(), hub.cpu_s()
            files = open_branch(REPO_ID, BRANCH, sha, folder)
            streamed = analyze_dataset(cfg, folder, model=BRANCH, revision=sha, progress=False, hub=files)
            wall_s = time.perf_counter() - t0
            sampler_cpu = sampler.cpu_s()
            streamed_cpu = _cpu_since(cpu0) + hub.cpu_s() - server0
            coordinator_cpu = {"streamed": _cpu_since(cpu0, children=False)}
            server_cpu = {"streamed": hub.cpu_s() - server0}
            peak = sampler.stop()
            # 2. download-only, the same commit into the same folder
            t0, cpu0, server0 = time.perf_counter(), os.times(), hub.cpu_s()
            download_branch(REPO_ID, BRANCH, sha, local_dir=folder, max_workers=args.download_workers)
            download_s = time.perf_counter() - t0
            download_cpu = _cpu_since(cpu0) + hub.cpu_s() - server0
            coordinator_cpu["download_only"] = _cpu_since(cpu0, children=False)
            server_cpu["download_only"] = hub.cpu_s() - server0
        # 3. compute-only over the complete copy
        local_cfg = load_config(None, {**keys, "warehouse": str(work / "local.duckdb")})
        t0, cpu0 = time.perf_counter(), os.times()
        local = analyze_dataset(local_cfg, folder, model=BRANCH, revision=sha, progress=False)
        compute_s = time.perf_counter() - t0
        compute_cpu = _cpu_since(cpu0)
        coordinator_cpu["compute_only"] = _cpu_since(cpu0, children=False)
        mine, theirs = table_rows(cfg.warehouse), table_rows(local_cfg.warehouse)
        differing = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
        if streamed.run_id != local.run_id:
            differing.insert(0, f"run id {streamed.run_id} != {local.run_id}")
        identical = not differing and streamed.n_errors == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bound = max(download_s, compute_s)
    result = {
        "wall_s": round(wall_s, 3),
        "download_only_s": round(download_s, 3),
        "compute_only_s": round(compute_s, 3),
        "peak_disk_bytes": peak,
        "disk_budget_bytes": int(args.budget_gb * 1e9),
        "identical_to_local": identical,
        "differing_tables": differing,
        "streamed_errors": streamed.n_errors,
        "wall_over_bound": round(wall_s / bound, 3),
        # CPU seconds (this process, its finished workers, and the Hub server): on a machine with few
        # cores the download's own CPU (client, server, hashing) is taken from the analysis workers
        "cpu_s": {"streamed": round(streamed_cpu, 1), "download_only": round(download_cpu, 1),
                  "compute_only": round(compute_cpu, 1)},
        # of which the local Hub server's (a remote Hub's would be on another machine), and the disk
        # sampler's during the streamed run (not included above)
        "server_cpu_s": {k: round(v, 2) for k, v in server_cpu.items()},
        # of which this process's own (the run's coordinator, its download threads): the rest is the workers'
        "coordinator_cpu_s": {k: round(v, 2) for k, v in coordinator_cpu.items()},
        "disk_sampler_cpu_s": round(sampler_cpu, 2),
        # whether the prefetch depth fit: how long the run waited for downloads, and the downloads for room
        "stream": streamed.downloads,
        "target_wall_over_bound": TARGET_RATIO,
        "dataset_bytes": dataset_bytes,
        "n_heads": streamed.n_heads,
        "rate_mb_s": args.rate_mb_s,
        "download_workers": args.download_workers,
        "analysis_workers": cfg.workers(),
        "shape": shape,
        "generation_s": round(gen_s, 1),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"hub-benchmark-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return 0


def _cpu_since(before, children: bool = True) -> float:
    now = os.times()
    return sum(now[i] - before[i] for i in range(4 if children else 2))  # user, system, children's user and system


if __name__ == "__main__":
    raise SystemExit(main())
