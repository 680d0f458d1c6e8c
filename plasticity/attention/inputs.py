"""Checks and normalisation of the inputs of the attention functions (no arithmetic)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from ..types import TokenArrays


def resolve_window(q: TokenArrays, k: TokenArrays) -> int | None:
    """The head's sliding window: the query shard's, else the key shard's; two different
    non-null windows, or a window below 1, are an error."""
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


def int_positions(pos: np.ndarray, what: str) -> np.ndarray:
    """Positions as int64; non-integral, non-finite or negative positions are an error."""
    pos = np.asarray(pos, dtype=np.float64)
    if pos.size and (not np.all(np.isfinite(pos)) or np.any(pos != np.floor(pos))):
        raise ValueError(f"{what} positions must be finite integers")
    if pos.size and pos.min() < 0:
        raise ValueError(f"{what} positions must be >= 0")
    return pos.astype(np.int64)


def check_scales(scales: Iterable[float]) -> tuple[float, ...]:
    """Query scales as a tuple of distinct finite positive floats."""
    out = tuple(float(s) for s in scales)
    if not out:
        raise ValueError("scales must not be empty")
    for s in out:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scales must be finite and > 0, got {s}")
    if len(set(out)) != len(out):
        raise ValueError(f"scales must be distinct, got {out}")
    return out


def token_codes(qt: np.ndarray | None, kt: np.ndarray | None):
    """Integer codes for token strings shared by q and k; -1 for missing tokens
    ((None, None) unless both sides carry tokens)."""
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


def prepare(q: TokenArrays, k: TokenArrays) -> tuple[TokenArrays, TokenArrays, int | None]:
    """Both sides in canonical order, widths checked, and the head's window."""
    if q.n and k.n and q.d != k.d:
        raise ValueError(f"query width {q.d} != key width {k.d}")
    window = resolve_window(q, k)
    return q.canonical(), k.canonical(), window
