"""Where the maximum of a two-sided Kolmogorov-Smirnov statistic can lie, from binned counts.

For one column ``x`` (n values) standardised as ``z = (x - c) / s``, with order statistics
``z_(0) <= .. <= z_(n-1)``, the statistic against N(0, 1) is

    D = max_i max((i + 1)/n - Phi(z_(i)), Phi(z_(i)) - i/n).

`ks_candidates` finds the terms that can reach D without sorting the column: the values are
counted into bins of a fixed grid in z (width ``h`` on ``[-zlim, zlim)``, plus one open bin
below and one above), whose Phi at the edges (``phi_edges``) the caller computes once. For a
bin ``b`` holding the ranks ``C_b .. C_b + c_b - 1`` between the edges ``P_b <= Phi(z) <= P_{b+1}``,

    lower:  max(P_b - C_b/n, (C_b + c_b)/n - P_{b+1})   <= a term of the bin (its first and last value)
    upper:  max((C_b + c_b)/n - P_b, P_{b+1} - C_b/n)   >= every term of the bin.

``L`` = the largest lower bound over the column's bins; only bins whose upper bound reaches
``L - 1e-12`` (the slack covers a value binned one rounding away from its edge) can hold D. Their
values are returned sorted, each with its rank ``C_b + (its place in the bin)``, so the caller
evaluates exactly scipy's terms (``scipy.special.ndtr``) for them alone: the maximum of those
terms is D, the same bits as sorting the column.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy")

#: Slack of the pruning (a value may sit one rounding away from its bin's edge).
PRUNE_SLACK = 1e-12
#: Bins holding more values than this are sorted by heapsort, not by insertion.
SMALL_BIN = 32


@njit(**_JIT)
def _bin_of(x, c, inv, off, nb):
    """Bin of a value: 0 below the grid, ``1 + floor((x - c) inv + off)`` on it, ``nb + 1`` above
    (NaN too); monotone in ``x``."""
    u = (x - c) * inv + off
    if u < 0.0:
        return 0
    if u < nb:
        return 1 + int(u)
    return nb + 1


@njit(**_JIT)
def ks_candidates(Z, center, sd, phi_edges, h, zlim):
    """Candidates of the KS maximum of every row of ``Z`` (k, n): ``(values, ranks, rows)``, row
    after row, each row's values ascending (see the module docstring). ``phi_edges`` (nb + 3):
    ``0, Phi(-zlim + i h) for i = 0..nb, 1`` with ``nb = round(2 zlim / h)``."""
    k, n = Z.shape
    nb = phi_edges.shape[0] - 3
    counts = np.zeros(nb + 2, np.int64)
    below = np.zeros(nb + 2, np.int64)
    slot = np.zeros(nb + 2, np.int64)
    keep = np.zeros(nb + 2, np.bool_)
    bins = np.empty(n, np.int32)
    cap = n // 8 if n // 8 > 1024 else 1024
    vals = np.empty(cap)
    ranks = np.empty(cap, np.int64)
    rows = np.empty(cap, np.int64)
    used = 0
    inv_n = 1.0 / n
    off = zlim / h
    for r in range(k):
        x = Z[r]
        c = center[r]
        inv = 1.0 / (h * sd[r])
        for b in range(nb + 2):
            counts[b] = 0
        for j in range(n):
            b = _bin_of(x[j], c, inv, off, nb)
            bins[j] = b
            counts[b] += 1
        total = 0
        low = -1.0
        for b in range(nb + 2):
            below[b] = total
            cb = counts[b]
            if cb:
                lo = _larger(phi_edges[b] - total * inv_n, (total + cb) * inv_n - phi_edges[b + 1])
                if lo > low:
                    low = lo
            total += cb
        m = 0
        for b in range(nb + 2):
            cb = counts[b]
            keep[b] = False
            if cb:
                hi = _larger((below[b] + cb) * inv_n - phi_edges[b], phi_edges[b + 1] - below[b] * inv_n)
                if hi >= low - PRUNE_SLACK:
                    keep[b] = True
                    slot[b] = used + m
                    m += cb
        if used + m > cap:
            cap = 2 * cap if 2 * cap > used + m else used + m
            more_vals = np.empty(cap)
            more_ranks = np.empty(cap, np.int64)
            more_rows = np.empty(cap, np.int64)
            for i in range(used):
                more_vals[i] = vals[i]
                more_ranks[i] = ranks[i]
                more_rows[i] = rows[i]
            vals, ranks, rows = more_vals, more_ranks, more_rows
        for j in range(n):
            b = bins[j]
            if keep[b]:
                vals[slot[b]] = x[j]
                slot[b] += 1
        # slot[b] is now the end of bin b's values: sort each kept bin (by insertion when it holds
        # few values; a crowded bin, e.g. of a column whose spread is a few outliers, by heapsort)
        for b in range(nb + 2):
            if keep[b]:
                end = slot[b]
                start = end - counts[b]
                if end - start > SMALL_BIN:
                    _heapsort(vals, start, end)
                else:
                    for i in range(start + 1, end):
                        v = vals[i]
                        t = i - 1
                        while t >= start and vals[t] > v:
                            vals[t + 1] = vals[t]
                            t -= 1
                        vals[t + 1] = v
                for i in range(start, end):
                    ranks[i] = below[b] + (i - start)
                    rows[i] = r
        used += m
    return vals[:used], ranks[:used], rows[:used]


@njit(**_JIT)
def _larger(a, b):
    """``max(a, b)`` of two floats (numba's builtin max compiles its string code too: ~2 s more)."""
    return a if a > b else b


@njit(**_JIT)
def _heapsort(a, start, end):
    """Sort ``a[start:end]`` ascending in place (heapsort: O(m log m) whatever the values; a few
    lines for numba to compile, where ``np.sort`` takes seconds)."""
    m = end - start
    for top in range(m // 2 - 1, -1, -1):
        _sift_down(a, start, top, m)
    for last in range(m - 1, 0, -1):
        v = a[start]
        a[start] = a[start + last]
        a[start + last] = v
        _sift_down(a, start, 0, last)


@njit(**_JIT)
def _sift_down(a, start, i, m):
    """Move ``a[start + i]`` down the max-heap ``a[start:start + m]`` to its place."""
    v = a[start + i]
    while True:
        c = 2 * i + 1
        if c >= m:
            break
        if c + 1 < m and a[start + c + 1] > a[start + c]:
            c += 1
        if not a[start + c] > v:
            break
        a[start + i] = a[start + c]
        i = c
    a[start + i] = v
