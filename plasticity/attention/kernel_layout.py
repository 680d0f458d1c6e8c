"""The array layout the compiled attention kernel (`kernel.block_stats`) reads and writes.

Kept apart from `kernel` so that code which only lays out or reads those arrays (the scan of a
head with nothing to compute, e.g. a head skipped for low key coverage) never imports numba.
"""

#: Bins per level of the k_eff selection.
N_BINS = 64
#: Rows of the ``rows`` argument of `block_stats`, one column per query row of the block.
ROW_FIELDS = ("pq", "lo", "hi", "near_lo", "out_row", "rank", "is_early", "qcode")
#: Rows of the float ``out`` argument: per (row, scale) statistics.
OUT_FIELDS = ("entropy", "max_attn", "row_std")
#: Rows of the ``extras`` argument: per-row scale-1 statistics.
EXTRA_FIELDS = ("near", "far", "same", "diff")
