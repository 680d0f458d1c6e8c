"""Per-head pipeline (SPEC 2.2-2.8): orientation -> regression -> predictability -> rotation ->
normality -> weights -> attention plasticity."""

from __future__ import annotations

import numpy as np

from .estimators import aggregate_cells, bucket_full_cov, linear_diag
from .normality import first_component_residual_stats, noise_normality_stats
from .regression import fit_position_regression, scalar_position_predictability
from .rotation import householder_apply
from .types import AnalysisParams, HeadResult, TokenArrays
from .weights import component_weights

METRIC_KEYS = (
    "n_q_tokens", "n_k_tokens", "d_model", "q_R2_pos", "q_beta_norm", "q_R2_scalar",
    "q_mae_baseline", "q_mae_proj", "q_mae_ratio", "q_resid0_skew", "q_resid0_kurt",
    "q_resid0_ks_p", "q_noise_med_abs_skew", "q_noise_med_abs_kurt", "q_noise_med_ks_p",
    "q_noise_frac_ks_p_lt_alpha", "ap_overall", "ap_overall_se", "estimator",
)


def pair_rng_seed(seed: int, layer: int, q_head: int) -> int:
    """Seed of the key-pair stream: ``seed + 10007 * layer + 379 * q_head`` (SPEC 2.8)."""
    return int(seed) + 10007 * int(layer) + 379 * int(q_head)


def canonicalize(t: TokenArrays) -> TokenArrays:
    """`TokenArrays.canonical()` with float64/int64 arrays, plus a total order for exact ties.

    Rows sharing (bucket, example_id, position) -- which canonical() leaves in input order -- are
    further ordered by their vector components, so the result depends only on the set of rows.
    """
    c = t.canonical()
    bucket = np.asarray(c.bucket).astype(np.int64)
    ex = np.asarray(c.example_id).astype(np.int64)
    pos = np.asarray(c.position, dtype=np.float64)
    vec = np.asarray(c.vectors, dtype=np.float64)
    tok = c.token_str
    if c.n > 1:
        tie = (bucket[1:] == bucket[:-1]) & (ex[1:] == ex[:-1]) & (pos[1:] == pos[:-1])
        if np.any(tie):
            # rows in a tie group, ordered by (group, vector[0], vector[1], ...); others stay put
            in_tie = np.r_[tie, False] | np.r_[False, tie]
            idx = np.flatnonzero(in_tie)
            group = np.cumsum(np.r_[True, ~tie])[idx]
            sub = vec[idx]
            keys = tuple(sub[:, j] for j in range(sub.shape[1] - 1, -1, -1)) + (group,)
            order = np.arange(c.n)
            order[idx] = idx[np.lexsort(keys)]
            bucket, ex, pos, vec = bucket[order], ex[order], pos[order], vec[order]
            tok = None if tok is None else tok[order]
    return TokenArrays(bucket=bucket, example_id=ex, position=pos, vectors=vec,
                       sliding_window=c.sliding_window, token_str=tok)


def analyze_head(
    q: TokenArrays,
    k: TokenArrays,
    orientation: np.ndarray,
    *,
    layer: int,
    q_head: int,
    params: AnalysisParams,
) -> HeadResult:
    """Run SPEC 2.2-2.8 on one head's (sub)sampled queries ``q`` and keys ``k``.

    ``orientation`` is the sign vector s of SPEC 2.2 (from ALL key rows; see
    `plasticity.orientation`); Q and K are multiplied by it. The query shard's
    ``sliding_window`` drives key-bucket eligibility. Results depend only on the sets of rows.
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
    s = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if s.shape != (d,):
        raise ValueError(f"orientation has length {s.shape[0]}, expected {d}")

    q = canonicalize(q)
    k = canonicalize(k)
    p = q.position
    n = q.n

    # 2.2 orientation, 2.3 position regression, 2.4 scalar predictability
    Xq = q.vectors * s
    fit = fit_position_regression(p, Xq)
    scalar = scalar_position_predictability(p, Xq, fit.beta)

    # 2.5 rotation (in place: Xq becomes X_q_rot) and refit
    householder_apply(Xq, fit.beta, out=Xq)
    fit_rot = fit_position_regression(p, Xq)
    resid_var = fit_rot.resid_var
    scale = float(np.sqrt(np.sum(fit_rot.mean**2 + fit_rot.ss_tot / n)))  # RMS row norm of X_q

    # 2.6 normality
    skew0, kurt0, ks0 = first_component_residual_stats(p, Xq[:, 0], scale=scale)
    noise = noise_normality_stats(Xq[:, 1:], params.normality_max_dims, params.p_alpha, params.seed, scale=scale)

    # 2.7 weights
    weights = component_weights(fit.r2)

    # 2.8 plasticity; keys are oriented and rotated only for the sampled differences
    Kv = k.vectors
    beta = fit.beta

    def key_diff(i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
        D = Kv[i1] - Kv[i2]
        D *= s
        return householder_apply(D, beta, out=D)

    window = None if q.sliding_window is None else int(q.sliding_window)
    est = bucket_full_cov if params.estimator == "bucket_full_cov" else linear_diag
    table = est(
        q.bucket, p, Xq, fit_rot.alpha, fit_rot.beta, resid_var,
        k.bucket, k.example_id, k.position, key_diff,
        sliding_window=window,
        num_pairs_per_bucket=params.num_pairs_per_bucket,
        rng=np.random.default_rng(pair_rng_seed(params.seed, layer, q_head)),
    )
    ap, se = aggregate_cells(table)

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
        "ap_overall_se": float(se),
        "estimator": params.estimator,
    }
    metrics = {key: metrics[key] for key in METRIC_KEYS}
    return HeadResult(
        metrics=metrics,
        bucket_rows=table.rows(),
        component_rows={
            "component": np.arange(d, dtype=np.int64),
            "component_r2": fit.r2.astype(np.float64),
            "weight": weights,
        },
    )
