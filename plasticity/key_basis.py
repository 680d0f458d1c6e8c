"""Raw and rotated key differences: `KeyBasis` maps the query model into the raw key basis (and
gradients back), so the estimators never rotate the keys themselves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeyBasis:
    """Relation between raw and rotated key differences: ``D_rot = (D_raw * s) H``, ``H = I - 2 w w^T``
    (``w`` None: H = I). Lets the estimators work on raw keys without rotating them."""

    s: np.ndarray
    w: np.ndarray | None

    def rotate(self, D: np.ndarray) -> np.ndarray:
        """``(D * s) H`` (new array), O(P d)."""
        R = D * self.s
        if self.w is not None:
            R -= np.outer(R @ self.w, 2.0 * self.w)
        return R

    def map_mean(self, mu: np.ndarray) -> np.ndarray:
        """``a`` with ``D_raw . a = D_rot . mu``: ``a = s * (H mu)``."""
        a = np.array(mu, dtype=np.float64)
        if self.w is not None:
            a -= 2.0 * float(self.w @ a) * self.w
        return a * self.s

    def map_cov(self, C: np.ndarray) -> np.ndarray:
        """``M`` with ``D_raw^T M D_raw = D_rot^T C D_rot``: ``M = (s s^T) * (H C H)`` in O(d^2)."""
        return reflect_both_sides(C, self.w) * np.outer(self.s, self.s)

    def pull_mean(self, g: np.ndarray) -> np.ndarray:
        """Gradients in the rotated basis from gradients in the raw basis (the transpose of `map_mean`):
        ``H (s * g)`` for every row of ``g`` (..., d)."""
        r = np.asarray(g, dtype=np.float64) * self.s
        if self.w is not None:
            r -= 2.0 * (r @ self.w)[..., None] * self.w
        return r

    def pull_cov(self, G: np.ndarray) -> np.ndarray:
        """Gradients in the rotated basis from gradients in the raw basis (the transpose of `map_cov`):
        ``H ((s s^T) * G) H`` for every matrix of ``G`` (..., d, d), by rank-one updates in O(d^2) each."""
        M = np.asarray(G, dtype=np.float64) * np.outer(self.s, self.s)
        w = self.w
        if w is not None:
            a = M @ w  # (..., d)
            b = w @ M
            g = a @ w
            M = M - 2.0 * (w[:, None] * b[..., None, :] + a[..., :, None] * w) + 4.0 * g[..., None, None] * np.outer(w, w)
        return M


def reflect_both_sides(M: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """``H M H`` for ``H = I - 2 w w^T`` (a copy of M when ``w`` is None), by rank-one updates in O(d^2)."""
    M = np.array(M, dtype=np.float64)
    if w is not None:
        a = M @ w
        b = w @ M
        g = float(w @ a)
        M -= 2.0 * np.outer(w, b)
        M -= 2.0 * np.outer(a, w)
        M += 4.0 * g * np.outer(w, w)
    return M
