"""The attention plasticity of one key pair (docs/method.md#attention-plasticity) and its slopes in the pair's moments.

For a key difference ``D`` and a Gaussian query model with mean ``mu`` and covariance ``S``:
``m = D . mu``, ``v = D^T S D`` (``v <= 0 -> 1e-12``), ``z = m / sqrt(v)``, ``p = Phi(z)``,
``AP = 4 p (1 - p)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

#: Floor replacing non-positive pair variances ``v`` (docs/method.md#attention-plasticity).
VAR_FLOOR = 1e-12
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def floored_z(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z, v')``: ``v' = v`` where ``v > 0`` and 1e-12 elsewhere, ``z = m / sqrt(v')`` (float64)."""
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    v = np.where(v <= 0.0, VAR_FLOOR, v)
    return m / np.sqrt(v), v


def ap_from_moments(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention plasticity of a pair: ``AP = 4 p (1 - p)``, ``p = Phi(m / sqrt(v))`` (scipy.special.ndtr),
    where ``v <= 0`` is replaced by 1e-12. AP lies in [0, 1]; it is 1 when m = 0."""
    p = ndtr(floored_z(m, v)[0])
    return 4.0 * p * (1.0 - p)


def ap_with_slopes(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(AP, dAP/dm, dAP/dv)`` per pair. AP has the bits of `ap_from_moments`;
    ``dAP/dm = 4 (1 - 2p) phi(z) / sqrt(v)``; ``dAP/dv = -2 (1 - 2p) phi(z) z / v``, which is
    non-negative (a wider query spread never lowers AP) and 0 where ``v <= 0`` was floored."""
    z, vf = floored_z(m, v)
    p = ndtr(z)
    ap = 4.0 * p * (1.0 - p)
    dap_dz = 4.0 * (1.0 - 2.0 * p) * (_INV_SQRT_2PI * np.exp(-0.5 * z * z))
    dap_dm = dap_dz / np.sqrt(vf)
    dap_dv = np.where(np.asarray(v) > 0.0, np.maximum(-0.5 * dap_dz * z / vf, 0.0), 0.0)
    return ap, dap_dm, dap_dv
