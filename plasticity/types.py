"""Plain data containers shared by the math (`plasticity`) and the I/O layer (`warehouse`).

They hold numpy arrays only; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ESTIMATORS = ("bucket_full_cov", "linear_diag")


@dataclass(frozen=True)
class AnalysisParams:
    """Knobs of the per-head analysis (docs/method.md#the-per-head-analysis). Defaults are the method's."""

    normality_max_dims: int = 64
    p_alpha: float = 0.01
    seed: int = 0
    num_pairs_per_bucket: int = 256
    estimator: str = "bucket_full_cov"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        if self.num_pairs_per_bucket < 1:
            raise ValueError("num_pairs_per_bucket must be >= 1")
        if self.normality_max_dims < 0:
            raise ValueError("normality_max_dims must be >= 0")


@dataclass
class TokenArrays:
    """The (sub)sampled rows of one shard, in canonical order (bucket, example_id, position).

    `vectors` is (n, d) in the precision the shard stores (float32 or float64: float32 shards stay
    half the size in memory); every computation widens it to float64. `position` float64;
    `bucket`/`example_id` int64.
    `sliding_window` is the shard's single window (None = full causal attention).
    `token_str` is an object array of strings when the shard captured them, else None.
    """

    bucket: np.ndarray
    example_id: np.ndarray
    position: np.ndarray
    vectors: np.ndarray
    sliding_window: int | None = None
    token_str: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        for name in ("bucket", "example_id", "position"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    def canonical(self) -> "TokenArrays":
        """Rows sorted by (bucket, example_id, position); a no-op copy when already sorted."""
        order = np.lexsort((self.position, self.example_id, self.bucket))
        if np.all(order == np.arange(self.n)):
            return self
        return TokenArrays(
            bucket=self.bucket[order],
            example_id=self.example_id[order],
            position=self.position[order],
            vectors=self.vectors[order],
            sliding_window=self.sliding_window,
            token_str=None if self.token_str is None else self.token_str[order],
        )


def canonical_sort_order(bucket: np.ndarray, example_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``np.lexsort((position, example_id, bucket))``, computed via one stable argsort of a packed
    int64 key when all three are integral and fit in 63 bits (same permutation, faster)."""
    n = bucket.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    keys = []
    for col in (bucket, example_id, position):
        col = np.asarray(col)
        if col.dtype.kind == "f":
            if not np.all(np.isfinite(col)) or np.any(col != np.floor(col)) or np.abs(col).max() > 2**53:
                return np.lexsort((position, example_id, bucket))
            col = col.astype(np.int64)
        elif col.dtype.kind not in "iu":
            return np.lexsort((position, example_id, bucket))
        col = col.astype(np.int64, copy=False)
        lo = int(col.min())
        keys.append((col, lo, int(col.max()) - lo))
    bits = [max(1, int(span).bit_length()) for _, _, span in keys]
    if sum(bits) > 63:
        return np.lexsort((position, example_id, bucket))
    packed = np.zeros(n, np.int64)
    for (col, lo, _), nb in zip(keys, bits):
        packed <<= nb
        packed |= col - lo
    if np.all(packed[1:] >= packed[:-1]):
        return np.arange(n, dtype=np.int64)
    return np.argsort(packed, kind="stable").astype(np.int64)


@dataclass
class HeadResult:
    """Everything the tables store for one head (layer/q_head/k_head are added by the caller).

    `metrics`: the head_metrics columns from `n_q_tokens` to `estimator`.
    `bucket_rows`: columns q_bucket, k_bucket (int64), plasticity (float64, NaN allowed), n_pairs (int64).
    `component_rows`: columns component (int64), component_r2, weight (float64).
    `bucket_summary_rows`: per query bucket with a non-NaN AP_j: q_bucket, n_queries, mean_position,
    n_cells, n_pairs, ap, ap_se, ap_ci_low, ap_ci_high, ap_se_pairs, ap_ci_calibrated (`head_bucket_summary`).
    """

    metrics: dict
    bucket_rows: dict[str, np.ndarray] = field(default_factory=dict)
    component_rows: dict[str, np.ndarray] = field(default_factory=dict)
    bucket_summary_rows: dict[str, np.ndarray] = field(default_factory=dict)
