"""One pass over a head's examples: per-row attention statistics at every query scale.

Per example, the queries (sorted by position) go in blocks of at most ``BLOCK_ROWS`` rows; a
block's raw scores ``q . k / sqrt(d)`` over the keys its rows may see are one float64 array
(at most ``BLOCK_BUDGET`` elements when the rows allow it) handed to the compiled kernel
(`kernel.block_stats`), which computes every statistic of every row and scale.

Scores are computed a tile of ``TILE`` query rows at a time (one BLAS product per tile, over
the keys the tile's rows may see), tiles fixed by the rows' ranks in their example. So a
score depends on its tile alone, not on the block size, on which rows are computed
(``rows``) or on the worker: the same data give the same bits.

Query variation pairs (queries ``delta`` positions apart) are found here; the kernel
keeps the scale-1 weights of earlier rows in a small ring until their later partner comes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..types import TokenArrays
from .inputs import int_positions, token_codes
from .kernel_layout import EXTRA_FIELDS, N_BINS, OUT_FIELDS, ROW_FIELDS
from .scale_plan import scale_plan
from .visibility import KeyIndex, first_key_at_or_after

TILE = 64  # query rows of one score product
BLOCK_ROWS = 128  # most query rows per kernel call (a multiple of TILE)
BLOCK_BUDGET = 1_048_576  # elements of one block of scores, when TILE rows allow it


@dataclass
class RowStats:
    """Per query row (canonical order) and scale: the kernel's outputs; NaN (k_eff 0) for rows
    that were not computed. ``out`` holds entropy, max_attn and row_std (kernel.OUT_FIELDS),
    ``extras`` the scale-1 near / far / same / diff means (kernel.EXTRA_FIELDS); ``checks`` =
    [max row-sum error, max future weight, max out-of-window weight]; ``qvar[i] = [sum of L2
    distances, pairs]`` for ``deltas[i]``."""

    out: np.ndarray
    k_eff: np.ndarray
    extras: np.ndarray
    computed: np.ndarray
    checks: np.ndarray
    qvar: np.ndarray
    deltas: tuple[int, ...] = field(default=())

    @classmethod
    def empty(cls, nq: int, n_scales: int, deltas) -> "RowStats":
        return cls(np.full((len(OUT_FIELDS), nq, n_scales), np.nan), np.zeros((nq, n_scales), np.int64),
                   np.full((len(EXTRA_FIELDS), nq), np.nan), np.zeros(nq, dtype=bool), np.zeros(3),
                   np.zeros((len(deltas), 2)), tuple(int(d) for d in deltas))

    entropy = property(lambda self: self.out[0])
    max_attn = property(lambda self: self.out[1])
    row_std = property(lambda self: self.out[2])
    near = property(lambda self: self.extras[0])
    far = property(lambda self: self.extras[1])
    same = property(lambda self: self.extras[2])
    diff = property(lambda self: self.extras[3])

    def qvar_mean(self, delta: int) -> tuple[float, int]:
        """(mean L2 distance, number of pairs) of the pairs ``delta`` apart; NaN without pairs."""
        total, count = self.qvar[self.deltas.index(int(delta))]
        return (total / count if count else float("nan")), int(count)


def query_pairs(pos: np.ndarray, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """(early rank, late rank) of query pairs exactly ``delta`` positions apart in one example
    (``pos`` sorted); each query pairs with the first query at its position + delta."""
    hit = np.searchsorted(pos, pos + delta, side="left")
    ok = hit < pos.size
    ok[ok] = pos[hit[ok]] == pos[ok] + delta
    return np.flatnonzero(ok), hit[ok]


def block_rows_for(width: int, block_rows: int | None) -> int:
    """Query rows per block: ``block_rows`` (rounded up to whole tiles) when given, else as many
    whole tiles, up to BLOCK_ROWS, as keep rows x width within BLOCK_BUDGET."""
    if block_rows is not None:
        if int(block_rows) < 1:
            raise ValueError("block_rows must be >= 1")
        return -(-int(block_rows) // TILE) * TILE
    fit = BLOCK_BUDGET // max(width, 1) // TILE * TILE
    return max(TILE, min(BLOCK_ROWS, fit))


def scan(q: TokenArrays, k: TokenArrays, window: int | None, index: KeyIndex, lo: np.ndarray, hi: np.ndarray,
         compute: np.ndarray, exact: np.ndarray, scales, *, local_window: int = 5, want_extras: bool = True,
         deltas=(), block_rows: int | None = None) -> RowStats:
    """Statistics of the query rows flagged in ``compute`` (canonical order; ``lo``/``hi`` their
    visible keys in ``index.order``). Query-variation pairs join two computed rows that are both
    ``exact`` and share at least 2 keys."""
    plan = scale_plan(scales)
    stats = RowStats.empty(q.n, plan.scales.size, deltas)
    compute = compute & (hi > lo)
    if not compute.any():
        return stats
    qpos = int_positions(q.position, "query")
    qcodes, kcodes = token_codes(q.token_str, k.token_str) if want_extras else (None, None)
    near_lo = first_key_at_or_after(index, qpos - local_window, lo, hi) if want_extras else lo
    inv_sqrt_d = 1.0 / math.sqrt(q.d)
    key_rank = index.code // index.stride
    q_order = np.lexsort((qpos, index.q_rank))
    for rows in np.split(q_order, np.flatnonzero(np.diff(index.q_rank[q_order])) + 1):
        todo = compute[rows]
        if not todo.any():
            continue
        rank_e = int(index.q_rank[rows[0]])
        ks, ke = (int(x) for x in np.searchsorted(key_rank, [rank_e, rank_e + 1]))
        keys = index.order[ks:ke]
        ex = _Example(
            fields=np.stack([qpos[rows], lo[rows] - ks, hi[rows] - ks, near_lo[rows] - ks, rows,
                             np.arange(rows.size), np.zeros(rows.size, np.int64),
                             np.full(rows.size, -1, np.int64) if qcodes is None else qcodes[rows]]).astype(np.int64),
            keys=np.stack([index.pos[ks:ke], np.full(ke - ks, -1, np.int64) if kcodes is None else kcodes[keys]]),
            qv=np.multiply(q.vectors[rows], inv_sqrt_d, dtype=np.float64),
            kv=np.asarray(k.vectors[keys], dtype=np.float64),
        )
        pairs = _ExamplePairs.of(ex, todo & exact[rows], deltas)
        ex.fields[ROW_FIELDS.index("is_early")] = pairs.is_early
        step = block_rows_for(int((ex.hi - ex.lo).max()) + TILE, block_rows)
        for r0 in range(0, rows.size, step):
            r1 = min(rows.size, r0 + step)
            sel = np.flatnonzero(todo[r0:r1]) + r0
            if sel.size:
                _block(ex, pairs, r0, r1, sel, todo, window, want_extras, qcodes is not None, plan, stats)
        stats.computed[rows[todo]] = True
    return stats


@dataclass
class _Example:
    """One example's queries (sorted by position) and keys; key indices are example-relative.
    ``fields`` rows are kernel.ROW_FIELDS; ``keys`` rows are key positions and token codes."""

    fields: np.ndarray
    keys: np.ndarray
    qv: np.ndarray  # queries / sqrt(d), float64
    kv: np.ndarray  # keys, float64

    pq = property(lambda self: self.fields[0])
    lo = property(lambda self: self.fields[1])
    hi = property(lambda self: self.fields[2])


@dataclass
class _ExamplePairs:
    """Query-variation pairs of one example, grouped by their later row (CSR ``ptr`` over the
    rows; ``pairs`` rows: early rank, delta index), and the ring the kernel keeps the earlier
    rows' weights in."""

    ptr: np.ndarray
    pairs: np.ndarray
    is_early: np.ndarray
    ring: np.ndarray
    ring_span: np.ndarray

    @classmethod
    def of(cls, ex: _Example, usable: np.ndarray, deltas) -> "_ExamplePairs":
        early_l, late_l, idx_l = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for i, dlt in enumerate(deltas):
            e, l_ = query_pairs(ex.pq, int(dlt))
            # both rows usable, and >= 2 shared keys (the later row's window start .. the earlier row's last key)
            ok = usable[e] & usable[l_] & (ex.hi[e] - ex.lo[l_] >= 2)
            early_l.append(e[ok])
            late_l.append(l_[ok])
            idx_l.append(np.full(int(ok.sum()), i, np.int64))
        early, late, delta_index = (np.concatenate(x).astype(np.int64) for x in (early_l, late_l, idx_l))
        order = np.argsort(late, kind="stable")
        early, late, delta_index = early[order], late[order], delta_index[order]
        ptr = np.zeros(ex.pq.size + 1, np.int64)
        np.add.at(ptr, late + 1, 1)
        np.cumsum(ptr, out=ptr)
        is_early = np.zeros(ex.pq.size, dtype=np.int64)
        is_early[early] = 1
        ring = int((late - early).max()) + 1 if late.size else 1
        width = ex.keys.shape[1] if late.size else 1
        return cls(ptr, np.stack([early, delta_index]), is_early, np.empty((2, ring, width)),
                   np.zeros((2, ring), np.int64))


def _tile_scores(ex: _Example, r0: int, r1: int, c0: int, c1: int, todo: np.ndarray) -> np.ndarray:
    """Raw scores of rows [r0, r1) over keys [c0, c1) (entries outside a tile's own key range
    are not set): each TILE-row tile that has a row to compute is one product over the keys its
    rows may see."""
    out = np.empty((r1 - r0, c1 - c0))
    for t0 in range(r0, r1, TILE):
        t1 = min(r1, t0 + TILE)
        if not todo[t0:t1].any():
            continue
        a, b = int(ex.lo[t0:t1].min()), int(ex.hi[t0:t1].max())
        if b > a:
            np.matmul(ex.qv[t0:t1], ex.kv[a:b].T, out=out[t0 - r0 : t1 - r0, a - c0 : b - c0])
    return out


def _block(ex: _Example, pairs: _ExamplePairs, r0: int, r1: int, sel: np.ndarray, todo: np.ndarray,
           window: int | None, want_extras: bool, has_codes: bool, plan, stats: RowStats) -> None:
    """Rows ``sel`` (example ranks, inside [r0, r1)) through the kernel."""
    # imported here, not at the top: a head with no row to compute (too few exact rows) must not
    # pay for importing numba and loading the compiled kernels
    from .kernel import block_stats

    c0, c1 = int(ex.lo[r0:r1].min()), int(ex.hi[r0:r1].max())
    scores = _tile_scores(ex, r0, r1, c0, c1, todo)
    if sel.size < r1 - r0:
        scores = scores[sel - r0]
    base, end = int(pairs.ptr[sel[0]]), int(pairs.ptr[sel[-1] + 1])
    width = max(c1 - c0, 1)
    block_stats(
        scores, c0, np.ascontiguousarray(ex.fields[:, sel]), np.append(pairs.ptr[sel], end) - base,
        np.ascontiguousarray(pairs.pairs[:, base:end]), ex.keys, 0 if window is None else int(window),
        want_extras, has_codes, plan.prog, plan.n_slots, plan.scale_slot, plan.scales, plan.one,
        pairs.ring, pairs.ring_span, np.empty((plan.n_slots + 4, width)), np.empty((3, width), np.int64),
        np.empty((2, N_BINS + 1)), np.empty((4, N_BINS + 1), np.int64),
        stats.out, stats.k_eff, stats.extras, stats.checks, stats.qvar,
    )
