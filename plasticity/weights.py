"""Component weights: each component's share of the linear positional information (docs/method.md#component-weights)."""

from __future__ import annotations

import numpy as np


def component_weights(r2: np.ndarray) -> np.ndarray:
    """``w_c = r2_plus_c / sum(r2_plus)`` with ``r2_plus = max(R2_c, 0)`` (NaN counts as 0).

    Uniform ``1/d`` when ``sum(r2_plus) = 0``. The weights sum to 1.
    """
    r2 = np.asarray(r2, dtype=np.float64).reshape(-1)
    d = r2.shape[0]
    if d == 0:
        return np.zeros(0)
    plus = np.where(r2 > 0.0, r2, 0.0)
    total = float(plus.sum())
    if not total > 0.0:
        return np.full(d, 1.0 / d)
    return plus / total
