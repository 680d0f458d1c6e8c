"""Key-pair sampling and sliding-window eligibility of key buckets (docs/method.md#attention-plasticity).

Pairs: inside one key bucket, all unordered pairs ``{a, b}`` (a != b) of keys of the same
example are enumerated example by example (examples in the rows' order, which is sorted by
example_id); within an example with m keys, pair ``(a, b)``, ``0 <= a < b < m``, has local
index ``t = b (b - 1) / 2 + a``. A draw is ``rng.integers(0, total, size=n_pairs)`` (one call per
cell) followed by decoding the flat index: example via ``searchsorted`` on cumulative pair
counts, then ``b = floor((1 + sqrt(1 + 8 t)) / 2)`` (integer-corrected), ``a = t - b (b - 1) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal consecutive values of ``key``."""
    n = key.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]).astype(np.int64)
    lens = np.diff(np.r_[starts, n]).astype(np.int64)
    return starts, lens


def decode_pair_index(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``t = b (b - 1) / 2 + a`` with ``0 <= a < b``: returns (a, b) int64 arrays."""
    t = np.asarray(t, dtype=np.int64)
    b = np.floor((1.0 + np.sqrt(1.0 + 8.0 * t.astype(np.float64))) / 2.0).astype(np.int64)
    b = np.maximum(b, 1)
    # correct possible off-by-one of the floating-point square root
    b = np.where(b * (b - 1) // 2 > t, b - 1, b)
    b = np.where((b + 1) * b // 2 <= t, b + 1, b)
    a = t - b * (b - 1) // 2
    return a, b


def _decode_flat(f, run_cum, run_pairs, run_start):
    """Map flat pair indices ``f`` (into the concatenation of all runs' pairs) to row indices (i1 < i2)."""
    e = np.searchsorted(run_cum, f, side="right")
    t = f - (run_cum[e] - run_pairs[e])
    a, b = decode_pair_index(t)
    return run_start[e] + a, run_start[e] + b


def sample_key_pairs(example_id_sorted: np.ndarray, n_pairs: int, rng: np.random.Generator):
    """Draw ``min(n_pairs, total)`` key pairs with replacement, uniformly over all unordered pairs of two
    distinct rows with the same example id.

    ``example_id_sorted``: example ids of the rows of one key bucket, grouped (sorted) by example.
    ``total = sum_e m_e (m_e - 1) / 2`` over examples with ``m_e`` rows. Uses exactly one
    ``rng.integers(0, total, size=min(n_pairs, total))`` call, none when ``total == 0`` or the
    size is 0. Returns (i1, i2, total): int64 row indices with ``i1 < i2`` and equal example ids.
    """
    ex = np.asarray(example_id_sorted).reshape(-1)
    starts, lens = _runs(ex)
    if starts.shape[0] and np.unique(ex[starts]).shape[0] != starts.shape[0]:
        raise ValueError("example_id_sorted must be grouped by example id (sort rows by example_id)")
    pairs = lens * (lens - 1) // 2
    cum = np.cumsum(pairs)
    total = int(cum[-1]) if cum.shape[0] else 0
    size = min(int(n_pairs), total)
    if size <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), total
    f = rng.integers(0, total, size=size)
    i1, i2 = _decode_flat(f, cum, pairs, starts)
    return i1, i2, total


@dataclass(frozen=True)
class KeyPairIndex:
    """Pair-sampling structure of a key shard whose rows are sorted by (bucket, example_id, position).

    ``buckets`` (C,) sorted key buckets holding keys; ``start``/``stop`` their row ranges;
    ``maxpos`` (C,) largest key position per bucket; ``total_pairs`` (C,) number of same-example
    distinct pairs per bucket. Runs are maximal blocks of equal (bucket, example_id).
    """

    buckets: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    maxpos: np.ndarray
    total_pairs: np.ndarray
    run_start: np.ndarray
    run_pairs: np.ndarray
    run_cum: np.ndarray
    pair_base: np.ndarray

    @classmethod
    def build(cls, bucket: np.ndarray, example_id: np.ndarray, position: np.ndarray) -> "KeyPairIndex":
        """Index keys given in canonical order (raises ValueError if not sorted by bucket, example_id)."""
        bucket = np.asarray(bucket).reshape(-1).astype(np.int64)
        example_id = np.asarray(example_id).reshape(-1).astype(np.int64)
        position = np.asarray(position, dtype=np.float64).reshape(-1)
        n = bucket.shape[0]
        if example_id.shape[0] != n or position.shape[0] != n:
            raise ValueError("key bucket, example_id and position must have equal lengths")
        if n > 1:
            db = np.diff(bucket)
            if np.any(db < 0) or np.any((db == 0) & (np.diff(example_id) < 0)):
                raise ValueError("keys must be sorted by (bucket, example_id, position) (TokenArrays.canonical())")
        bstart, blen = _runs(bucket)
        buckets = bucket[bstart] if n else np.zeros(0, np.int64)
        bstop = bstart + blen
        maxpos = np.maximum.reduceat(position, bstart) if n else np.zeros(0)
        # runs of equal (bucket, example_id)
        if n:
            brk = np.r_[True, (bucket[1:] != bucket[:-1]) | (example_id[1:] != example_id[:-1])]
            rstart = np.flatnonzero(brk).astype(np.int64)
            rlen = np.diff(np.r_[rstart, n]).astype(np.int64)
        else:
            rstart = rlen = np.zeros(0, np.int64)
        rpairs = rlen * (rlen - 1) // 2
        rcum = np.cumsum(rpairs)
        # first run of each bucket and pair offset before it
        first_run = np.searchsorted(rstart, bstart)
        pair_base = np.where(first_run > 0, rcum[np.maximum(first_run - 1, 0)] if rcum.size else 0, 0)
        end_cum = rcum[np.searchsorted(rstart, bstop) - 1] if n else np.zeros(0, np.int64)
        total = (end_cum - pair_base).astype(np.int64)
        return cls(
            buckets=buckets,
            start=bstart,
            stop=bstop,
            maxpos=maxpos,
            total_pairs=total,
            run_start=rstart,
            run_pairs=rpairs,
            run_cum=rcum,
            pair_base=pair_base.astype(np.int64),
        )

    def draw(self, cells: np.ndarray, n_pairs: int, rng: np.random.Generator):
        """Sample pairs for the key buckets ``cells`` (indices into ``buckets``), in the given order.

        Per cell: ``size = min(n_pairs, total_pairs[c])`` and one ``rng.integers(0, total, size)``
        call (skipped when size is 0) -- identical to `sample_key_pairs` on that bucket's rows.
        Returns (i1, i2, sizes): global row indices (concatenated cell by cell) and pairs per cell.
        """
        cells = np.asarray(cells, dtype=np.int64).reshape(-1)
        sizes = np.minimum(int(n_pairs), self.total_pairs[cells]).astype(np.int64)
        flats = [
            rng.integers(0, int(self.total_pairs[c]), size=int(s)) + self.pair_base[c]
            for c, s in zip(cells, sizes)
            if s > 0
        ]
        if not flats:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), sizes
        f = np.concatenate(flats)
        i1, i2 = _decode_flat(f, self.run_cum, self.run_pairs, self.run_start)
        return i1, i2, sizes


def eligibility_mask(
    q_buckets: np.ndarray,
    q_minpos: np.ndarray,
    k_buckets: np.ndarray,
    k_maxpos: np.ndarray,
    sliding_window: int | None = None,
) -> np.ndarray:
    """(J, C) boolean: key bucket ``c`` is eligible for query bucket ``j`` (docs/method.md#attention-plasticity).

    ``k_buckets`` are the sorted key buckets that hold keys. Eligible: ``c < j`` and, with a sliding
    window ``w``, ``maxpos_k(c) >= minpos_q(j) - w``; the largest key bucket below ``j`` is always
    eligible. Without a window every ``c < j`` is eligible.
    """
    qb = np.asarray(q_buckets, dtype=np.int64).reshape(-1)
    kb = np.asarray(k_buckets, dtype=np.int64).reshape(-1)
    if kb.shape[0] > 1 and np.any(np.diff(kb) <= 0):
        raise ValueError("k_buckets must be sorted and unique")
    mask = kb[None, :] < qb[:, None]
    if sliding_window is not None:
        qmin = np.asarray(q_minpos, dtype=np.float64).reshape(-1)
        kmax = np.asarray(k_maxpos, dtype=np.float64).reshape(-1)
        mask &= kmax[None, :] >= (qmin - float(sliding_window))[:, None]
        prev = np.searchsorted(kb, qb, side="left") - 1
        has = prev >= 0
        mask[np.flatnonzero(has), prev[has]] = True
    return mask


def eligible_key_buckets(
    q_bucket: int,
    q_minpos: float,
    k_buckets: np.ndarray,
    k_maxpos: np.ndarray,
    sliding_window: int | None = None,
) -> np.ndarray:
    """Eligible key buckets (ascending) for one query bucket; see `eligibility_mask`."""
    kb = np.asarray(k_buckets, dtype=np.int64).reshape(-1)
    m = eligibility_mask(np.array([q_bucket]), np.array([q_minpos], dtype=np.float64), kb, k_maxpos, sliding_window)
    return kb[m[0]]
