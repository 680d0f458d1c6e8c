"""Per-query rows, per-head summary and query-scale sweep of one head (docs/method.md#attention-patterns).

Per query token (scale 1.0 unless stated), over the captured keys it may see:
    ``entropy``        -sum a log a in nats; NaN when the position is < 2 or the
                       query sees no key.
    ``entropy_ratio``  entropy / log(n_keys); NaN when n_keys < 2 or entropy is NaN.
    ``max_attn``       largest weight; NaN when n_keys == 0.
    ``k_eff``          fewest keys whose (largest-first) weights reach 0.9 of the mass (a
                       1e-12 tolerance absorbs summation rounding: ten weights of 0.1 reach
                       0.9); 0 when n_keys == 0.
    ``row_std``        population std of the weights over the visible keys.
    ``query_norm``     L2 norm of the unscaled query.
    ``n_keys``, ``n_visible``, ``key_coverage``, ``exact``: see `visibility`.

Only **exact** rows (every visible key captured) describe the model's attention; every
per-head number below is computed from them alone:

    means of the token columns (entropy over positions >= 2), ``row_std``, the class
    (``entropy_ratio`` <= 0.5 sharp, >= 0.95 uniform), local bias (mean weight per key on
    keys with ``0 <= pq - pk <= local_window`` vs the further ones, over queries having both,
    and their ratio), same-token attraction (mean weight per key on keys with the query's token
    vs the others, own position left out, over queries having both), query-side variation
    (mean L2 distance between the rows of two exact queries 1 and 10 positions apart,
    each renormalised over the keys both may see; pairs with fewer than 2 shared keys are
    left out), the query-scale sweep (the means with q scaled by each scale), ``gain`` (OLS
    slope of mean max_attn against log(scale)) and whether mean entropy falls monotonically
    with the scale.

A head with fewer than ``min_exact_rows`` exact rows is **not estimable from this capture**:
its summary and sweep values are NaN (counts 0, class 'unknown', monotonic None), with the
reason in ``status_reason``. ``status``: 'exact' (every query row exact), 'partial' (enough
exact rows; the rest are left out), 'not_estimable' (computed with ``rows="all"``) or
'skipped' (``rows="exact"``: nothing was computed). The reconstruction checks
(``max_row_sum_error``, ``max_future_weight``, ``max_window_weight``: maxima over every
computed row and scale) test the arithmetic, so they cover every computed row; NaN when no row
was computed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..types import TokenArrays
from .classify import SHARP_MAX, UNIFORM_MIN, attention_class
from .columns import (
    ADJACENT_DELTA, DEFAULT_LOCAL_WINDOW, DEFAULT_SCALES, DISTANT_DELTA, ROW_MODES, STATUS_EXACT,
    STATUS_NOT_ESTIMABLE, STATUS_PARTIAL, STATUS_SKIPPED, SWEEP_COLUMNS,
)
from .gain import entropy_falls_monotonically, gain_fit
from .inputs import check_scales, int_positions, prepare
from .scan import RowStats, scan
from .visibility import Coverage, coverage, key_index, visible_ranges


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if (math.isfinite(a) and math.isfinite(b) and b != 0) else float("nan")


def entropy_ratio(entropy: np.ndarray, n_keys: np.ndarray) -> np.ndarray:
    """entropy / log(n_keys); NaN where n_keys < 2."""
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.log(n_keys.astype(np.float64))
        return np.where(n_keys >= 2, entropy / np.where(n_keys >= 2, denom, 1.0), np.nan)


class _Head:
    """A head's rows, their coverage and (after `run`) their statistics."""

    def __init__(self, q: TokenArrays, k: TokenArrays):
        self.q, self.k, self.window = prepare(q, k)
        self.qpos = int_positions(self.q.position, "query")
        kpos = int_positions(self.k.position, "key")
        self.index = key_index(np.asarray(self.q.example_id), self.qpos, np.asarray(self.k.example_id), kpos)
        self.lo, self.hi = visible_ranges(self.index, self.qpos, self.window)
        self.cov: Coverage = coverage(self.index, self.qpos, self.lo, self.hi, self.window)

    def run(self, compute: np.ndarray, scales, *, local_window: int, want_extras: bool, deltas=(),
            block_rows: int | None = None) -> RowStats:
        return scan(self.q, self.k, self.window, self.index, self.lo, self.hi, compute, self.cov.exact, scales,
                    local_window=local_window, want_extras=want_extras, deltas=deltas, block_rows=block_rows)

    def token_table(self, stats: RowStats, j: int) -> dict[str, np.ndarray]:
        ent = stats.entropy[:, j].copy()
        ent[self.qpos < 2] = np.nan
        return {
            "bucket": np.asarray(self.q.bucket, dtype=np.int64),
            "example_id": np.asarray(self.q.example_id, dtype=np.int64),
            "position": self.qpos.copy(),
            "entropy": ent,
            "entropy_ratio": entropy_ratio(ent, self.cov.n_keys),
            "max_attn": stats.max_attn[:, j].copy(),
            "k_eff": stats.k_eff[:, j].copy(),
            "query_norm": np.linalg.norm(np.asarray(self.q.vectors, dtype=np.float64), axis=1),
            "n_keys": self.cov.n_keys.copy(),
            "n_visible": self.cov.n_visible.copy(),
            "key_coverage": self.cov.key_coverage.copy(),
            "row_std": stats.row_std[:, j].copy(),
            "exact": self.cov.exact.copy(),
        }


def token_attention_metrics(
    q: TokenArrays,
    k: TokenArrays,
    *,
    scale: float = 1.0,
    block_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query columns (TOKEN_COLUMNS) at one query scale, every query row in canonical order,
    computed over its captured keys (``exact`` says where that is the model's attention)."""
    scale = check_scales([scale])[0]
    head = _Head(q, k)
    stats = head.run(np.ones(head.q.n, dtype=bool), (scale,), local_window=0, want_extras=False,
                     block_rows=block_rows)
    return head.token_table(stats, 0)


def query_variation(q: TokenArrays, k: TokenArrays, delta: int, *, block_rows: int | None = None) -> tuple[float, int]:
    """Mean L2 distance between the renormalised attention rows of exact queries ``delta``
    positions apart (see the module docstring), and the number of pairs; NaN without pairs."""
    if delta < 1:
        raise ValueError("delta must be >= 1")
    head = _Head(q, k)
    stats = head.run(head.cov.exact.copy(), (1.0,), local_window=0, want_extras=False, deltas=(int(delta),),
                     block_rows=block_rows)
    return stats.qvar_mean(delta)


def _status(cov: Coverage, qpos: np.ndarray, n_exact: int, estimable: bool, rows: str,
            min_exact_rows: int) -> tuple[str, str]:
    n = int(cov.exact.size)
    seeing = "see every key they may attend to"
    if estimable and n_exact == n:
        return STATUS_EXACT, f"all {n} query rows {seeing}"
    if estimable:
        at = qpos[cov.exact]
        return STATUS_PARTIAL, (f"{n_exact} of {n} query rows ({n_exact / n:.1%}) {seeing}, at positions "
                                f"{int(at.min())}-{int(at.max())}; the summaries use those rows only")
    cov_txt = f"; mean key coverage {float(np.mean(cov.key_coverage)):.3f}" if n else ""
    reason = (f"not estimable from this capture: {n_exact} of {n} query rows {seeing} "
              f"(min_exact_rows = {min_exact_rows}){cov_txt}")
    if rows == "exact":
        return STATUS_SKIPPED, reason + "; not computed (attention: auto)"
    return STATUS_NOT_ESTIMABLE, reason


def head_attention_metrics(
    q: TokenArrays,
    k: TokenArrays,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    sharp_max: float = SHARP_MAX,
    uniform_min: float = UNIFORM_MIN,
    local_window: int = DEFAULT_LOCAL_WINDOW,
    rows: str = "all",
    min_exact_rows: int = 1,
    block_rows: int | None = None,
) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray]]:
    """Attention metrics of one head.

    ``rows``: "all" computes every query row that sees a key; "exact" only the exact rows, and
    nothing when there are fewer than ``min_exact_rows`` of them. Returns
    ``(token_table, head_summary, sweep_rows)``: TOKEN_COLUMNS at scale 1.0 for every query row
    in canonical order (NaN, k_eff 0, where a row was not computed); SUMMARY_COLUMNS (plain
    Python scalars; ``sliding_window`` and ``entropy_monotonic`` may be None); SWEEP_COLUMNS, one
    row per configured scale in the given order.
    """
    scales = check_scales(scales)
    if local_window < 0:
        raise ValueError("local_window must be >= 0")
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
    if int(min_exact_rows) < 1:
        raise ValueError("min_exact_rows must be >= 1")
    head = _Head(q, k)
    cov, qpos = head.cov, head.qpos
    n_exact = int(cov.exact.sum())
    estimable = n_exact >= min_exact_rows
    compute = (cov.exact if estimable else np.zeros_like(cov.exact)) if rows == "exact" else np.ones_like(cov.exact)
    all_scales = scales if 1.0 in scales else scales + (1.0,)
    j1 = all_scales.index(1.0)
    stats = head.run(compute, all_scales, local_window=int(local_window), want_extras=True,
                     deltas=(ADJACENT_DELTA, DISTANT_DELTA), block_rows=block_rows)
    table = head.token_table(stats, j1)
    use = cov.exact & stats.computed if estimable else np.zeros_like(cov.exact)
    late = use & (qpos >= 2)

    def scale_means(j):
        return {
            "mean_entropy": _nanmean(stats.entropy[late, j]),
            "mean_entropy_ratio": _nanmean(entropy_ratio(stats.entropy[late, j], cov.n_keys[late])),
            "mean_max_attn": _nanmean(stats.max_attn[use, j]),
            "mean_k_eff": float(stats.k_eff[use, j].mean()) if use.any() else float("nan"),
            "mean_row_std": _nanmean(stats.row_std[use, j]),
        }

    per_scale = [scale_means(all_scales.index(s)) for s in scales]
    sweep = {"scale": np.asarray(scales, dtype=np.float64)}
    for col in SWEEP_COLUMNS[1:]:
        sweep[col] = np.asarray([r[col] for r in per_scale], dtype=np.float64)
    gain, gain_r2 = gain_fit(scales, sweep["mean_max_attn"])
    one = scale_means(j1)

    both = use & np.isfinite(stats.near) & np.isfinite(stats.far)
    near_m, far_m = _nanmean(stats.near[both]), _nanmean(stats.far[both])
    tok = use & np.isfinite(stats.same) & np.isfinite(stats.diff)
    same_m, diff_m = _nanmean(stats.same[tok]), _nanmean(stats.diff[tok])
    qv_adj, n_adj = stats.qvar_mean(ADJACENT_DELTA) if estimable else (float("nan"), 0)
    qv_far, n_far = stats.qvar_mean(DISTANT_DELTA) if estimable else (float("nan"), 0)
    checked = bool(stats.computed.any())
    status, reason = _status(cov, qpos, n_exact, estimable, rows, int(min_exact_rows))
    n_q = int(head.q.n)

    summary = {
        "n_queries": n_q,
        "n_queries_with_keys": int((cov.n_keys > 0).sum()),
        "n_examples": int(np.unique(head.q.example_id).size),
        "head_dim": int(head.q.d) if head.q.n else int(head.k.d) if head.k.n else 0,
        "sliding_window": head.window,
        "mean_entropy": one["mean_entropy"],
        "mean_entropy_ratio": one["mean_entropy_ratio"],
        "mean_max_attn": one["mean_max_attn"],
        "mean_k_eff": one["mean_k_eff"],
        "mean_query_norm": _nanmean(table["query_norm"]),
        "mean_n_keys": float(cov.n_keys[use].mean()) if use.any() else float("nan"),
        "mean_key_coverage": _nanmean(cov.key_coverage),
        "row_std": one["mean_row_std"],
        "attn_class": attention_class(one["mean_entropy_ratio"], sharp_max, uniform_min),
        "local_window": int(local_window),
        "local_attn_near": near_m,
        "local_attn_far": far_m,
        "local_bias_ratio": _ratio(near_m, far_m),
        "same_token_attn": same_m,
        "diff_token_attn": diff_m,
        "same_token_ratio": _ratio(same_m, diff_m),
        "qvar_l2_adjacent": qv_adj,
        "qvar_l2_distant": qv_far,
        "qvar_pairs_adjacent": int(n_adj),
        "qvar_pairs_distant": int(n_far),
        "max_row_sum_error": float(stats.checks[0]) if checked else float("nan"),
        "max_future_weight": float(stats.checks[1]) if checked else float("nan"),
        "max_window_weight": float(stats.checks[2]) if checked else float("nan"),
        "gain": gain,
        "gain_r2": gain_r2,
        "entropy_monotonic": entropy_falls_monotonically(scales, sweep["mean_entropy"]),
        "status": status,
        "status_reason": reason,
        "n_exact_rows": n_exact,
        "exact_row_frac": n_exact / n_q if n_q else float("nan"),
        "min_exact_rows": int(min_exact_rows),
    }
    return table, summary, sweep
