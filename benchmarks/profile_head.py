"""Where one head's time goes: per-stage CPU time of loading and `analyze_head`, next to the
native floors the same data imposes (Arrow decode, BLAS products, the KS sort).

    .venv/bin/python benchmarks/profile_head.py                  # first shape, 6 GQA groups
    .venv/bin/python benchmarks/profile_head.py --shape qwen --groups 3

One process, one BLAS thread and the workers' malloc settings, i.e. what one worker of
`analyze_dataset` does per head, on the datasets `run_benchmark.py` generates (cached under
``--out``). Each stage is timed by wrapping the function `plasticity.head.analyze_head` calls,
so nested stages are shown indented under their parent and the top-level stages add up to the
head. The floors time the bare operation on the same sizes: what no implementation of the per-head analysis
can avoid on this machine (the products are needed for exact statistics; the full KS sort is shown
for comparison: the binned KS statistic of `plasticity.kernels.ks` gives the same bits without it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS, as in the workers

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402

import run_benchmark  # noqa: E402

SHAPE_KEYS = run_benchmark.SHAPE_KEYS

#: (module, attribute, label, parent label): the stages of `analyze_head`, in call order.
STAGES = (
    ("plasticity.head", "canonical_order", "canonical order (q and k)", None),
    ("plasticity.head", "oriented_rows", "oriented queries X_q (float64 copy)", None),
    ("plasticity.head", "fit_rows", "position regression", None),
    ("plasticity.head", "rotated_query_pass", "rotated query pass (bucket covariances)", None),
    ("plasticity.head", "scalar_predictability_from_projection", "scalar predictability", None),
    ("plasticity.head", "first_component_residual_stats", "first-component normality", None),
    ("plasticity.head", "noise_summary", "semantic normality + KS", None),
    ("plasticity.head", "example_groups", "example groups (jackknife)", None),
    ("plasticity.head", "plasticity_cells", "pair plasticity", None),
    ("plasticity.pairs.KeyPairIndex", "draw", "pair draws", "pair plasticity"),
    ("plasticity.estimators", "debiased_ap_with_slopes", "AP and its slopes (with the jackknife)", "pair plasticity"),
    ("plasticity.pair_influence.PairInfluenceBuilder", "add_bucket", "pair side of the jackknife (syrk)",
     "pair plasticity"),
    ("plasticity.head", "aggregate_cells", "aggregation", None),
    ("plasticity.head", "example_jackknife", "example jackknife: query side and replicates", None),
    ("plasticity.query_influence.QuadraticForm", "rows", "query quadratic forms (trmm)",
     "example jackknife: query side and replicates"),
    ("plasticity.query_influence", "query_run_sums", "per-run sums of the queries",
     "example jackknife: query side and replicates"),
    ("plasticity.head", "bucket_summary_rows", "bucket summary", None),
)


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def instrument(totals: dict[str, float]) -> None:
    """Wrap every stage so that its CPU time accumulates in ``totals[label]``."""
    for owner_path, attr, label, _ in STAGES:
        owner = _resolve(owner_path)
        fn = getattr(owner, attr)

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.process_time()
            try:
                return _fn(*a, **k)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.process_time() - t

        setattr(owner, attr, timed)


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def native_floors(q_paths: list[str], q_rows, n_pairs: int, n_buckets: int, ks_cols: int) -> dict[str, float]:
    """CPU seconds per head of the bare native operations on this head's sizes."""
    import pyarrow.parquet as pq

    d = q_rows.d
    n = q_rows.n
    rng = np.random.default_rng(0)
    decode = _best(lambda: [pq.ParquetFile(p).read(columns=["vector"], use_threads=False) for p in q_paths])
    decode /= len(q_paths)
    per = max(1, n_pairs // max(1, n_buckets))  # the pairs of one query bucket share its covariance
    D = rng.standard_normal((per, d))
    M = np.cov(rng.standard_normal((4 * d, d)), rowvar=False)
    gemm = _best(lambda: [np.einsum("ij,ij->i", D @ M, D) for _ in range(n_buckets)])
    Y = rng.standard_normal((max(2, n // max(1, n_buckets)), d - 1))
    syrk = _best(lambda: [Y.T @ Y for _ in range(n_buckets)])
    Z = rng.standard_normal((ks_cols, n))
    sort = _best(lambda: np.sort(Z, axis=1))
    return {
        "Arrow decode of the vector column (per shard)": decode,
        f"quadratic forms D^T S D, {n_pairs} pairs x d={d} (GEMM + row dots)": gemm,
        f"bucket covariances, {n_buckets} x ({Y.shape[0]} x {d - 1}) (syrk)": syrk,
        f"KS sort (skipped by the binned statistic), {ks_cols} columns x {n} values": sort,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(run_benchmark.SHAPES), default="first")
    ap.add_argument("--groups", type=int, default=6, help="GQA groups to analyse (after one warm-up group)")
    for key in SHAPE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key, help=f"override the shape's {key}")
    ap.add_argument("--out", default=str(HERE / "out"), help="where run_benchmark.py caches its datasets")
    args = ap.parse_args(argv)

    from plasticity.head import analyze_head
    from plasticity.normality import ks_columns
    from plasticity.orientation import orientation_from_bucket_sums
    from warehouse.run import planning
    from warehouse.run import worker_pool
    from warehouse.settings.config import RunConfig
    from warehouse.run.loading import load_rows

    worker_pool._keep_freed_memory()  # as in the workers
    shape = dict(run_benchmark.SHAPES[args.shape])
    shape.update({key: getattr(args, key) for key in SHAPE_KEYS if getattr(args, key) is not None})
    spec = run_benchmark.synthetic_spec(shape, args.shape)
    root, _ = run_benchmark.ensure_dataset(spec, Path(args.out), os.cpu_count() or 1)
    cfg = RunConfig()
    cat = planning.profile_catalog(planning.find_catalog(root, cfg))
    groups = planning.plan_groups(cat, cfg)[: args.groups + 1]
    if len(groups) < 2:
        raise SystemExit("need at least 2 groups (one warms up)")

    totals: dict[str, float] = {}
    load_k = load_q = analyze = 0.0
    heads = 0
    last = None
    for i, task in enumerate(groups):
        if i == 1:  # the first group only warms up imports, caches and the allocator
            instrument(totals)
            totals.clear()
            load_k = load_q = analyze = 0.0
            heads = 0
        t = time.process_time()
        k_rows, (_, sums, counts) = load_rows(None, task.k_info, task.cap, task.params.seed, key_sums=True)
        orientation = orientation_from_bucket_sums(sums, counts)
        load_k += time.process_time() - t
        for q_head, q_info in task.queries:
            t = time.process_time()
            q_rows = load_rows(None, q_info, task.cap, task.params.seed)
            load_q += time.process_time() - t
            t = time.process_time()
            res = analyze_head(q_rows, k_rows, orientation, layer=task.layer, q_head=q_head, params=task.params)
            analyze += time.process_time() - t
            heads += 1 if i else 0
            last = (q_rows, res)

    ms = 1e3 / heads
    total = load_k + load_q + analyze
    print(f"{args.shape}: {heads} heads ({len(groups) - 1} groups), CPU per head {total * ms:.1f} ms "
          f"-> {1e3 / (total * ms):.1f} heads/s per core")
    rows = [("load: key shard + orientation sums (share of the group)", load_k, 0),
            ("load: query shard", load_q, 0),
            ("analyze_head", analyze, 0)]
    for _, _, label, parent in STAGES:
        if label in totals:
            rows.append((label, totals[label], 2 if parent else 1))
    covered = sum(totals[label] for _, _, label, parent in STAGES if parent is None and label in totals)
    rows.append(("other (small steps, result assembly)", analyze - covered, 1))
    width = max(len(r[0]) + 2 * r[2] for r in rows)
    for label, sec, depth in rows:
        name = "  " * depth + label
        print(f"  {name:<{width}}  {sec * ms:7.1f} ms  {100 * sec / total:5.1f}%")

    q_rows, res = last
    n_pairs = int(np.sum(res.bucket_rows["n_pairs"]))
    n_buckets = int(np.unique(res.bucket_rows["q_bucket"]).shape[0])
    ks_cols = ks_columns(q_rows.d - 1, cfg.normality_max_dims, cfg.seed).shape[0]
    floors = native_floors([i.path for _, i in groups[-1].queries], q_rows, n_pairs, n_buckets, ks_cols)
    print("native floors (CPU per head; decode also once per key shard, shared by the group):")
    width = max(len(k) for k in floors)
    for label, sec in floors.items():
        print(f"  {label:<{width}}  {sec * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
