"""Attention of one example as a dense matrix: for small inputs and for checking the scan."""

from __future__ import annotations

import math

import numpy as np

from .visibility import visible_mask


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row softmax of ``scores`` over the entries ``mask`` keeps; masked entries and rows with
    no entry are 0."""
    a = np.where(mask, scores, -np.inf)
    has = mask.any(axis=1)
    a -= np.where(has, a.max(axis=1, initial=-np.inf), 0.0)[:, None]
    e = np.exp(a)
    tot = e.sum(axis=1)
    return e / np.where(has, tot, 1.0)[:, None]


def attention_weights(
    q_vectors: np.ndarray,
    q_pos: np.ndarray,
    k_vectors: np.ndarray,
    k_pos: np.ndarray,
    *,
    sliding_window: int | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Dense (n_q, n_k) attention ``softmax(scale * q . k / sqrt(d))`` of one example over the
    visible keys (no chunking). Rows of queries that see no key are all zero."""
    qv = np.asarray(q_vectors, dtype=np.float64)
    kv = np.asarray(k_vectors, dtype=np.float64)
    scores = (qv @ kv.T) * (scale / math.sqrt(qv.shape[1]))
    return masked_softmax(scores, visible_mask(q_pos, k_pos, sliding_window))
