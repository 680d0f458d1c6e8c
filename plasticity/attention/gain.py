"""The query-scale sweep's gain: how fast a head sharpens as its queries grow."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def gain_fit(scales: Sequence[float], mean_max_attn: Sequence[float]) -> tuple[float, float]:
    """OLS slope of mean max_attn vs log(scale), and its R2 (the method's convention
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
    """gain_a / gain_b (a target/control ratio); NaN when either is non-finite
    or gain_b == 0."""
    try:
        a, b = float(gain_a), float(gain_b)
    except (TypeError, ValueError):
        return float("nan")
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0.0:
        return float("nan")
    return a / b


def entropy_falls_monotonically(scales: Sequence[float], mean_entropy: Sequence[float]) -> bool | None:
    """Whether mean entropy strictly falls as the scale grows; None when a point is not finite
    (nothing to judge)."""
    order = np.argsort(np.asarray(scales, dtype=np.float64))
    ent = np.asarray(mean_entropy, dtype=np.float64)[order]
    if ent.size < 2 or not np.all(np.isfinite(ent)):
        return None
    return bool(np.all(np.diff(ent) < 0))
