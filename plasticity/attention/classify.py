"""The attention class of a head from its mean entropy ratio."""

from __future__ import annotations

import math

SHARP_MAX = 0.5
UNIFORM_MIN = 0.95


def attention_class(entropy_ratio: float, sharp_max: float = SHARP_MAX, uniform_min: float = UNIFORM_MIN) -> str:
    """'sharp' (ratio <= sharp_max), 'uniform' (>= uniform_min), 'medium', or 'unknown' (NaN)."""
    if entropy_ratio is None or not math.isfinite(entropy_ratio):
        return "unknown"
    if entropy_ratio <= sharp_max:
        return "sharp"
    if entropy_ratio >= uniform_min:
        return "uniform"
    return "medium"
