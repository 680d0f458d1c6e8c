"""How the weights of each query scale are computed from one exp per score.

The kernel's base is ``R = exp(a / 2**SHIFT)`` (``a`` the shifted score). A scale
``s = m / 2**SHIFT`` with integer ``1 <= m <= MAX_POWER`` gets ``R**m`` by repeated
multiplication -- ``R**m = R**(m-1) * R`` for odd m, ``(R**(m/2))**2`` for even m -- within a
few ulps of ``exp(s a)``; any other scale gets ``exp(s a)`` directly. The multiplications
that make ``R**m`` depend on ``m`` alone, so a scale's weights do not depend on which other
scales are computed (scale 1.0 is always ``R**4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SHIFT = 2
MAX_POWER = 64


@dataclass(frozen=True)
class ScalePlan:
    """``prog`` rows (dst, src1, src2): ``slot[dst] = slot[src1] * slot[src2]`` in order, slot 0
    holding R; ``scale_slot[k]`` the slot of scale k's weights, or -1 for a direct exp."""

    scales: np.ndarray  # float64
    prog: np.ndarray  # (steps, 3) int64
    n_slots: int
    scale_slot: np.ndarray  # int64
    one: int  # index of scale 1.0, -1 when absent


def power_of_scale(scale: float) -> int | None:
    """m with ``scale == m / 2**SHIFT`` and ``1 <= m <= MAX_POWER``, else None."""
    m = scale * 2**SHIFT
    return int(m) if m == int(m) and 1 <= m <= MAX_POWER else None


def scale_plan(scales: Sequence[float]) -> ScalePlan:
    """The multiplication program computing every power that ``scales`` need."""
    slot_of = {1: 0}
    prog: list[tuple[int, int, int]] = []

    def need(m: int) -> int:
        if m in slot_of:
            return slot_of[m]
        if m % 2:
            src = (need(m - 1), 0)
        else:
            h = need(m // 2)
            src = (h, h)
        slot_of[m] = len(slot_of)
        prog.append((slot_of[m], *src))
        return slot_of[m]

    slots = []
    for s in scales:
        m = power_of_scale(float(s))
        slots.append(-1 if m is None else need(m))
    scales = np.asarray([float(s) for s in scales], dtype=np.float64)
    one = int(np.flatnonzero(scales == 1.0)[0]) if np.any(scales == 1.0) else -1
    return ScalePlan(scales, np.asarray(prog, dtype=np.int64).reshape(-1, 3), len(slot_of),
                     np.asarray(slots, dtype=np.int64), one)
