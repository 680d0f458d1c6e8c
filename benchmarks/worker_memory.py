"""Where a worker's resident memory goes: the libraries it imports, one GQA group's data, and what
numba adds (its import, then loading a cached kernel).

    .venv/bin/python benchmarks/worker_memory.py                 # first shape
    .venv/bin/python benchmarks/worker_memory.py --shape qwen

This script plans the first two GQA groups of a dataset `run_benchmark.py` generates (cached under
``--out``), as `analyze_dataset` plans them, and hands them to one fresh process set up as a worker
(one BLAS thread, the workers' malloc settings), which measures itself. After each
step it reads /proc/self/status: VmRSS (what `run_benchmark.py` sums over the process tree),
split into RssAnon (the process's own memory) and RssFile (mapped library pages, shared with the
other workers but counted again in every process's VmRSS), and VmHWM, the peak so far.

Steps, in order: the interpreter; the analysis code (what `warehouse.run.worker_pool._warm_up` imports);
one GQA group analysed (`warehouse.run.group.compute_group`, what a worker runs, attention off); a second group (memory a worker keeps, since it never trims its heap); numba
imported; a cached numba kernel loaded and called (the attention kernel; compiled first if the
cache is empty, and then reported as such, since compiling holds LLVM's memory too). The numba
steps come last so that the group figures are those of a worker of a run with attention off,
which never imports numba (in a tree whose per-head analysis runs numba kernels, numba arrives with
the first group, and the numba step says it was already imported).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import run_benchmark  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    return out


def plan(shape: dict, shape_name: str, out_dir: str) -> list:
    """The first two GQA groups of the shape's dataset, planned as `analyze_dataset` plans them."""
    from warehouse.run import planning
    from warehouse.settings.config import RunConfig

    spec = run_benchmark.synthetic_spec(shape, shape_name)
    root, _ = run_benchmark.ensure_dataset(spec, Path(out_dir), os.cpu_count() or 1)
    cfg = RunConfig(attention="false")  # what run_benchmark.py measures: the per-head analysis alone
    cat = planning.profile_catalog(planning.find_catalog(root, cfg))
    return planning.plan_groups(cat, cfg)[:2]


def child(tasks_file: str) -> list[tuple[str, dict]]:
    """The steps, in one process that starts as a worker does and gets the groups as a worker does
    (pickled `GroupTask`s: the catalog is the coordinating process's work, not a worker's)."""
    steps = [("interpreter", _status())]
    from warehouse.run import group, worker_pool

    worker_pool._init_worker()
    worker_pool._warm_up(kernels=False)
    steps.append(("analysis code imported (a worker's warm-up)", _status()))

    with open(tasks_file, "rb") as fh:
        tasks = pickle.load(fh)
    for i, task in enumerate(tasks):
        failed = [o.error for o in group.compute_group(task) if o.error]  # what a worker runs for a group
        if failed:
            raise RuntimeError(f"group {i + 1} failed: {failed[0]}")
        steps.append((f"GQA group {i + 1} analysed ({len(task.queries)} heads)", _status()))

    already = "numba" in sys.modules  # the analysis itself uses numba kernels
    import numba  # noqa: F401

    steps.append(("numba imported (already, by the analysis)" if already else "numba imported", _status()))
    from warehouse.run import kernel_cache

    cached = kernel_cache.kernels_cached("attention")
    from plasticity.attention import kernel  # loads (or compiles) its eagerly typed kernels

    kernel.exp_nonpositive(-1.0)
    label = "a cached numba kernel loaded and run" if cached else "a numba kernel compiled (cache empty) and run"
    steps.append((label, _status()))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(run_benchmark.SHAPES), default="first")
    for key in run_benchmark.SHAPE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key, help=f"override the shape's {key}")
    ap.add_argument("--out", default=str(HERE / "out"), help="where run_benchmark.py caches its datasets")
    ap.add_argument("--_child", metavar="TASKS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child)))
        return 0
    shape = dict(run_benchmark.SHAPES[args.shape])
    shape.update({key: getattr(args, key) for key in run_benchmark.SHAPE_KEYS if getattr(args, key) is not None})
    tasks = plan(shape, args.shape, args.out)
    # a fresh interpreter, with the environment a worker starts with
    from warehouse.run.processes import ONE_THREAD_ENV

    env = {**run_benchmark.child_env(), **{var: "1" for var in ONE_THREAD_ENV}}
    with tempfile.TemporaryDirectory() as tmp:
        tasks_file = os.path.join(tmp, "tasks.pkl")
        with open(tasks_file, "wb") as fh:
            pickle.dump(tasks, fh)
        proc = subprocess.run([sys.executable, __file__, "--_child", tasks_file],
                              env=env, capture_output=True, text=True, check=True)
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    width = max(len(label) for label, _ in steps)
    print(f"{args.shape}: one worker's resident memory, MiB (+ change from the step before)")
    print(f"  {'step':<{width}}  {'VmRSS':>13}  {'RssAnon':>13}  {'RssFile':>13}  {'VmHWM':>7}")
    prev = None
    for label, st in steps:
        cells = []
        for key in ("VmRSS", "RssAnon", "RssFile"):
            delta = "" if prev is None else f"{st[key] - prev[key]:+6.1f}"
            cells.append(f"{st[key]:6.1f} {delta:>6}")
        print(f"  {label:<{width}}  " + "  ".join(cells) + f"  {st['VmHWM']:7.1f}")
        prev = st
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
