"""Which keys a query may see, and whether the capture holds all of them (key coverage).

A key at position ``pk`` is visible to a query at ``pq`` of the same example iff ``pk <= pq``
and, with a sliding window ``w``, ``pk > pq - w`` (the ``w`` most recent positions including the
query's own, as Hugging Face's ``sliding_window``). So the query may see
``n_visible = min(pq + 1, w)`` positions; ``n_captured`` of them are in the key shard.
``key_coverage = n_captured / n_visible`` and the row is **exact** when it is 1: every key the
query attends to was captured, so its rebuilt attention is the model's. Otherwise the row's
softmax runs over a subset of its keys and is not the model's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def visible_mask(q_pos: np.ndarray, k_pos: np.ndarray, sliding_window: int | None = None) -> np.ndarray:
    """Boolean (n_q, n_k) mask: key visible iff pk <= pq and (no window or pk > pq - w)."""
    pq = np.asarray(q_pos)[:, None]
    pk = np.asarray(k_pos)[None, :]
    mask = pk <= pq
    if sliding_window is not None:
        mask &= pk > pq - sliding_window
    return mask


@dataclass(frozen=True)
class KeyIndex:
    """Keys sorted by (example, position): ``order`` (row indices into the key arrays), their
    positions ``pos`` and a sortable int64 ``code`` of (example rank, position)."""

    order: np.ndarray
    pos: np.ndarray
    code: np.ndarray
    q_rank: np.ndarray  # example rank of each query row
    stride: int  # code = rank * stride + position + 1

    def query_code(self, position: np.ndarray) -> np.ndarray:
        """Codes of (the query's example, ``position``) for positions >= -1."""
        return self.q_rank * self.stride + np.maximum(position, -1) + 1


def key_index(q_example: np.ndarray, q_pos: np.ndarray, k_example: np.ndarray, k_pos: np.ndarray) -> KeyIndex:
    """Index of the keys for searching, per query, the keys of its example before a position."""
    ids, ranks = np.unique(np.concatenate([q_example, k_example]), return_inverse=True)
    q_rank, k_rank = ranks[: q_example.size].astype(np.int64), ranks[q_example.size:].astype(np.int64)
    top = max(int(q_pos.max(initial=0)), int(k_pos.max(initial=0)))
    stride = top + 2
    code = k_rank * stride + k_pos + 1
    order = np.argsort(code, kind="stable")
    return KeyIndex(order, k_pos[order], code[order], q_rank, stride)


def visible_ranges(index: KeyIndex, q_pos: np.ndarray, sliding_window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the keys it may see: ``index.order[lo:hi]`` (same example, ``pk <= pq`` and,
    with a window ``w``, ``pk > pq - w``)."""
    hi = np.searchsorted(index.code, index.query_code(q_pos), side="right")
    start = q_pos - sliding_window if sliding_window is not None else np.full_like(q_pos, -1)
    lo = np.searchsorted(index.code, index.query_code(start), side="right")
    return lo.astype(np.int64), hi.astype(np.int64)


def first_key_at_or_after(index: KeyIndex, position: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per query, the first index in [lo, hi] whose key position is >= ``position`` (for the
    near-key split of local bias: keys at or after ``pq - local_window``)."""
    at = np.searchsorted(index.code, index.query_code(position - 1), side="right")
    return np.clip(at, lo, hi).astype(np.int64)


@dataclass(frozen=True)
class Coverage:
    """Per query row: captured visible keys (``n_keys``, duplicates included), distinct
    captured positions among them, visible positions, ``key_coverage`` and ``exact``."""

    n_keys: np.ndarray
    n_captured: np.ndarray
    n_visible: np.ndarray
    key_coverage: np.ndarray
    exact: np.ndarray


def coverage(index: KeyIndex, q_pos: np.ndarray, lo: np.ndarray, hi: np.ndarray,
             sliding_window: int | None) -> Coverage:
    """Key coverage of every query row, from positions alone.

    ``n_captured`` counts distinct positions (a position captured twice is one position), so
    ``key_coverage = n_captured / n_visible <= 1`` and ``exact`` iff it equals 1.
    """
    n_keys = hi - lo
    new = np.ones(index.code.size, dtype=bool)
    new[1:] = index.code[1:] != index.code[:-1]
    distinct_before = np.concatenate(([0], np.cumsum(new)))
    inside = lo < hi
    repeated_first = np.zeros_like(inside)
    repeated_first[inside] = ~new[lo[inside]]
    n_captured = distinct_before[hi] - distinct_before[lo] + repeated_first
    n_visible = q_pos + 1 if sliding_window is None else np.minimum(q_pos + 1, sliding_window)
    return Coverage(n_keys.astype(np.int64), n_captured.astype(np.int64), n_visible.astype(np.int64),
                    n_captured / n_visible, n_captured == n_visible)


def count_exact_rows(q_example: np.ndarray, q_pos: np.ndarray, k_example: np.ndarray, k_pos: np.ndarray,
                     sliding_window: int | None) -> int:
    """Number of exact query rows of a head, from positions alone (no vectors):
    ``sum over queries of [n_captured == n_visible]``, with ``n_visible = min(pq + 1, w)`` and
    ``n_captured`` the distinct captured key positions of the query's example in its visible range.

    Used to decide, before any vector is read, whether a head has enough exact rows for its
    attention to be computed. Taking rows away (a row cap) can only lower the count, so a count
    below the threshold on all captured rows means the head stays below it after any cap."""
    q_example = np.asarray(q_example, dtype=np.int64)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    k_example = np.asarray(k_example, dtype=np.int64)
    k_pos = np.asarray(k_pos, dtype=np.int64)
    if q_pos.size == 0:
        return 0
    index = key_index(q_example, q_pos, k_example, k_pos)
    lo, hi = visible_ranges(index, q_pos, sliding_window)
    return int(coverage(index, q_pos, lo, hi, sliding_window).exact.sum())
