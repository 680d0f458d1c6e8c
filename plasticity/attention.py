"""Attention patterns rebuilt from captured queries and keys (SPEC section 4, seeds 003/004).

Pure numpy (float64 throughout); no I/O. For one head, every captured query attends
over the captured keys of its own example that it may see, with

    a = softmax(s * q . k / sqrt(d))          (s = query scale; 1.0 outside the sweep)

Conventions (all decided here and documented in the README's attention section):

Visibility / sliding window
    Key at position ``pk`` is visible to a query at ``pq`` iff ``pk <= pq`` and, when the
    head has a sliding window ``w``, ``pk > pq - w``. A window of ``w`` therefore covers the
    ``w`` most recent positions *including the query's own* (HF ``sliding_window``
    semantics: ``kv_idx > q_idx - sliding_window``). The window is the query shard's
    ``sliding_window``, falling back to the key shard's; two different non-null windows
    are an error. ``n_visible = min(pq + 1, w)`` positions could be seen, and
    ``key_coverage = n_keys / n_visible`` (1.0 = dense capture; < 1 = estimate over a
    subset of keys).

Per query token (scale 1.0 unless stated)
    ``entropy``        -sum a log a in nats, from log-probabilities; NaN when the
                       position is < 2 (seed 003) or the query sees no key.
    ``entropy_ratio``  entropy / log(n_keys); NaN when n_keys < 2 or entropy is NaN.
    ``max_attn``       largest weight; NaN when n_keys == 0.
    ``k_eff``          fewest keys whose (largest-first) weights sum to >= 0.9; a
                       tolerance of 1e-12 absorbs summation rounding (ten weights of 0.1
                       reach 0.9). 0 when n_keys == 0 (int64 column).
    ``row_std``        population std (ddof=0) of the weights over the visible keys;
                       NaN when n_keys == 0.
    ``query_norm``     L2 norm of the unscaled query.

Local bias (scale 1.0)
    "near" keys are the visible keys with ``0 <= pq - pk <= local_window`` (the query's
    own position included, like seed 004's local baseline ``|i-j| <= 5``), "far" keys
    those with ``pq - pk > local_window``. Per query, the *mean weight per key* in each
    group; head values are the means over the queries that have at least one near and one
    far key, and ``local_bias_ratio = local_attn_near / local_attn_far``. Uniform
    attention gives exactly 1.0 (a query's near and far keys get the same 1/n).

Same token (scale 1.0, only when both shards carry ``token_str``)
    Among the visible keys other than the one at the query's own position, keys whose
    token text equals the query's vs the rest (missing tokens take part in neither
    group). Per query mean weight per key in each group, averaged over queries having
    both; ratio = same / diff. NaN when tokens are absent.

Query-side variation (scale 1.0)
    For every pair of captured queries of one example at positions ``p`` and ``p + D``
    (``D`` = 1 "adjacent", ``D`` = 10 "distant"), the shared keys are those both may
    see: ``pk <= p`` and, with a window, ``pk > p + D - w``. Each query's weights are
    restricted to the shared keys and renormalised (the conditional distribution over
    the shared keys, i.e. a softmax of its scores over them), and the pair's distance is
    the L2 norm of the difference. Pairs with fewer than 2 shared keys are skipped (the
    distance would be 0 by construction). Head values are the means over pairs; NaN
    when there is no pair. Uniform attention gives exactly 0.

Reconstruction checks
    Every row is computed over a block of keys that includes masked keys: all keys any
    query of the chunk can see, plus the next (future) key and the previous
    (out-of-window) key. The mask is applied as -inf before the softmax and the weights
    on masked keys are read back from the computed matrix: ``max_future_weight``
    (keys with pk > pq) and ``max_window_weight`` (keys with pk <= pq - w), plus
    ``max_row_sum_error = max |sum(row) - 1|``, all maxima over every scale of the sweep.

Memory
    Queries are processed per example in chunks of ``chunk_size`` rows; a chunk holds a
    handful of (chunk x key-block) float64 arrays, the key block being at most the
    example's keys. By default the chunk is the largest with
    ``chunk * n_keys_of_example <= 4_000_000`` (and, with a window w, at most max(w, 64)
    rows, so windowed heads cost O(n_q * w) instead of O(n_q * n_keys)). Query-variation
    pairs use half the rows (two score blocks per chunk).

Reproducibility
    Scores are computed with ``np.einsum`` (no BLAS), so each score is bit-identical
    whatever the chunking, BLAS build or thread count. Row reductions run over key blocks
    whose width depends on the chunk, so chunked and unchunked results agree to ~1 ulp
    (tested at rtol 1e-15); integer columns (n_keys, k_eff) agree exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from .types import TokenArrays

__all__ = [
    "DEFAULT_SCALES",
    "K_EFF_MASS",
    "TOKEN_COLUMNS",
    "SUMMARY_COLUMNS",
    "SWEEP_COLUMNS",
    "visible_mask",
    "attention_weights",
    "token_attention_metrics",
    "head_attention_metrics",
    "query_variation",
    "attention_class",
    "gain_fit",
    "gain_ratio",
]

DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
K_EFF_MASS = 0.9
_K_EFF_TOL = 1e-12
_BLOCK_BUDGET = 4_000_000  # elements of one (chunk x keys) float64 array

TOKEN_COLUMNS: tuple[str, ...] = (
    "bucket",
    "example_id",
    "position",
    "entropy",
    "entropy_ratio",
    "max_attn",
    "k_eff",
    "query_norm",
    "n_keys",
    "n_visible",
    "key_coverage",
    "row_std",
)

SWEEP_COLUMNS: tuple[str, ...] = (
    "scale",
    "mean_entropy",
    "mean_entropy_ratio",
    "mean_max_attn",
    "mean_k_eff",
    "mean_row_std",
)

SUMMARY_COLUMNS: tuple[str, ...] = (
    "n_queries",
    "n_queries_with_keys",
    "n_examples",
    "head_dim",
    "sliding_window",
    "mean_entropy",
    "mean_entropy_ratio",
    "mean_max_attn",
    "mean_k_eff",
    "mean_query_norm",
    "mean_n_keys",
    "mean_key_coverage",
    "row_std",
    "attn_class",
    "local_window",
    "local_attn_near",
    "local_attn_far",
    "local_bias_ratio",
    "same_token_attn",
    "diff_token_attn",
    "same_token_ratio",
    "qvar_l2_adjacent",
    "qvar_l2_distant",
    "qvar_pairs_adjacent",
    "qvar_pairs_distant",
    "max_row_sum_error",
    "max_future_weight",
    "max_window_weight",
    "gain",
    "gain_r2",
    "entropy_monotonic",
)

ADJACENT_DELTA = 1
DISTANT_DELTA = 10


# --------------------------------------------------------------------------- helpers


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _resolve_window(q: TokenArrays, k: TokenArrays) -> int | None:
    wq, wk = q.sliding_window, k.sliding_window
    if wq is not None and wk is not None and int(wq) != int(wk):
        raise ValueError(f"query and key shards disagree on sliding_window ({wq} vs {wk})")
    w = wq if wq is not None else wk
    if w is None:
        return None
    w = int(w)
    if w < 1:
        raise ValueError(f"sliding_window must be >= 1, got {w}")
    return w


def _int_positions(pos: np.ndarray, what: str) -> np.ndarray:
    pos = np.asarray(pos, dtype=np.float64)
    if pos.size and (not np.all(np.isfinite(pos)) or np.any(pos != np.floor(pos))):
        raise ValueError(f"{what} positions must be finite integers")
    if pos.size and pos.min() < 0:
        raise ValueError(f"{what} positions must be >= 0")
    return pos.astype(np.int64)


def _check_scales(scales: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in scales)
    if not out:
        raise ValueError("scales must not be empty")
    for s in out:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scales must be finite and > 0, got {s}")
    if len(set(out)) != len(out):
        raise ValueError(f"scales must be distinct, got {out}")
    return out


def _token_codes(qt: np.ndarray | None, kt: np.ndarray | None):
    """Integer codes for token strings shared by q and k; -1 for missing tokens."""
    if qt is None or kt is None:
        return None, None
    vocab: dict = {}

    def enc(arr: np.ndarray) -> np.ndarray:
        out = np.empty(len(arr), dtype=np.int64)
        for i, t in enumerate(arr):
            if t is None or (isinstance(t, float) and math.isnan(t)):
                out[i] = -1
            else:
                out[i] = vocab.setdefault(t, len(vocab))
        return out

    return enc(qt), enc(kt)


def visible_mask(q_pos: np.ndarray, k_pos: np.ndarray, sliding_window: int | None = None) -> np.ndarray:
    """Boolean (n_q, n_k) mask: key visible iff pk <= pq and (no window or pk > pq - w)."""
    pq = np.asarray(q_pos)[:, None]
    pk = np.asarray(k_pos)[None, :]
    mask = pk <= pq
    if sliding_window is not None:
        mask &= pk > pq - sliding_window
    return mask


def attention_weights(
    q_vectors: np.ndarray,
    q_pos: np.ndarray,
    k_vectors: np.ndarray,
    k_pos: np.ndarray,
    *,
    sliding_window: int | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Dense (n_q, n_k) attention of one example (no chunking; for small inputs and checks).

    Rows of queries that see no key are all zero.
    """
    qv = np.asarray(q_vectors, dtype=np.float64)
    kv = np.asarray(k_vectors, dtype=np.float64)
    d = qv.shape[1]
    mask = visible_mask(q_pos, k_pos, sliding_window)
    s = _scores(qv, kv, 1.0 / math.sqrt(d))
    if scale != 1.0:
        s = s * scale
    p, _ = _masked_softmax(s, mask)
    return p


def _scores(qv: np.ndarray, kv: np.ndarray, inv_sqrt_d: float) -> np.ndarray:
    """q . k / sqrt(d) for every (query, key) pair.

    ``np.einsum`` without BLAS: each entry is summed over d in a fixed order, so a score
    does not depend on how queries are chunked, on the key block, on the BLAS build or
    on the thread count (a BLAS matmul can differ in the last bit between row blocks).
    """
    out = np.einsum("id,kd->ik", qv, kv)
    out *= inv_sqrt_d
    return out


def _masked_softmax(s: np.ndarray, mask: np.ndarray):
    """(p, logp) with masked entries p=0, logp=-inf; rows without keys are all zero."""
    a = np.where(mask, s, -np.inf)
    has = mask.any(axis=1)
    m = np.where(has, a.max(axis=1, initial=-np.inf), 0.0)
    a -= m[:, None]
    e = np.exp(a)
    tot = e.sum(axis=1)
    lse = np.where(has, np.log(np.where(has, tot, 1.0)), 0.0)
    a -= lse[:, None]
    return np.exp(a), a


# --------------------------------------------------------------------------- core scan


class _Acc:
    """Per-query outputs, indexed in canonical query order."""

    def __init__(self, nq: int, n_scales: int):
        f = lambda: np.full((nq, n_scales), np.nan)  # noqa: E731
        self.entropy = f()
        self.max_attn = f()
        self.row_std = f()
        self.k_eff = np.zeros((nq, n_scales), dtype=np.int64)
        self.n_keys = np.zeros(nq, dtype=np.int64)
        self.near = np.full(nq, np.nan)
        self.far = np.full(nq, np.nan)
        self.same = np.full(nq, np.nan)
        self.diff = np.full(nq, np.nan)
        self.row_sum_err = 0.0
        self.future_w = 0.0
        self.window_w = 0.0


def _group_ranges(ex_sorted: np.ndarray):
    """Unique ids and [start, stop) ranges of a sorted id array."""
    if ex_sorted.size == 0:
        return np.empty(0, dtype=ex_sorted.dtype), np.empty(0, np.int64), np.empty(0, np.int64)
    cut = np.flatnonzero(np.diff(ex_sorted)) + 1
    starts = np.concatenate(([0], cut))
    stops = np.concatenate((cut, [ex_sorted.size]))
    return ex_sorted[starts], starts, stops


def _rows_per_chunk(chunk_size: int | None, width: int, window: int | None = None) -> int:
    """Queries per chunk: ``chunk_size``, else the most with rows * width <= budget.

    With a sliding window the key block of a chunk spans about (rows + window) keys, so
    the default also caps rows at max(window, 64) to keep the work near O(n_q * window).
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError("chunk_size must be >= 1")
        return int(chunk_size)
    rows = max(1, _BLOCK_BUDGET // max(width, 1))
    if window is not None:
        rows = min(rows, max(window, 64))
    return rows


def _block_stats(base, mask, scale, acc, rows, j, n_keys, out_scratch, extras):
    """Fill per-query metrics of one chunk for one scale (column j of the accumulators)."""
    has = n_keys > 0
    a, e, dsc = out_scratch
    np.multiply(base, scale, out=a)
    np.copyto(a, -np.inf, where=~mask)
    m = np.where(has, a.max(axis=1, initial=-np.inf), 0.0)
    a -= m[:, None]
    np.exp(a, out=e)
    tot = e.sum(axis=1)
    lse = np.where(has, np.log(np.where(has, tot, 1.0)), 0.0)
    a -= lse[:, None]  # log-probabilities (-inf on masked keys)
    np.exp(a, out=e)  # probabilities (exactly 0 on masked keys)

    row_sum = e.sum(axis=1)
    if has.any():
        acc.row_sum_err = max(acc.row_sum_err, float(np.max(np.abs(row_sum[has] - 1.0))))
    fut, outside = extras["future"], extras["outside"]
    acc.future_w = max(acc.future_w, float(np.max(e, where=fut, initial=0.0)))
    if outside is not None:
        acc.window_w = max(acc.window_w, float(np.max(e, where=outside, initial=0.0)))

    nk = np.maximum(n_keys, 1).astype(np.float64)
    np.copyto(a, 0.0, where=~mask)  # a := logp on visible keys, 0 elsewhere (no 0 * -inf)
    ent = -np.einsum("ij,ij->i", e, a)
    maxa = e.max(axis=1)
    np.subtract(e, (row_sum / nk)[:, None], out=dsc)
    np.copyto(dsc, 0.0, where=~mask)
    var = np.einsum("ij,ij->i", dsc, dsc) / nk
    # k_eff: sort -p ascending (= p descending), cumulative mass, count prefixes below 0.9
    np.negative(e, out=dsc)
    dsc.sort(axis=1)
    np.cumsum(dsc, axis=1, out=dsc)
    k_eff = np.count_nonzero(dsc > -(K_EFF_MASS - _K_EFF_TOL), axis=1) + 1
    k_eff = np.where(has, np.minimum(k_eff, n_keys), 0)

    acc.entropy[rows, j] = np.where(has, ent, np.nan)
    acc.max_attn[rows, j] = np.where(has, maxa, np.nan)
    acc.row_std[rows, j] = np.where(has, np.sqrt(var), np.nan)
    acc.k_eff[rows, j] = k_eff

    if extras.get("scale_one"):
        near_m, far_m = extras["near"], extras["far"]
        acc.near[rows] = _group_mean(e, near_m, dsc)
        acc.far[rows] = _group_mean(e, far_m, dsc)
        if extras.get("same") is not None:
            acc.same[rows] = _group_mean(e, extras["same"], dsc)
            acc.diff[rows] = _group_mean(e, extras["diff"], dsc)


def _group_mean(p: np.ndarray, group: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    cnt = group.sum(axis=1)
    np.multiply(p, group, out=scratch)
    tot = scratch.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _scan(q, k, scales, window, local_window, chunk_size, want_extras):
    """One pass over examples/chunks computing per-query metrics at every scale."""
    qpos_all = _int_positions(q.position, "query")
    kpos_all = _int_positions(k.position, "key")
    nq = q.n
    acc = _Acc(nq, len(scales))
    if nq == 0:
        return acc
    qcodes, kcodes = _token_codes(q.token_str, k.token_str) if want_extras else (None, None)

    qo = np.lexsort((qpos_all, q.example_id))
    ko = np.lexsort((kpos_all, k.example_id))
    qex, kex = q.example_id[qo], k.example_id[ko]
    kids, kst, ksp = _group_ranges(kex)
    kmap = {int(e): (int(a), int(b)) for e, a, b in zip(kids, kst, ksp)}
    qids, qst, qsp = _group_ranges(qex)
    d = q.d
    inv_sqrt_d = 1.0 / math.sqrt(d)
    try:
        one_idx = scales.index(1.0)
    except ValueError:
        one_idx = -1

    for ex, a0, b0 in zip(qids, qst, qsp):
        if int(ex) not in kmap:
            continue  # no key in this example: n_keys stays 0
        ka, kb = kmap[int(ex)]
        kidx = ko[ka:kb]
        kpos = kpos_all[kidx]
        kvec = k.vectors[kidx]
        kc = None if kcodes is None else kcodes[kidx]
        qidx_ex = qo[a0:b0]
        step = _rows_per_chunk(chunk_size, kb - ka, window)
        for s0 in range(0, qidx_ex.size, step):
            rows = qidx_ex[s0 : s0 + step]
            pq = qpos_all[rows]
            hi = int(np.searchsorted(kpos, pq.max(), side="right"))
            hi = min(kpos.size, hi + 1)  # one future key, so causality is checked, not assumed
            lo = 0
            if window is not None:
                lo = int(np.searchsorted(kpos, pq.min() - window, side="right"))
                lo = max(0, lo - 1)  # one out-of-window key, likewise
            pk = kpos[lo:hi]
            mask = visible_mask(pq, pk, window)
            n_keys = mask.sum(axis=1)
            acc.n_keys[rows] = n_keys
            base = _scores(q.vectors[rows], kvec[lo:hi], inv_sqrt_d)
            scratch = (np.empty_like(base), np.empty_like(base), np.empty_like(base))
            dist = pq[:, None] - pk[None, :]
            extras = {
                "future": dist < 0,
                "outside": None if window is None else dist >= window,
            }
            for j, s in enumerate(scales):
                ex_j = extras
                if want_extras and j == one_idx:
                    near = mask & (dist <= local_window)
                    ex_j = dict(extras, scale_one=True, near=near, far=mask & ~near, same=None)
                    if qcodes is not None:
                        qc = qcodes[rows]
                        kcs = kc[lo:hi]
                        valid = mask & (dist != 0) & (qc >= 0)[:, None] & (kcs >= 0)[None, :]
                        eq = qc[:, None] == kcs[None, :]
                        ex_j["same"] = valid & eq
                        ex_j["diff"] = valid & ~eq
                _block_stats(base, mask, s, acc, rows, j, n_keys, scratch, ex_j)
    return acc


# --------------------------------------------------------------------------- query variation


def query_variation(
    q: TokenArrays,
    k: TokenArrays,
    delta: int,
    *,
    chunk_size: int | None = None,
) -> tuple[float, int]:
    """Mean L2 distance between the renormalised attention rows of queries ``delta`` apart.

    See the module docstring for the shared-key convention. Returns (mean, n_pairs);
    mean is NaN when no pair has >= 2 shared keys.
    """
    if delta < 1:
        raise ValueError("delta must be >= 1")
    window = _resolve_window(q, k)
    q, k = _as_float64(q), _as_float64(k)
    qpos_all = _int_positions(q.position, "query")
    kpos_all = _int_positions(k.position, "key")
    if q.n == 0 or k.n == 0:
        return float("nan"), 0
    if q.d != k.d:
        raise ValueError(f"query width {q.d} != key width {k.d}")
    qo = np.lexsort((qpos_all, q.example_id))
    ko = np.lexsort((kpos_all, k.example_id))
    kids, kst, ksp = _group_ranges(k.example_id[ko])
    kmap = {int(e): (int(a), int(b)) for e, a, b in zip(kids, kst, ksp)}
    qids, qst, qsp = _group_ranges(q.example_id[qo])
    inv_sqrt_d = 1.0 / math.sqrt(q.d)
    total, count = 0.0, 0
    for ex, a0, b0 in zip(qids, qst, qsp):
        if int(ex) not in kmap:
            continue
        ka, kb = kmap[int(ex)]
        kidx = ko[ka:kb]
        kpos = kpos_all[kidx]
        kvec = k.vectors[kidx]
        qidx = qo[a0:b0]
        qpos = qpos_all[qidx]
        hit = np.searchsorted(qpos, qpos + delta, side="left")
        ok = hit < qpos.size
        ok[ok] = qpos[hit[ok]] == qpos[ok] + delta
        ii, jj = qidx[ok], qidx[hit[ok]]
        if ii.size == 0:
            continue
        step = max(1, _rows_per_chunk(chunk_size, kb - ka, window) // 2)
        for s0 in range(0, ii.size, step):
            ri, rj = ii[s0 : s0 + step], jj[s0 : s0 + step]
            pi, pj = qpos_all[ri], qpos_all[rj]
            hi = int(np.searchsorted(kpos, pi.max(), side="right"))
            lo = 0 if window is None else int(np.searchsorted(kpos, pj.min() - window, side="right"))
            if hi <= lo:
                continue
            pk = kpos[lo:hi][None, :]
            shared = pk <= pi[:, None]
            if window is not None:
                shared &= pk > (pj - window)[:, None]
            keep = shared.sum(axis=1) >= 2
            if not keep.any():
                continue
            shared = shared[keep]
            kv = kvec[lo:hi]
            p1, _ = _masked_softmax(_scores(q.vectors[ri[keep]], kv, inv_sqrt_d), shared)
            p2, _ = _masked_softmax(_scores(q.vectors[rj[keep]], kv, inv_sqrt_d), shared)
            dist = np.sqrt(np.einsum("ij,ij->i", p1 - p2, p1 - p2))
            total += float(dist.sum())
            count += int(dist.size)
    return (total / count if count else float("nan")), count


# --------------------------------------------------------------------------- public API


def attention_class(entropy_ratio: float, sharp_max: float = 0.5, uniform_min: float = 0.95) -> str:
    """'sharp' (ratio <= sharp_max), 'uniform' (>= uniform_min), 'medium', or 'unknown' (NaN)."""
    if entropy_ratio is None or not math.isfinite(entropy_ratio):
        return "unknown"
    if entropy_ratio <= sharp_max:
        return "sharp"
    if entropy_ratio >= uniform_min:
        return "uniform"
    return "medium"


def gain_fit(scales: Sequence[float], mean_max_attn: Sequence[float]) -> tuple[float, float]:
    """OLS slope of mean max_attn vs log(scale), and its R2 (SPEC convention
    ``1 - SS_res / max(SS_tot, 1e-12)``). Non-finite points are dropped; (NaN, NaN) with
    fewer than 2 distinct scales."""
    x = np.log(np.asarray(scales, dtype=np.float64))
    y = np.asarray(mean_max_attn, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    xc = x - x.mean()
    yc = y - y.mean()
    slope = float(xc @ yc / (xc @ xc))
    resid = yc - slope * xc
    r2 = 1.0 - float(resid @ resid) / max(float(yc @ yc), 1e-12)
    return slope, r2


def gain_ratio(gain_a: float, gain_b: float) -> float:
    """gain_a / gain_b (seed 003's target/control ratio); NaN when either is non-finite
    or gain_b == 0."""
    try:
        a, b = float(gain_a), float(gain_b)
    except (TypeError, ValueError):
        return float("nan")
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0.0:
        return float("nan")
    return a / b


def _entropy_ratio(entropy: np.ndarray, n_keys: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.log(n_keys.astype(np.float64))
        return np.where(n_keys >= 2, entropy / np.where(n_keys >= 2, denom, 1.0), np.nan)


def _token_table(q, acc, j, qpos, window):
    n_keys = acc.n_keys
    ent = acc.entropy[:, j].copy()
    ent[qpos < 2] = np.nan
    n_visible = qpos + 1
    if window is not None:
        n_visible = np.minimum(n_visible, window)
    return {
        "bucket": np.asarray(q.bucket, dtype=np.int64),
        "example_id": np.asarray(q.example_id, dtype=np.int64),
        "position": qpos.astype(np.int64),
        "entropy": ent,
        "entropy_ratio": _entropy_ratio(ent, n_keys),
        "max_attn": acc.max_attn[:, j].copy(),
        "k_eff": acc.k_eff[:, j].copy(),
        "query_norm": np.linalg.norm(q.vectors, axis=1),
        "n_keys": n_keys.copy(),
        "n_visible": n_visible.astype(np.int64),
        "key_coverage": n_keys / n_visible,
        "row_std": acc.row_std[:, j].copy(),
    }


def _as_float64(t: TokenArrays) -> TokenArrays:
    if t.vectors.dtype == np.float64:
        return t
    return dataclasses.replace(t, vectors=np.asarray(t.vectors, dtype=np.float64))


def _prepare(q: TokenArrays, k: TokenArrays):
    if q.n and k.n and q.d != k.d:
        raise ValueError(f"query width {q.d} != key width {k.d}")
    window = _resolve_window(q, k)
    return _as_float64(q.canonical()), _as_float64(k.canonical()), window


def token_attention_metrics(
    q: TokenArrays,
    k: TokenArrays,
    *,
    scale: float = 1.0,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query columns (TOKEN_COLUMNS) at one query scale, rows in canonical query order."""
    scale = _check_scales([scale])[0]
    q, k, window = _prepare(q, k)
    acc = _scan(q, k, (scale,), window, 0, chunk_size, want_extras=False)
    return _token_table(q, acc, 0, _int_positions(q.position, "query"), window)


def head_attention_metrics(
    q: TokenArrays,
    k: TokenArrays,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    sharp_max: float = 0.5,
    uniform_min: float = 0.95,
    local_window: int = 5,
    chunk_size: int | None = None,
) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray]]:
    """Attention metrics of one head.

    Returns ``(token_table, head_summary, sweep_rows)``:
    token_table -- TOKEN_COLUMNS at scale 1.0, one row per query in canonical order;
    head_summary -- SUMMARY_COLUMNS (plain Python scalars; ``sliding_window`` may be None);
    sweep_rows -- SWEEP_COLUMNS, one row per configured scale in the given order.
    """
    scales = _check_scales(scales)
    if local_window < 0:
        raise ValueError("local_window must be >= 0")
    q, k, window = _prepare(q, k)
    all_scales = scales if 1.0 in scales else scales + (1.0,)
    acc = _scan(q, k, all_scales, window, int(local_window), chunk_size, want_extras=True)
    qpos = _int_positions(q.position, "query")
    j1 = all_scales.index(1.0)
    table = _token_table(q, acc, j1, qpos, window)

    has = acc.n_keys > 0
    early = qpos < 2

    def scale_means(j):
        ent = np.where(early, np.nan, acc.entropy[:, j])
        return {
            "mean_entropy": _nanmean(ent),
            "mean_entropy_ratio": _nanmean(_entropy_ratio(ent, acc.n_keys)),
            "mean_max_attn": _nanmean(acc.max_attn[:, j]),
            "mean_k_eff": float(acc.k_eff[has, j].mean()) if has.any() else float("nan"),
            "mean_row_std": _nanmean(acc.row_std[:, j]),
        }

    per_scale = [scale_means(all_scales.index(s)) for s in scales]
    sweep = {"scale": np.asarray(scales, dtype=np.float64)}
    for col in SWEEP_COLUMNS[1:]:
        sweep[col] = np.asarray([r[col] for r in per_scale], dtype=np.float64)

    gain, gain_r2 = gain_fit(scales, sweep["mean_max_attn"])
    order = np.argsort(sweep["scale"])
    ent_sorted = sweep["mean_entropy"][order]
    monotonic = bool(
        ent_sorted.size >= 2 and np.all(np.isfinite(ent_sorted)) and np.all(np.diff(ent_sorted) < 0)
    )

    one = scale_means(j1)
    near_ok = np.isfinite(acc.near) & np.isfinite(acc.far)
    near_m = _nanmean(acc.near[near_ok])
    far_m = _nanmean(acc.far[near_ok])
    tok_ok = np.isfinite(acc.same) & np.isfinite(acc.diff)
    same_m = _nanmean(acc.same[tok_ok])
    diff_m = _nanmean(acc.diff[tok_ok])
    qv_adj, n_adj = query_variation(q, k, ADJACENT_DELTA, chunk_size=chunk_size)
    qv_far, n_far = query_variation(q, k, DISTANT_DELTA, chunk_size=chunk_size)

    def ratio(a, b):
        return a / b if (math.isfinite(a) and math.isfinite(b) and b != 0) else float("nan")

    summary = {
        "n_queries": int(q.n),
        "n_queries_with_keys": int(has.sum()),
        "n_examples": int(np.unique(q.example_id).size),
        "head_dim": int(q.d) if q.n else int(k.d) if k.n else 0,
        "sliding_window": window,
        "mean_entropy": one["mean_entropy"],
        "mean_entropy_ratio": one["mean_entropy_ratio"],
        "mean_max_attn": one["mean_max_attn"],
        "mean_k_eff": one["mean_k_eff"],
        "mean_query_norm": _nanmean(table["query_norm"]),
        "mean_n_keys": float(table["n_keys"].mean()) if q.n else float("nan"),
        "mean_key_coverage": _nanmean(table["key_coverage"]),
        "row_std": one["mean_row_std"],
        "attn_class": attention_class(one["mean_entropy_ratio"], sharp_max, uniform_min),
        "local_window": int(local_window),
        "local_attn_near": near_m,
        "local_attn_far": far_m,
        "local_bias_ratio": ratio(near_m, far_m),
        "same_token_attn": same_m,
        "diff_token_attn": diff_m,
        "same_token_ratio": ratio(same_m, diff_m),
        "qvar_l2_adjacent": qv_adj,
        "qvar_l2_distant": qv_far,
        "qvar_pairs_adjacent": int(n_adj),
        "qvar_pairs_distant": int(n_far),
        "max_row_sum_error": float(acc.row_sum_err) if has.any() else float("nan"),
        "max_future_weight": float(acc.future_w),
        "max_window_weight": float(acc.window_w),
        "gain": gain,
        "gain_r2": gain_r2,
        "entropy_monotonic": monotonic,
    }
    return table, summary, sweep
