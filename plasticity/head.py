"""Per-head pipeline (docs/method.md#the-per-head-analysis): orientation -> regression -> predictability -> rotation ->
normality -> weights -> attention plasticity."""

from __future__ import annotations

import numpy as np

from .estimators import (
    KeyBasis,
    QueryBuckets,
    aggregate_cells,
    full_cov_model,
    linear_diag_model,
    plasticity_cells,
    summarize_buckets,
)
from .jackknife import ExampleJackknife, calibrated_intervals, example_groups, example_jackknife, t_interval
from .normality import first_component_residual_stats, ks_columns, noise_summary
from .pairs import KeyPairIndex
from .query_pass import rotated_query_pass
from .regression import (
    BETA_NORM_TOL,
    PositionDesign,
    fit_rows,
    scalar_predictability_from_projection,
)
from .types import AnalysisParams, HeadResult, TokenArrays, canonical_sort_order
from .weights import component_weights

METRIC_KEYS = (
    "n_q_tokens", "n_k_tokens", "d_model", "q_R2_pos", "q_beta_norm", "q_R2_scalar",
    "q_mae_baseline", "q_mae_proj", "q_mae_ratio", "q_resid0_skew", "q_resid0_kurt",
    "q_resid0_ks_p", "q_noise_med_abs_skew", "q_noise_med_abs_kurt", "q_noise_med_ks_p",
    "q_noise_frac_ks_p_lt_alpha", "ap_overall", "ap_overall_se", "estimator",
    "ap_overall_se_pairs", "ap_overall_ci_low", "ap_overall_ci_high", "ap_se_df", "n_examples", "ap_ci_calibrated",
)


class DegenerateHead(ValueError):
    """The head's rows leave its metrics undefined (``side``: 'q' or 'k', whose rows are the cause)."""

    def __init__(self, side: str, message: str):
        self.side = side
        super().__init__(message)


def all_rows_identical(V: np.ndarray) -> bool:
    """True when ``V`` (n, d) has at least 2 rows and every row equals the first:
    ``max_c (max_i V_ic - min_i V_ic) = 0``. (A single row has no spread to measure; callers refuse
    heads with too few rows on their own terms.)"""
    V = np.asarray(V)
    if V.shape[0] < 2 or np.any(V[1] != V[0]):  # the usual answer, in O(d)
        return False
    return bool(np.all(V.max(axis=0) == V.min(axis=0)))


def degenerate_reason(q_vectors: np.ndarray, k_vectors: np.ndarray) -> tuple[str, str] | None:
    """Why a head's metrics are undefined, as (side, reason), or None when they are defined.

    Every query identical: each component's position fit is ``1 - SS_res / max(SS_tot, 1e-12)``
    with ``SS_res = SS_tot = 0`` (R2 = 1 by the floor, not by the data), and for a zero query every
    pair has ``m = 0`` and ``v = 0`` (AP = 4 Phi(0)(1 - Phi(0)) = 1 by the variance floor, with a
    zero standard error). Every key identical: every key difference ``D`` is 0, so every pair is
    ``0 / 0`` again. Reporting those as a perfect score would be a number the data never gave."""
    if all_rows_identical(q_vectors):
        what = "zero" if not np.any(np.asarray(q_vectors)[0]) else "the same vector"
        return "q", (f"every query vector is {what} ({q_vectors.shape[0]} rows): no spread, so the position fit's "
                     "R2 and the attention plasticity are 0/0, undefined")
    if all_rows_identical(k_vectors):
        return "k", (f"every key vector is the same ({k_vectors.shape[0]} rows): every key difference is 0, so the "
                     "attention plasticity of every pair is 0/0, undefined")
    return None


def pair_rng_seed(seed: int, layer: int, q_head: int) -> int:
    """Seed of the key-pair stream: ``seed + 10007 * layer + 379 * q_head`` (docs/method.md#attention-plasticity)."""
    return int(seed) + 10007 * int(layer) + 379 * int(q_head)


def stored_vectors(V: np.ndarray) -> np.ndarray:
    """``V`` as a float32 or float64 array (float32 kept: widening to float64 is exact, so it can
    wait until the values are used); any other type becomes float64."""
    V = np.asarray(V)
    return V if V.dtype in (np.float32, np.float64) else V.astype(np.float64)


def oriented_rows(V: np.ndarray, order: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``X = V[order] * s`` as a new C-contiguous float64 array, in one compiled pass from the
    stored precision (`plasticity.kernels.rows`; ``order`` may be the identity). Equal, element for
    element, to widening V to float64 first."""
    from .kernels.rows import oriented_copy  # numba: imported when a head is analysed, not with this module

    V = np.ascontiguousarray(stored_vectors(V))
    order = np.asarray(order, dtype=np.int64)
    n = V.shape[0]
    same = order.shape[0] == n and np.array_equal(order, np.arange(n))
    X = np.empty((n if same else order.shape[0], V.shape[1]))
    oriented_copy(V, np.zeros(0, np.int64) if same else order, np.ascontiguousarray(s, dtype=np.float64), X)
    return X


def canonical_order(t: TokenArrays) -> np.ndarray:
    """Row order of `TokenArrays.canonical()` -- by (bucket, example_id, position) -- made total:
    rows that tie on all three are ordered by the bytes of their vectors, so the order depends only
    on the set of rows, never on the input order."""
    order = canonical_sort_order(np.asarray(t.bucket), np.asarray(t.example_id), np.asarray(t.position))
    n = order.shape[0]
    if n > 1:
        b, e, p = t.bucket[order], t.example_id[order], t.position[order]
        tie = (b[1:] == b[:-1]) & (e[1:] == e[:-1]) & (p[1:] == p[:-1])
        if np.any(tie):
            in_tie = np.r_[tie, False] | np.r_[False, tie]
            idx = np.flatnonzero(in_tie)
            group = np.cumsum(np.r_[True, ~tie])[idx]
            rows = np.ascontiguousarray(np.asarray(t.vectors, dtype=np.float64)[order[idx]])
            raw = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
            _, rank = np.unique(raw, return_inverse=True)
            order[idx] = order[idx][np.lexsort((rank.reshape(-1), group))]
    return order


def canonicalize(t: TokenArrays) -> TokenArrays:
    """`TokenArrays` re-ordered by `canonical_order`, with float64/int64 arrays."""
    order = canonical_order(t)
    return TokenArrays(
        bucket=np.asarray(t.bucket)[order].astype(np.int64),
        example_id=np.asarray(t.example_id)[order].astype(np.int64),
        position=np.asarray(t.position, dtype=np.float64)[order],
        vectors=np.asarray(t.vectors, dtype=np.float64)[order],
        sliding_window=t.sliding_window,
        token_str=None if t.token_str is None else t.token_str[order],
    )


def analyze_head(
    q: TokenArrays,
    k: TokenArrays,
    orientation: np.ndarray,
    *,
    layer: int,
    q_head: int,
    params: AnalysisParams,
) -> HeadResult:
    """Run the per-head analysis (orientation to attention plasticity) on one head's (sub)sampled queries ``q`` and keys ``k``.

    ``orientation`` is the orientation's sign vector s (computed from ALL key rows, see
    `plasticity.orientation`); Q and K are multiplied by it. Rows are put in canonical order
    (`canonical_order`) first, so results depend only on the sets of rows. The query shard's
    ``sliding_window`` drives key-bucket eligibility.
    """
    if q.d != k.d:
        raise ValueError(f"query vectors have width {q.d} but key vectors have width {k.d}")
    if q.n == 0:
        raise ValueError("query shard has no rows")
    if k.n == 0:
        raise ValueError("key shard has no rows")
    d = q.d
    if d == 0:
        raise ValueError("vectors have width 0")
    degenerate = degenerate_reason(q.vectors, k.vectors)
    if degenerate is not None:
        raise DegenerateHead(*degenerate)
    s = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if s.shape != (d,):
        raise ValueError(f"orientation has length {s.shape[0]}, expected {d}")

    # canonical order: queries are materialised oriented (X_q), keys only indexed
    oq = canonical_order(q)
    ok = canonical_order(k)
    q_bucket = np.asarray(q.bucket)[oq].astype(np.int64)
    p = np.asarray(q.position, dtype=np.float64)[oq]
    n = q.n
    Xq = oriented_rows(q.vectors, oq, s)  # X_q = (V_q * s) in canonical order, float64

    # position regression
    design = PositionDesign.build(p)
    fit = fit_rows(design, Xq, exact_residuals=False)  # only r2, beta and the means are used

    # rotation X_q_rot = X_q H, fused with the statistics of the scalar predictability, the rotation's refit,
    # the normality diagnostics and attention plasticity (one pass)
    buckets = QueryBuckets.build(q_bucket, p)
    sel = np.sort(ks_columns(d - 1, params.normality_max_dims, params.seed))  # order-free statistics
    full = params.estimator == "bucket_full_cov"
    rq = rotated_query_pass(Xq, design, fit, q_bucket, buckets, sel, bucket_cov=full)
    fit_rot = rq.fit_rot
    scale = float(np.sqrt(np.sum(rq.mean**2 + rq.m2)))  # RMS row norm of X_q

    # scalar predictability: X_q u is column 0 of X_q_rot
    scalar = scalar_predictability_from_projection(p, rq.x0 if fit.beta_norm >= BETA_NORM_TOL else None)

    # normality
    skew0, kurt0, ks0 = first_component_residual_stats(p, rq.x0, scale=scale)
    noise = noise_summary(n, rq.m2[1:], rq.m3[1:], rq.m4[1:], rq.Z, rq.Z_center, sel, scale, params.p_alpha)

    # component weights
    weights = component_weights(fit.r2)

    # attention plasticity on raw key differences; the query model is mapped into the raw basis
    if full:
        model = full_cov_model(buckets, rq.mu, rq.Sigma, fit_rot.alpha, fit_rot.beta, fit_rot.resid_var, positions=p)
    else:
        model = linear_diag_model(buckets, fit_rot.alpha, fit_rot.beta, fit_rot.resid_var, positions=p)
    k_example = np.asarray(k.example_id)[ok]
    kindex = KeyPairIndex.build(np.asarray(k.bucket)[ok], k_example, np.asarray(k.position, dtype=np.float64)[ok])
    q_example = np.asarray(q.example_id)[oq]
    groups = example_groups(q_example, k_example)
    from .kernels.pairs import key_differences  # numba: imported when a head is analysed, not with this module

    Kv = np.ascontiguousarray(stored_vectors(k.vectors))
    # loaded shards come in canonical order (no mapping)
    key_rows = np.zeros(0, np.int64) if np.array_equal(ok, np.arange(k.n)) else ok.astype(np.int64)

    def key_diff(i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
        # one compiled pass from the stored precision (no copies of the two sides): float64
        # differences of the widened vectors, the same values as np.subtract(a, b, dtype=float64)
        return key_differences(Kv, i1, i2, key_rows)

    table = plasticity_cells(
        model, kindex, key_diff,
        sliding_window=None if q.sliding_window is None else int(q.sliding_window),
        num_pairs_per_bucket=params.num_pairs_per_bucket,
        rng=np.random.default_rng(pair_rng_seed(params.seed, layer, q_head)),
        basis=KeyBasis(s=s, w=rq.w),
        key_group=groups.k_group,
        n_groups=groups.n_groups,
    )
    ap, se_pairs = aggregate_cells(table)
    jk = example_jackknife(table, buckets, Xq, design, q_bucket, q_example, groups, fit, fit_rot, rq.x0, rq.w,
                           rq.mu, rq.Sigma)
    ci_low, ci_high = t_interval(ap, jk.ap_se, jk.df)
    summary_rows = bucket_summary_rows(table, buckets, jk)
    weight = summary_rows["n_cells"] if params.estimator == "linear_diag" else summary_rows["n_queries"]
    head_calibrated, bucket_calibrated = calibrated_intervals(summary_rows["n_queries"], weight, jk.df, jk.ap_se,
                                                              summary_rows["ap_se"])
    summary_rows["ap_ci_calibrated"] = bucket_calibrated

    metrics = {
        "n_q_tokens": int(q.n),
        "n_k_tokens": int(k.n),
        "d_model": int(d),
        "q_R2_pos": float(fit.r2_overall),
        "q_beta_norm": float(fit.beta_norm),
        **{key: float(val) for key, val in scalar.items()},
        "q_resid0_skew": float(skew0),
        "q_resid0_kurt": float(kurt0),
        "q_resid0_ks_p": float(ks0),
        **{key: float(val) for key, val in noise.items()},
        "ap_overall": float(ap),
        "ap_overall_se": float(jk.ap_se),
        "estimator": params.estimator,
        "ap_overall_se_pairs": float(se_pairs),
        "ap_overall_ci_low": float(ci_low),
        "ap_overall_ci_high": float(ci_high),
        "ap_se_df": int(jk.df),
        "n_examples": int(jk.n_examples),
        "ap_ci_calibrated": head_calibrated,
    }
    metrics = {key: metrics[key] for key in METRIC_KEYS}
    return HeadResult(
        metrics=metrics,
        bucket_rows=table.rows(),
        bucket_summary_rows=summary_rows,
        component_rows={
            "component": np.arange(d, dtype=np.int64),
            "component_r2": fit.r2.astype(np.float64),
            "weight": weights,
        },
    )


def bucket_summary_rows(table, buckets: QueryBuckets, jk: ExampleJackknife) -> dict[str, np.ndarray]:
    """One row per query bucket with a non-NaN AP_j: its query count and mean position, cells and pairs,
    AP_j with its example-jackknife standard error and 95% interval, and the pair-only standard error."""
    summary = summarize_buckets(table)
    if not np.array_equal(summary.bucket, jk.bucket):
        raise AssertionError("jackknife buckets differ from the bucket summary")
    jj = np.searchsorted(buckets.bucket, summary.bucket)
    ok = ~np.isnan(table.plasticity)
    n_pairs = np.bincount(np.searchsorted(summary.bucket, table.q_bucket[ok]), weights=table.n_pairs[ok],
                          minlength=summary.bucket.shape[0])
    low, high = t_interval(summary.ap, jk.bucket_se, jk.df)
    return {
        "q_bucket": summary.bucket.astype(np.int64),
        "n_queries": summary.n.astype(np.int64),
        "mean_position": buckets.tau[jj].astype(np.float64),
        "n_cells": summary.n_cells.astype(np.int64),
        "n_pairs": n_pairs.astype(np.int64),
        "ap": summary.ap.astype(np.float64),
        "ap_se": jk.bucket_se.astype(np.float64),
        "ap_ci_low": low.astype(np.float64),
        "ap_ci_high": high.astype(np.float64),
        "ap_se_pairs": np.sqrt(summary.var).astype(np.float64),
    }
