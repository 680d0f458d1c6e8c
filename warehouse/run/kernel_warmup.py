"""The background process of the kernel warm-up: compiles one kernel family and marks it warmed.

`warehouse.run.kernel_cache.start_kernel_warmup` starts ``python -m warehouse.run.kernel_warmup PART``;
this module runs the pipeline's own code on a tiny generated head, so it sits above both
`warehouse.run.pipeline` and `warehouse.run.kernel_cache` (which the pipeline imports).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from warehouse.run.kernel_cache import PARTS, marker_path
from warehouse.run.processes import tie_to_parent


def warm_kernels(part: str) -> None:
    """Compile and cache one kernel family with a run's argument types, then mark it warmed."""
    if part not in PARTS:
        raise ValueError(f"unknown kernel family {part!r}: expected one of {', '.join(PARTS)}")
    (_warm_attention if part == "attention" else _warm_analysis)()
    marker = marker_path(part)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("numba kernels of this source are cached here\n")


def _warm_analysis() -> None:
    """A tiny generated dataset (dense, a sliding window) through the workers' own code: Parquet
    shards, `warehouse.run.loading` and `warehouse.run.group.compute_group` (the per-head analysis,
    attention off); then the signatures a worker loads at start (`plasticity.kernels.load`)."""
    import plasticity.kernels
    from plasticity.synthetic import SyntheticSpec
    from warehouse.run import group
    from warehouse.run import planning
    from warehouse.settings.config import RunConfig
    from warehouse.sources.demo_data import write_synthetic_dataset

    # key buckets of 320 rows: large enough for the kernels that only run on large buckets
    spec = SyntheticSpec(model="kernel-warmup", num_layers=2, num_q_heads=2, num_k_heads=1, head_dim=8,
                         num_examples=10, seq_len=256, bucket_size=32, sliding_windows={1: 64})
    with tempfile.TemporaryDirectory(prefix="plasticity-kernels-") as tmp:
        root = write_synthetic_dataset(Path(tmp) / spec.model, spec, with_truth=False)
        cfg = RunConfig(max_workers=1, attention="false")
        cat = planning.find_catalog(root, cfg)
        cfg = planning.resolved_config(cfg, cat.layout)
        for task in planning.plan_groups(cat, cfg, skip=set(), pairs=planning.head_pairs(cat, cfg)):
            for shard in (task.k_info, *(q for _, q in task.queries)):
                cat.profile(shard)
            errors = [o.error for o in group.compute_group(task) if o.error]
            if errors:
                raise RuntimeError(f"kernel warm-up: {errors[0]}")
    plasticity.kernels.load()


def _warm_attention() -> None:
    """The attention kernel's arguments are built inside `plasticity.attention` from any rows, so a
    tiny random head in memory (two examples, every position, token strings) compiles what a run
    uses, without the loader's or the generator's imports."""
    import numpy as np

    from plasticity.attention import head_attention_metrics
    from plasticity.types import TokenArrays

    rng = np.random.default_rng(0)
    position = np.tile(np.arange(128, dtype=np.float64), 2)
    example_id = np.repeat(np.arange(2, dtype=np.int64), 128)
    bucket = (position // 32).astype(np.int64)
    order = np.lexsort((position, example_id, bucket))  # canonical order: bucket, example, position
    tokens = np.array([f"t{i}" for i in rng.integers(0, 20, position.size)], dtype=object)

    def rows(window):
        return TokenArrays(bucket[order], example_id[order], position[order], rng.standard_normal((position.size, 8)),
                           sliding_window=window, token_str=tokens[order])

    for window in (None, 32):  # full causal attention, then a sliding window
        head_attention_metrics(rows(window), rows(window), scales=(0.5, 1.0))


def main(argv: list[str]) -> int:
    """``python -m warehouse.run.kernel_warmup PART [PARENT_PID]``."""
    if len(argv) > 1:
        tie_to_parent(int(argv[1]))
    warm_kernels(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
