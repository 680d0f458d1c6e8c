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
    ``entropy``        -sum a log a in nats (from log-probabilities, never log of a
                       rounded weight); NaN when the position is < 2 (seed 003) or
                       the query sees no key.
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
    (out-of-window) key. Weights are zeroed where ``visible_mask`` says a key is hidden,
    and the weights on future / out-of-window keys (decided from the positions, not
    from the mask) are read back: ``max_future_weight`` (keys with pk > pq) and
    ``max_window_weight`` (keys with pk <= pq - w), plus ``max_row_sum_error =
    max |sum(row) - 1|`` (the row's weights re-summed from their sorted copy), all
    maxima over every scale of the sweep; a NaN anywhere makes the error infinite.

Computation (how, not what)
    Shifted scores ``a = q.k/sqrt(d) - rowmax`` (<= 0); one ``R = exp(a / 4)`` per
    score; the weights at scale ``s = m / 4`` (m <= 64: every default scale) are
    ``R**m / sum`` by repeated multiplication, within a few ulps of
    ``exp(s a) / sum``; other scales use ``exp(s a)`` directly (floored the same way). Scale 1.0 is always
    ``R**4``, whatever the other scales. Exp arguments are floored at -708 (libm is
    slow on underflow): R >= exp(-708) ~ 3e-308, whose powers m >= 2 underflow to 0 as
    the true weights do; only at scale 0.25 (m = 1) does a weight below that read as
    3e-308. Entropy is ``log(sum) - s * sum(p a)``, two non-negative terms. Each row is sorted once (the order is the same at every scale)
    and k_eff is found by block sums over the sorted weights. Query-variation rows are
    renormalised from the scale-1 weights; a row whose shared-key mass is below 1e-250
    of its maximum is recomputed from its scores.

Memory
    Examples whose captured query and key positions are identical (dense capture) form
    one group and are processed together. Queries go in chunks of ``chunk_size`` rows
    (default 64), each over the key block it may see (keys up to the chunk's last
    position; with a window w only the last ~w + chunk keys, so O(n_q * (w + 64)) work).
    The weights of all scales of a batch of examples are stacked in one float64 array of
    at most ``_BLOCK_BUDGET`` (1M) elements: wide key blocks get fewer rows per chunk
    (down to 16), then fewer examples per batch, and only past 4x the budget are the
    scales split into groups (which repeats the per-chunk exp and sort). About ten such
    arrays are live; they live in a per-thread workspace reused from chunk to chunk
    (fresh pages cost a page fault each, several microseconds in a VM) -- ~50 MB for the
    demo, ~35 MB for 8192 dense positions; ``release_workspace()`` frees it. The scores
    of a batch are computed for up to 128 query rows at a time (`_ScoreBlocks`, at most
    twice the budget, or one chunk's rows) and sliced for the chunks inside them.

Reproducibility
    Scores are computed in 32 x 32 tiles aligned to each example's query and key ranks,
    one BLAS call of the same shape per tile, so a score does not depend on the
    chunking or on which examples share a batch (with one BLAS build; another build may
    change last bits). Row reductions run over key blocks whose width depends on the
    chunk, so chunked and unchunked results agree to ~1 ulp (tested at rtol 1e-15);
    integer columns (n_keys, k_eff) agree exactly.
"""

from __future__ import annotations

import dataclasses
import math
import threading
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
    "release_workspace",
]

DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
K_EFF_MASS = 0.9
_K_EFF_TOL = 1e-12
_BLOCK_BUDGET = 1_048_576  # elements of one (scales x examples x chunk x keys) float64 array
_SPLIT_FACTOR = 4  # a chunk of _ROW_MIN rows may exceed the budget this much before scales are split
_ROW_TARGET = 64  # default queries per chunk
_ROW_MIN = 16  # ... and the fewest, however many keys
_TILE = 32  # scores are computed in T x T tiles (one BLAS call each)
_SCORE_BLOCK_ROWS = 128  # query rows of scores computed at once and sliced for the chunks
_KEFF_BLOCK = 32  # k_eff: block width of the two-level cumulative sum
_SHIFT = 2  # scales m / 2**_SHIFT with m <= _MAX_POWER use powers of one exp
_MAX_POWER = 64
_MASKED = -1e300  # shifted score of a masked key: exp() gives 0 and 0 * _MASKED = 0
_EXP_FLOOR = -708.0  # exp() arguments are raised to this (exp(-708) ~ 3e-308)
_TINY_MASS = 1e-250  # query variation: below this, renormalise a row from its scores

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
    both = list(qt) + list(kt)
    index = {t: i for i, t in enumerate(dict.fromkeys(both))}
    codes = np.fromiter(map(index.__getitem__, both), dtype=np.int64, count=len(both))
    missing = np.fromiter((t is None or (isinstance(t, float) and math.isnan(t)) for t in index),
                          dtype=bool, count=len(index))
    if missing.any():
        codes = np.where(missing, -1, np.arange(len(index)))[codes]
    return codes[: len(qt)], codes[len(qt):]


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


# --------------------------------------------------------------------------- scores


class _Workspace(threading.local):
    """Reusable float64 scratch arrays, one per name, grown on demand and kept for the
    thread's lifetime (at most a few times _BLOCK_BUDGET elements each).

    Fresh memory costs a page fault per 4 KiB page on first touch -- several microseconds
    each in a VM, more than the arithmetic done on the page -- so the scan's large
    temporaries are written into these (``out=``) instead of being allocated per chunk.
    """

    def __init__(self):
        self.bufs: dict = {}

    def get(self, name: str, shape) -> np.ndarray:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 2 * (0 if buf is None else buf.size)))
            self.bufs[name] = buf
        return buf[:n].reshape(shape)


_WS = _Workspace()


def release_workspace() -> None:
    """Free the scratch arrays kept by this thread (they are re-created when needed)."""
    _WS.bufs.clear()


def _tile_scores(qt: np.ndarray, kt: np.ndarray, out: np.ndarray) -> None:
    """Scores of every (query tile, key tile) pair into ``out`` (no scaling).

    ``qt`` is (b, nq_tiles, T, d), ``kt`` (b, nk_tiles, T, d); ``out`` is a C-contiguous
    (b, nq_tiles * T, nk_tiles * T) array. Each T x T tile is one BLAS call of the same
    shape on the same rows, so a score never depends on the chunking around it.
    """
    b, nqt, t, _ = qt.shape
    nkt = kt.shape[1]
    view = out.reshape(b, nqt, t, nkt, t).transpose(0, 1, 3, 2, 4)
    np.matmul(qt[:, :, None], kt[:, None].swapaxes(-1, -2), out=view)


def _chunk_scores(qpad: np.ndarray, kpad: np.ndarray, r0: int, r1: int, c0: int, c1: int,
                  buf: np.ndarray | None = None) -> np.ndarray:
    """Scores of query rows [r0, r1) and key rows [c0, c1) of the tile-padded, pre-scaled
    arrays ``qpad`` (b, nq_pad, d) and ``kpad`` (b, nk_pad, d): a (b, r1-r0, c1-c0) view
    of a workspace array (valid until the next call), or of ``buf`` (1-D, large enough for
    the whole tiles) when given."""
    t = _TILE
    b, _, d = qpad.shape
    t0, t1 = r0 // t, -(-r1 // t)
    u0, u1 = c0 // t, -(-c1 // t)
    shape = (b, (t1 - t0) * t, (u1 - u0) * t)
    out = _WS.get("tiles", shape) if buf is None else buf[: math.prod(shape)].reshape(shape)
    _tile_scores(qpad[:, t0 * t : t1 * t].reshape(b, t1 - t0, t, d),
                 kpad[:, u0 * t : u1 * t].reshape(b, u1 - u0, t, d), out)
    return out[:, r0 - t0 * t : r1 - t0 * t, c0 - u0 * t : c1 - u0 * t]


class _ScoreBlocks:
    """Scores of one batch of examples, computed a block of query rows at a time and sliced
    for each chunk.

    A chunk needs its rows plus the earlier partner rows of its query-variation pairs, and
    the tile grid rounds both ends out to whole tiles: computed chunk by chunk, a chunk of 16
    rows (wide examples) costs two or three 32-row tiles of scores. A block of
    ``block_rows`` tile-aligned rows over every key its last row may see serves several
    consecutive chunks. The scores are the same tiles (`_chunk_scores`), so the same values.
    """

    def __init__(self, qpad, kpad, qpos, kpos, block_rows: int):
        self.qpad, self.kpad, self.qpos, self.kpos = qpad, kpad, qpos, kpos
        self.block_rows = block_rows
        self.rows = self.cols = (0, 0)
        self.block = self.buf = None

    def chunk(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Scores of query rows [r0, r1) and key rows [c0, c1): a (b, r1-r0, c1-c0) view."""
        (R0, R1), (C0, C1) = self.rows, self.cols
        if not (R0 <= r0 and r1 <= R1 and C0 <= c0 and c1 <= C1):
            t, nq, nk = _TILE, self.qpos.shape[0], self.kpos.shape[0]
            R0 = r0 // t * t
            R1 = min(-(-nq // t) * t, max(-(-r1 // t) * t, R0 + self.block_rows))
            # keys up to one past the last visible to the block's last row (as the chunks take)
            hi = int(np.searchsorted(self.kpos, self.qpos[min(R1, nq) - 1], side="right")) + 1
            C0, C1 = c0, max(c1, min(nk, hi))
            b = self.qpad.shape[0]
            size = b * (R1 - R0) * (-(-C1 // t) - C0 // t) * t  # whole tiles
            if self.buf is None or self.buf.size < size:
                self.buf = np.empty(size)
            self.block = _chunk_scores(self.qpad, self.kpad, R0, R1, C0, C1, buf=self.buf)
            self.rows, self.cols = (R0, R1), (C0, C1)
        return self.block[:, r0 - R0 : r1 - R0, c0 - C0 : c1 - C0]


def _scores(qv: np.ndarray, kv: np.ndarray, inv_sqrt_d: float) -> np.ndarray:
    """q . k / sqrt(d) for every (query, key) pair of 2-D ``qv``, ``kv``, tiled like the scan."""
    qv = np.asarray(qv, dtype=np.float64)
    kv = np.asarray(kv, dtype=np.float64)
    nq, nk = qv.shape[0], kv.shape[0]
    if nq == 0 or nk == 0:
        return np.zeros((nq, nk))
    return _chunk_scores(_pad_rows(qv[None] * inv_sqrt_d), _pad_rows(kv[None]), 0, nq, 0, nk)[0].copy()


def _pad_rows(x: np.ndarray) -> np.ndarray:
    """(b, n, d) -> (b, ceil(n / T) * T, d), zero rows appended."""
    b, n, d = x.shape
    n_pad = -(-n // _TILE) * _TILE
    if n_pad == n and x.flags.c_contiguous:
        return x
    out = np.zeros((b, n_pad, d))
    out[:, :n] = x
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


# --------------------------------------------------------------------------- scale powers


def _scale_plan(scales: Sequence[float]) -> list:
    """How each scale's weights are computed from the shifted scores ``a`` (<= 0).

    The base is ``R = exp(a / 2**_SHIFT)``, one exp per score. Returns, per scale, the
    integer m with ``s == m / 2**_SHIFT`` and ``m <= _MAX_POWER`` (weights ``R**m``, by
    binary exponentiation), or None: that scale's weights are ``exp(s * a)`` computed
    directly. ``R**m`` is within a few ulps of ``exp(m a / 2**_SHIFT)``. The shift is
    fixed, so scale 1.0 is always ``R**(2**_SHIFT)`` whatever the other scales are.
    """
    out = []
    for s in scales:
        m = s * 2**_SHIFT
        out.append(int(m) if m == int(m) and 1 <= m <= _MAX_POWER else None)
    return out


class _Powers:
    """base ** m for integer m >= 1: R**m = (R**(m/2))**2 for even m, R**(m-1) * R for odd
    m, so ``m`` alone fixes the multiplications. Results go to ``dest[m]`` when given,
    else to workspace arrays ``<prefix><m>``."""

    def __init__(self, base: np.ndarray, prefix: str, dest: dict | None = None):
        self.cache = {1: base}
        self.prefix = prefix
        self.dest = dest or {}

    def get(self, m: int) -> np.ndarray:
        hit = self.cache.get(m)
        if hit is not None:
            return hit
        out = self.dest.get(m)
        if out is None:
            out = _WS.get(f"{self.prefix}{m}", self.cache[1].shape)
        if m % 2:  # R**m = R**(m-1) * R
            np.multiply(self.get(m - 1), self.cache[1], out=out)
        else:  # R**m = (R**(m/2))**2
            half = self.get(m // 2)
            np.multiply(half, half, out=out)
        self.cache[m] = out
        return out


# --------------------------------------------------------------------------- core scan


class _Acc:
    """Per-query outputs, indexed in canonical query order."""

    def __init__(self, nq: int, n_scales: int, deltas: Sequence[int] = ()):
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
        self.qvar = {int(dlt): [0.0, 0] for dlt in deltas}  # delta -> [sum of L2, n pairs]

    def error(self, name: str, values: np.ndarray) -> None:
        """Keep the running maximum of a check; NaN counts as an infinite error."""
        if values.size:
            v = float(np.max(values))
            setattr(self, name, max(getattr(self, name), v if v == v else math.inf))


def _group_ranges(ex_sorted: np.ndarray):
    """Unique ids and [start, stop) ranges of a sorted id array."""
    if ex_sorted.size == 0:
        return np.empty(0, dtype=ex_sorted.dtype), np.empty(0, np.int64), np.empty(0, np.int64)
    cut = np.flatnonzero(np.diff(ex_sorted)) + 1
    starts = np.concatenate(([0], cut))
    stops = np.concatenate((cut, [ex_sorted.size]))
    return ex_sorted[starts], starts, stops


def _example_groups(qex, qpos_all, kex, kpos_all):
    """Examples that have both queries and keys, grouped by identical (query positions,
    key positions): each group is (q row indices (B, nq), k row indices (B, nk), query
    positions (nq,), key positions (nk,)), rows sorted by position. Densely captured
    examples of one length form a single group, processed in batches."""
    qo = np.lexsort((qpos_all, qex))
    ko = np.lexsort((kpos_all, kex))
    kids, kst, ksp = _group_ranges(kex[ko])
    kmap = {int(e): (int(a), int(b)) for e, a, b in zip(kids, kst, ksp)}
    qids, qst, qsp = _group_ranges(qex[qo])
    groups: dict = {}
    for ex, a0, b0 in zip(qids, qst, qsp):
        if int(ex) not in kmap:
            continue  # no key in this example: n_keys stays 0
        ka, kb = kmap[int(ex)]
        qi, ki = qo[a0:b0], ko[ka:kb]
        qp, kp = qpos_all[qi], kpos_all[ki]
        sig = (qp.tobytes(), kp.tobytes())
        g = groups.get(sig)
        if g is None:
            groups[sig] = g = ([], [], qp, kp)
        g[0].append(qi)
        g[1].append(ki)
    return [(np.stack(a), np.stack(b), qp, kp) for a, b, qp, kp in groups.values()]


def _pairs(qpos: np.ndarray, delta: int):
    """(early rank, late rank) of query pairs exactly ``delta`` positions apart; each early
    query pairs with the first query at its position + delta."""
    hit = np.searchsorted(qpos, qpos + delta, side="left")
    ok = hit < qpos.size
    ok[ok] = qpos[hit[ok]] == qpos[ok] + delta
    return np.flatnonzero(ok), hit[ok]


def _k_eff_sorted(pd: np.ndarray, sign: np.ndarray, tot: np.ndarray, n_keys: np.ndarray):
    """Fewest keys holding K_EFF_MASS of each row, from its weights sorted largest first;
    also the sorted weights' total (summed block by block) and largest weight.

    ``sign * pd`` (..., W) holds the unnormalised weights (row total ``tot``) in descending
    order, W a multiple of _KEFF_BLOCK, zero padded; ``sign`` broadcasts against ``tot``.
    Block sums locate the block where the cumulative mass reaches
    ``(K_EFF_MASS - tol) * tot``; only that block is summed element by element. Blocks start at the row's first (largest)
    weight, so the result does not depend on the padding.
    """
    g = _KEFF_BLOCK
    lead = pd.shape[:-1]
    nb = pd.shape[-1] // g
    n = math.prod(lead)
    blocks = pd.reshape(n, nb, g)
    sgn = np.broadcast_to(sign, lead).reshape(n)
    # small arrays are kept (columns, rows) so that cumulative sums run across rows
    bc = np.cumsum(np.einsum("nij->in", blocks), axis=0)  # (nb, n)
    bc *= sgn
    thr = ((K_EFF_MASS - _K_EFF_TOL) * tot).reshape(n)
    bi = np.minimum(np.count_nonzero(bc < thr, axis=0), nb - 1)
    rows = np.arange(n)
    prev = np.where(bi > 0, bc[np.maximum(bi - 1, 0), rows], 0.0)
    inner = np.cumsum(np.ascontiguousarray(blocks[rows, bi].T), axis=0)  # (g, n)
    inner *= sgn
    inner += prev
    k = bi * g + np.count_nonzero(inner < thr, axis=0) + 1
    k = np.where(n_keys > 0, np.minimum(k.reshape(lead), n_keys), 0)
    total = bc[-1].reshape(lead)  # bc is already sign-corrected
    largest = (blocks[:, 0, 0] * sgn).reshape(lead)
    return k, total, largest


def _rows_per_chunk(chunk_size: int | None, width: int, extra: int = 0) -> int:
    """Queries per chunk: ``chunk_size``, else _ROW_TARGET (short chunks keep the causal key
    block close to the keys the rows can see), fewer -- down to _ROW_MIN -- when
    (rows + extra) * width would exceed the budget."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError("chunk_size must be >= 1")
        return int(chunk_size)
    return max(_ROW_MIN, min(_ROW_TARGET, _BLOCK_BUDGET // max(width, 1) - extra))


class _Chunk:
    """Geometry and masks of one query chunk, shared by every example of its group."""

    def __init__(self, qpos, kpos, s0, s1, pairs, lo, hi, window, local_window, want_extras):
        x0 = s0
        sel_pairs = {}
        for dlt, (ei, li) in pairs.items():
            sel = (li >= s0) & (li < s1)
            sel_pairs[dlt] = (ei[sel], li[sel])
            if sel.any():
                x0 = min(x0, int(ei[sel].min()))
        self.s0, self.s1, self.x0, self.lo, self.hi = s0, s1, x0, lo, hi
        self.n_x = s0 - x0  # earlier queries needed only as partners of this chunk's pairs
        self.rows_all = s1 - x0
        self.width = hi - lo
        self.pk = pk = kpos[lo:hi]
        self.pq = pq = qpos[s0:s1]
        mask_all = visible_mask(qpos[x0:s1], pk, window)
        self.has_all = mask_all.any(axis=1)
        self.mask = mask = mask_all[self.n_x :]
        self.n_keys = mask.sum(axis=1)
        self.has = self.n_keys > 0
        self.nkf = np.maximum(self.n_keys, 1).astype(np.float64)
        shape_all = (self.rows_all, self.width)
        self.mf_all = _WS.get("mf", shape_all)
        np.copyto(self.mf_all, mask_all)
        self.madd_all = _WS.get("madd", shape_all)  # 0 on visible keys, _MASKED elsewhere
        np.subtract(1.0, self.mf_all, out=self.madd_all)
        self.madd_all *= _MASKED
        self.mf = self.mf_all[self.n_x :]
        shape = (s1 - s0, self.width)
        self.fut_f = _WS.get("futf", shape)
        np.copyto(self.fut_f, pk[None, :] > pq[:, None])
        self.out_f = None
        if window is not None:
            self.out_f = _WS.get("outf", shape)
            np.copyto(self.out_f, pk[None, :] <= (pq - window)[:, None])
        if want_extras:
            near_b = mask & (pk[None, :] >= (pq - local_window)[:, None])
            self.near_f = _WS.get("nearf", shape)
            np.copyto(self.near_f, near_b)
            self.far_f = _WS.get("farf", shape)
            np.copyto(self.far_f, mask & ~near_b)
            self.n_near = self.near_f.sum(axis=1)
            self.n_far = self.far_f.sum(axis=1)
            self.tok_valid = mask & (pk[None, :] != pq[:, None])
        # query-variation pairs whose later query is in this chunk, with >= 2 shared keys
        self.qvar = {}
        for dlt, (ei, li) in sel_pairs.items():
            if not ei.size:
                continue
            late_pos = qpos[li]
            shared = pk[None, :] <= (late_pos - dlt)[:, None]
            if window is not None:
                shared &= pk[None, :] > (late_pos - window)[:, None]
            keep = shared.sum(axis=1) >= 2
            if keep.any():
                sf = _WS.get(f"qs{dlt}", (int(keep.sum()), self.width))
                np.copyto(sf, shared[keep])
                self.qvar[dlt] = (_as_slice(ei[keep] - x0), _as_slice(li[keep] - x0), sf, shared[keep])


def _as_slice(idx: np.ndarray):
    """A slice equal to the index array ``idx`` when it is consecutive (i, i+1, ...), else idx."""
    if idx.size and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _scan(q, k, scales, window, local_window, chunk_size, want_extras, deltas=()):
    """One pass over example groups / query chunks computing per-query metrics at every
    scale (and, for ``deltas``, the query-variation sums)."""
    qpos_all = _int_positions(q.position, "query")
    kpos_all = _int_positions(k.position, "key")
    acc = _Acc(q.n, len(scales), deltas)
    if q.n == 0 or k.n == 0:
        return acc
    qcodes, kcodes = _token_codes(q.token_str, k.token_str) if want_extras else (None, None)
    inv_sqrt_d = 1.0 / math.sqrt(q.d)
    max_delta = max(deltas) if deltas else 0
    n_s = len(scales)
    plans: dict = {}  # scales per group -> list of _ScalePlan

    for qidx, kidx, qpos, kpos in _example_groups(q.example_id, qpos_all, k.example_id, kpos_all):
        n_ex, nq = qidx.shape
        nk = kidx.shape[1]
        qpad = _pad_rows(q.vectors[qidx] * inv_sqrt_d)
        kpad = _pad_rows(k.vectors[kidx])
        codes = None if qcodes is None else (qcodes[qidx], kcodes[kidx])
        pairs = {dlt: _pairs(qpos, dlt) for dlt in deltas}
        width_max = nk if window is None else min(nk, _ROW_TARGET + window + 2)
        step = _rows_per_chunk(chunk_size, width_max * n_s, max_delta)
        blocks: dict = {}  # (e0, e1) -> _ScoreBlocks of that batch of examples
        for s0 in range(0, nq, step):
            s1 = min(nq, s0 + step)
            pq = qpos[s0:s1]
            hi = int(np.searchsorted(kpos, pq.max(), side="right"))
            hi = min(nk, hi + 1)  # one future key, so causality is checked, not assumed
            lo = 0
            if window is not None:
                lo = int(np.searchsorted(kpos, pq.min() - window, side="right"))
                lo = max(0, lo - 1)  # one out-of-window key, likewise
            ch = _Chunk(qpos, kpos, s0, s1, pairs, lo, hi, window, local_window, want_extras)
            acc.n_keys[qidx[:, s0:s1]] = ch.n_keys
            if not ch.has_all.any():
                continue
            unit = ch.rows_all * ch.width  # elements per example and scale
            if chunk_size is not None:
                n_sg, bsz = n_s, max(1, int(chunk_size) // (s1 - s0))
            else:  # all scales at once, up to _SPLIT_FACTOR x the budget, else groups of scales
                n_sg = n_s if n_s * unit <= _SPLIT_FACTOR * _BLOCK_BUDGET else \
                    max(1, _SPLIT_FACTOR * _BLOCK_BUDGET // unit)
                bsz = max(1, _BLOCK_BUDGET // (unit * n_sg))
            if n_sg not in plans:
                plans[n_sg] = [_ScalePlan(scales, range(i, min(n_s, i + n_sg))) for i in range(0, n_s, n_sg)]
            used = {}
            for e0 in range(0, n_ex, bsz):
                e1 = min(n_ex, e0 + bsz)
                sb = used[e0, e1] = blocks.get((e0, e1)) or _ScoreBlocks(
                    qpad[e0:e1], kpad[e0:e1], qpos, kpos,
                    _block_rows(ch.rows_all, e1 - e0, width_max, chunk_size is not None))
                bcodes = None if codes is None else (codes[0][e0:e1, s0:s1], codes[1][e0:e1, lo:hi])
                for plan in plans[n_sg]:
                    _batch(acc, ch, sb, qidx[e0:e1, s0:s1], plan, want_extras, bcodes)
            blocks = used  # batches change with the chunk width: keep only the current ones
    return acc


def _block_rows(rows_all: int, b: int, width: int, explicit_chunk: bool) -> int:
    """Query rows of a `_ScoreBlocks` block: whole tiles covering a chunk wherever it starts,
    and up to _SCORE_BLOCK_ROWS when b x rows x width stays within twice the budget (an
    explicit ``chunk_size`` keeps blocks to the chunk, so it still bounds the memory)."""
    need = (-(-rows_all // _TILE) + 1) * _TILE
    if explicit_chunk:
        return need
    fit = 2 * _BLOCK_BUDGET // max(1, b * width) // _TILE * _TILE
    return max(need, min(_SCORE_BLOCK_ROWS, fit))


class _ScalePlan:
    """Some of the scan's scales (accumulator columns ``cols``), split into powers of the
    base and direct exps (_scale_plan). Query variation and the scale-1 extras are
    computed with the plan that holds scale 1.0."""

    def __init__(self, scales, cols):
        self.cols = np.asarray(list(cols))
        self.scales = tuple(scales[c] for c in self.cols)
        self.m = _scale_plan(self.scales)
        self.one = self.scales.index(1.0) if 1.0 in self.scales else -1
        self.m_one = 2**_SHIFT
        self.s = np.asarray(self.scales)[:, None, None]
        # sorted weights are stored negated (ascending sort = largest weight first);
        # a power m of the negated base has sign (-1)**m
        self.sign = np.array([1.0 if (m is not None and m % 2 == 0) else -1.0 for m in self.m])[:, None, None]


def _batch(acc, ch, scores, rows, plan, want_extras, codes):
    """All metrics of one chunk for a batch of examples (rows: (b, chunk) query indices;
    scores: their `_ScoreBlocks`).

    Weights of every scale are stacked on a leading axis: P (S, b, chunk, keys)."""
    b = rows.shape[0]
    n_x, width, n_r = ch.n_x, ch.width, ch.s1 - ch.s0
    n_s = len(plan.scales)
    x = scores.chunk(ch.x0, ch.s1, ch.lo, ch.hi)
    a_all = _WS.get("a", x.shape)  # shifted scores: 0 at each row's max, <= 0 elsewhere
    np.multiply(x, ch.mf_all, out=a_all)
    a_all += ch.madd_all
    m0 = np.where(ch.has_all, a_all.max(axis=-1), 0.0)
    a_all -= m0[..., None]
    base_all = _WS.get("base", x.shape)
    np.multiply(a_all, 0.5**_SHIFT, out=base_all)
    # libm's exp is several times slower on underflow; below the floor every power m >= 2
    # is 0 anyway, and masked keys are zeroed just after
    np.maximum(base_all, _EXP_FLOOR, out=base_all)
    np.exp(base_all, out=base_all)
    base_all *= ch.mf_all
    a, base = a_all[:, n_x:], base_all[:, n_x:]
    # negated base sorted ascending: weights largest first (same order at every scale)
    wp = -(-width // _KEFF_BLOCK) * _KEFF_BLOCK
    sd = _WS.get("sd", (b, n_r, wp))
    sd[..., width:] = 0.0
    np.negative(base, out=sd[..., :width])
    sd.sort(axis=-1)
    P_all = _WS.get("P", (n_s,) + x.shape)
    Pd = _WS.get("Pd", (n_s,) + sd.shape)
    pw_all = _Powers(base_all, "p", {m: P_all[j] for j, m in enumerate(plan.m) if m is not None})
    pw_sorted = _Powers(sd, "s", {m: Pd[j] for j, m in enumerate(plan.m) if m is not None})
    tmp = _WS.get("tmp", base.shape)
    rf = np.multiply(base, ch.fut_f, out=tmp).max(axis=-1)
    ro = None if ch.out_f is None else np.multiply(base, ch.out_f, out=tmp).max(axis=-1)
    fw = np.empty((n_s, b, n_r))
    ow = None if ro is None else np.empty((n_s, b, n_r))
    for j, (s, m) in enumerate(zip(plan.scales, plan.m)):
        if m is None:
            Pj = P_all[j]
            np.multiply(a_all, s, out=Pj)
            np.maximum(Pj, _EXP_FLOOR, out=Pj)
            np.exp(Pj, out=Pj)
            Pj *= ch.mf_all
            Pj = Pj[:, n_x:]
            Pd[j][..., width:] = 0.0
            np.negative(Pj, out=Pd[j][..., :width])
            Pd[j].sort(axis=-1)
            fw[j] = np.multiply(Pj, ch.fut_f, out=tmp).max(axis=-1)
            if ow is not None:
                ow[j] = np.multiply(Pj, ch.out_f, out=tmp).max(axis=-1)
        else:
            pw_all.get(m)
            pw_sorted.get(m)
            fw[j] = rf**m  # the largest weight on a future key (monotone in the base)
            if ow is not None:
                ow[j] = ro**m
    P = P_all[:, :, n_x:]
    has, n_keys, nkf = ch.has, ch.n_keys, ch.nkf
    tot = P.sum(axis=-1)  # (S, b, chunk)
    inv = 1.0 / np.where(has, tot, 1.0)
    k_eff, sorted_tot, sorted_max = _k_eff_sorted(Pd, plan.sign, tot, n_keys)
    # the sorted copy, summed in another order, must hold the same mass: rows sum to 1
    acc.error("row_sum_err", np.abs(sorted_tot * inv - 1.0)[..., has])
    acc.error("future_w", fw * inv)
    if ow is not None:
        acc.error("window_w", ow * inv)
    # entropy = -sum p log p with log p = s a - log(tot): log(tot) - s sum p a, both >= 0
    pa = np.einsum("sbrk,brk->sbr", P, a)
    ent = np.log(np.where(has, tot, 1.0)) * (tot * inv) - (plan.s * pa) * inv
    maxa = sorted_max * inv
    # population variance over the visible keys, two-pass (stable for near-uniform rows)
    dev = _WS.get("dev", P.shape)
    np.subtract(P, (tot / nkf)[..., None], out=dev)
    dev *= ch.mf
    std = np.sqrt(np.einsum("sbrk,sbrk->sbr", dev, dev) / nkf) * inv
    cols = plan.cols
    acc.entropy[rows[..., None], cols] = np.where(has, ent, np.nan).transpose(1, 2, 0)
    acc.max_attn[rows[..., None], cols] = np.where(has, maxa, np.nan).transpose(1, 2, 0)
    acc.row_std[rows[..., None], cols] = np.where(has, std, np.nan).transpose(1, 2, 0)
    acc.k_eff[rows[..., None], cols] = k_eff.transpose(1, 2, 0)
    if want_extras and plan.one >= 0:
        P1, inv1 = P[plan.one], inv[plan.one]
        with np.errstate(invalid="ignore", divide="ignore"):
            near = np.einsum("brk,rk->br", P1, ch.near_f) * inv1
            far = np.einsum("brk,rk->br", P1, ch.far_f) * inv1
            acc.near[rows] = np.where(ch.n_near > 0, near / ch.n_near, np.nan)
            acc.far[rows] = np.where(ch.n_far > 0, far / ch.n_far, np.nan)
            if codes is not None:
                qc, kc = codes
                valid = ch.tok_valid & (qc >= 0)[..., None] & (kc >= 0)[:, None, :]
                eq = qc[..., None] == kc[:, None, :]
                for name, grp in (("same", valid & eq), ("diff", valid & ~eq)):
                    cnt = grp.sum(axis=-1)
                    tot_g = np.multiply(P1, grp, out=tmp).sum(axis=-1) * inv1
                    getattr(acc, name)[rows] = np.where(cnt > 0, tot_g / np.maximum(cnt, 1), np.nan)
    if ch.qvar and plan.one >= 0:
        r1_all = pw_all.get(plan.m_one)
        for dlt, geo in ch.qvar.items():
            _qvar_pairs(acc.qvar[dlt], r1_all, a_all, geo, ch.out_f is not None)


def _qvar_pairs(tally, r1, a, geo, windowed):
    """Add the L2 distances of query pairs to ``tally`` = [sum, count]. ``r1`` holds the
    scale-1 weights exp(a) of every chunk row (0 on masked keys); ``geo`` = (early rows,
    late rows, shared-key mask as float, as bool)."""
    early, late, sf, shared = geo
    shape = (r1.shape[0],) + sf.shape
    lw = _WS.get("ql", shape)
    np.multiply(r1[:, late], sf, out=lw)
    e_src = r1[:, early]
    if windowed:
        ew = _WS.get("qe", shape)
        np.multiply(e_src, sf, out=ew)
        e_src = ew
    # without a window the early query sees exactly the shared keys: already restricted
    te, tl = e_src.sum(axis=-1), lw.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # e / te - l / tl = (e - l * (te / tl)) / te
        lw *= (te / tl)[..., None]
        np.subtract(e_src, lw, out=lw)
        d = np.sqrt(np.einsum("...k,...k->...", lw, lw)) / te
    tiny = ~((te >= _TINY_MASS) & (tl >= _TINY_MASS))
    if tiny.any():  # every shared key far below a row's max: softmax afresh from the scores
        early_i = np.arange(r1.shape[1])[early]
        late_i = np.arange(r1.shape[1])[late]
        for bi, ri in zip(*np.nonzero(tiny)):
            rows = []
            for r in (early_i[ri], late_i[ri]):
                z = np.where(shared[ri], a[bi, r], -np.inf)
                z = np.exp(z - z.max())
                rows.append(z / z.sum())
            d[bi, ri] = np.sqrt(np.sum((rows[0] - rows[1]) ** 2))
    tally[0] += float(d.sum())
    tally[1] += int(d.size)


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
    if q.n and k.n and q.d != k.d:
        raise ValueError(f"query width {q.d} != key width {k.d}")
    window = _resolve_window(q, k)
    q, k = _as_float64(q), _as_float64(k)
    acc = _scan(q, k, (1.0,), window, 0, chunk_size, want_extras=False, deltas=(int(delta),))
    total, count = acc.qvar[int(delta)]
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
    acc = _scan(q, k, all_scales, window, int(local_window), chunk_size, want_extras=True,
                deltas=(ADJACENT_DELTA, DISTANT_DELTA))
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
    (t_adj, n_adj), (t_far, n_far) = acc.qvar[ADJACENT_DELTA], acc.qvar[DISTANT_DELTA]
    qv_adj = t_adj / n_adj if n_adj else float("nan")
    qv_far = t_far / n_far if n_far else float("nan")

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
