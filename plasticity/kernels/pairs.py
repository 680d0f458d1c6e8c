"""Key differences of sampled key pairs, gathered from the stored vectors (numba, ``cache=True``).

For the pairs ``(i1_p, i2_p)`` (canonical key rows, mapped to stored rows by ``rows`` when it is
not empty) of the stored key vectors ``K`` (float32 or float64),

    D[p, j] = float64(K[rows[i1_p], j]) - float64(K[rows[i2_p], j]),

one pass, no float32 or float64 copies of the two sides: the same float64 values as widening both
sides first (widening is exact, the subtraction rounds once).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def key_differences(K, i1, i2, rows):
    """``D`` (len(i1), d) float64 (see the module docstring); ``rows`` empty: the identity."""
    m = i1.shape[0]
    d = K.shape[1]
    D = np.empty((m, d))
    mapped = rows.shape[0] > 0
    for p in range(m):
        a = i1[p]
        b = i2[p]
        if mapped:
            a = rows[a]
            b = rows[b]
        for j in range(d):
            D[p, j] = np.float64(K[a, j]) - np.float64(K[b, j])
    return D
