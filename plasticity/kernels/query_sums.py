"""The sums of the rotated query pass over one block of rotated rows (numba, ``cache=True``).

For a block ``E`` (m, d) of centred, rotated query rows ``e_i = (x_i - c) H`` (global rows
``a .. a+m-1``), one pass adds, per column j,

    s2_j += sum_i e_ij^2,   s3_j += sum_i e_ij^2 e_ij,   s4_j += sum_i e_ij^2 e_ij^2,
    sxy_j += sum_i pc_i e_ij                                        (``vary``),

each block sum formed first, row after row, and then added to the total: the very order of numpy's
``E.sum(axis=0)`` and ``einsum("ij,ij->j", ..)`` on the same block, so every sum has their bits.
It writes ``x0[a + i] = e_i0`` and ``Z[t, a + i] = e_i,ks_cols[t]``; with ``want_y`` (the block
belongs to a query bucket whose covariance is wanted) ``y[y_row + i, j - 1] = e_ij - g_(j-1)``,
where ``g`` (the shift of the bucket's covariance sums) is, on the bucket's first block
(``first``), set to the mean of the semantic columns of its first ``min(shift_rows, m)`` rows
(sum row after row, then one division: numpy's ``mean(axis=0)``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def rotated_block_sums(E, a, pc, vary, ks_cols, s2, s3, s4, sxy, x0, Z, y, y_row, want_y, first, g, shift_rows):
    """Add the block ``E`` to the sums and write its outputs (see the module docstring)."""
    m, d = E.shape
    b2 = np.zeros(d)
    b3 = np.zeros(d)
    b4 = np.zeros(d)
    bxy = np.zeros(d)
    for i in range(m):
        for j in range(d):
            v = E[i, j]
            v2 = v * v
            b2[j] += v2
            b3[j] += v2 * v
            b4[j] += v2 * v2
    if vary:
        for i in range(m):
            p = pc[a + i]
            for j in range(d):
                bxy[j] += p * E[i, j]
    for j in range(d):
        s2[j] += b2[j]
        s3[j] += b3[j]
        s4[j] += b4[j]
        sxy[j] += bxy[j]
    k = ks_cols.shape[0]
    for i in range(m):
        x0[a + i] = E[i, 0]
        for t in range(k):
            Z[t, a + i] = E[i, ks_cols[t]]
    if want_y:
        if first:
            h = shift_rows if shift_rows < m else m  # (builtin min would compile numba string code)
            for j in range(d - 1):
                g[j] = 0.0
            for i in range(h):
                for j in range(1, d):
                    g[j - 1] += E[i, j]
            for j in range(d - 1):
                g[j] /= h
        for i in range(m):
            for j in range(1, d):
                y[y_row + i, j - 1] = E[i, j] - g[j - 1]
