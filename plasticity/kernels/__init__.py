"""Compiled numba kernels of the per-head analysis (``cache=True``): pure functions on numpy arrays,
no I/O; they import numpy and numba only, never another module of ours.

Each kernel file is self-contained on purpose: numba's on-disk cache of a function is invalidated
when *its* source file changes, not when a jitted function it calls changes in another file.

* `ks`         the candidates of a Kolmogorov-Smirnov maximum from binned counts (no full sort)
* `query_sums` the rotated query pass's sums (moments, position sums), column 0, KS columns, bucket rows
* `pairs`      key differences of sampled pairs, gathered from the stored vectors
* `rows`       the oriented queries (reordered, signed, widened) from the stored vectors

The callers (`plasticity.normality`, `plasticity.query_pass`, `plasticity.head`) keep the formulas'
reference statements; `warehouse.run.kernel_cache` compiles this family ("analysis") once per machine.
"""


def load() -> None:
    """Load every kernel of this family (from numba's cache once it is warm, else compiling it) by
    calling it once on tiny arrays of the types the analysis passes, so a worker's first head does
    not pay for it."""
    import numpy as np

    from .ks import ks_candidates
    from .pairs import key_differences
    from .query_sums import rotated_block_sums
    from .rows import oriented_copy

    ks_candidates(np.zeros((1, 2)), np.zeros(1), np.ones(1), np.array([0.0, 0.5, 1.0, 1.0]), 1.0, 0.5)
    d2, cols = np.zeros(2), np.ones(1, np.int64)
    rotated_block_sums(np.eye(2), 0, d2, True, cols, d2.copy(), d2.copy(), d2.copy(), d2.copy(), d2.copy(),
                       np.zeros((1, 2)), np.zeros((2, 1)), 0, True, True, np.zeros(1), 32)
    pair = np.zeros(1, np.int64)
    for dtype in (np.float32, np.float64):  # captures store either
        key_differences(np.zeros((1, 2), dtype), pair, pair, pair)
        oriented_copy(np.zeros((1, 2), dtype), pair, np.ones(2), np.zeros((1, 2)))
