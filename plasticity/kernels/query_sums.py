"""The rotated query pass over one run of rows (numba, ``cache=True``).

For the rows ``x_i`` (i = a .. z-1) of the oriented queries ``X_q``, a shift ``c`` (the mean of all
rows) and the Householder vector ``w`` (``H = I - 2 w w^T``; ``reflect`` false: H = I), each row is
centred and rotated,

    e_i = (x_i - c) H = (x_i - c) - 2 r_i w,     r_i = (x_i - c) . w,

and, while it is in registers, the sums of the later steps are added (per column j):

    s2_j += e_ij^2,   s3_j += e_ij^3,   s4_j += e_ij^4,   sxy_j += pc_i e_ij   (``vary``),

and it is written out where a later step reads it: ``r[i] = r_i``, ``x0[i] = e_i0``,
``Z[t, i] = e_i,ks_cols[t]``, and with ``y`` (the semantic columns of a query bucket whose
covariance is wanted) ``y[i - a, j - 1] = e_ij - g_(j-1)``, ``g`` the mean of the semantic
columns of the run's first ``min(shift_rows, z - a)`` rotated rows (returned), so that the
bucket's covariance is formed from sums about a nearby point. Sums are added row after row in
float64; ``r_i`` with four interleaved partial sums (lane ``l`` adds the elements ``l, l + 4, ..``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def _rotated_row(X, i, shift, w, w2, reflect, e):
    """``e = (X[i] - shift) H`` (see the module docstring); returns ``r_i`` (0 without a reflection)."""
    d = e.shape[0]
    for j in range(d):
        e[j] = X[i, j] - shift[j]
    if not reflect:
        return 0.0
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    j = 0
    while j + 4 <= d:
        a0 += e[j] * w[j]
        a1 += e[j + 1] * w[j + 1]
        a2 += e[j + 2] * w[j + 2]
        a3 += e[j + 3] * w[j + 3]
        j += 4
    if j < d:
        a0 += e[j] * w[j]
    if j + 1 < d:
        a1 += e[j + 1] * w[j + 1]
    if j + 2 < d:
        a2 += e[j + 2] * w[j + 2]
    r = (a0 + a1) + (a2 + a3)
    for j in range(d):
        e[j] -= r * w2[j]
    return r


@njit(**_JIT)
def rotated_run_sums(X, a, z, shift, w, w2, reflect, pc, vary, ks_cols, s2, s3, s4, sxy, r, x0, Z, y, want_y,
                     shift_rows):
    """Add rows ``a .. z-1`` of ``X`` to the sums and write their outputs (module docstring);
    returns ``g`` (zeros(d - 1) without ``want_y``)."""
    d = X.shape[1]
    e = np.empty(d)
    g = np.zeros(max(d - 1, 0))
    if want_y:
        m = min(shift_rows, z - a)
        for i in range(a, a + m):
            _rotated_row(X, i, shift, w, w2, reflect, e)
            for j in range(1, d):
                g[j - 1] += e[j]
        for j in range(d - 1):
            g[j] /= m
    k = ks_cols.shape[0]
    for i in range(a, z):
        r[i] = _rotated_row(X, i, shift, w, w2, reflect, e)
        for j in range(d):
            v = e[j]
            v2 = v * v
            s2[j] += v2
            s3[j] += v2 * v
            s4[j] += v2 * v2
        if vary:
            p = pc[i]
            for j in range(d):
                sxy[j] += p * e[j]
        x0[i] = e[0]
        for t in range(k):
            Z[t, i] = e[ks_cols[t]]
        if want_y:
            for j in range(1, d):
                y[i - a, j - 1] = e[j] - g[j - 1]
    return g
