"""Householder rotation to the positional basis (docs/method.md#rotation-to-the-positional-basis), applied in O(n d) without forming H."""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dger

from .regression import BETA_NORM_TOL, row_blocks


def householder_vector(beta: np.ndarray, tol: float = BETA_NORM_TOL) -> np.ndarray | None:
    """Unit vector ``w`` with ``H = I - 2 w w^T`` and ``H e1 = u = beta / ||beta||``.

    ``w = (e1 - u) / ||e1 - u||``; the first entry ``1 - u0`` is computed as
    ``sum_{i>0} u_i^2 / (1 + u0)`` when ``u0 > 0`` (no cancellation). Returns ``None``
    (meaning H = I) when ``||beta|| < tol`` or ``u == e1``.
    """
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    nrm = float(np.linalg.norm(beta))
    if not nrm >= tol:
        return None
    u = beta / nrm
    sigma = float(u[1:] @ u[1:])
    v = -u
    v[0] = sigma / (1.0 + u[0]) if u[0] > 0.0 else 1.0 - u[0]
    vn = float(np.linalg.norm(v))
    if not (vn > 0.0 and np.isfinite(vn)):
        return None
    return v / vn


def householder_matrix(beta: np.ndarray) -> np.ndarray:
    """The explicit (d, d) reflection ``H = I - 2 w w^T`` (identity when `householder_vector` is None).

    For reference and tests only; the pipeline uses `householder_apply`.
    """
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    w = householder_vector(beta)
    H = np.eye(beta.shape[0])
    if w is not None:
        H -= 2.0 * np.outer(w, w)
    return H


def householder_apply(X: np.ndarray, beta: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``X @ H`` with ``H e1 = beta/||beta||`` computed as ``X - 2 (X w) w^T`` in O(n d).

    Column 0 of the result equals ``X @ u``. ``H`` is symmetric and orthogonal (``H H = I``).
    Identity (a copy of X, or X itself when ``out is X``) when ``||beta|| < 1e-12`` or ``u == e1``.
    ``X`` may be (n, d) or a single (d,) row. Pass ``out=X`` (float64, C-contiguous) to rotate in place.
    """
    X = np.asarray(X, dtype=np.float64)
    one_row = X.ndim == 1
    X2 = X[None, :] if one_row else X
    if X2.ndim != 2:
        raise ValueError(f"X must be (n, d) or (d,), got shape {X.shape}")
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if beta.shape[0] != X2.shape[1]:
        raise ValueError(f"beta has length {beta.shape[0]}, X has {X2.shape[1]} columns")
    w = householder_vector(beta)
    if out is None:
        res = X2.copy()
    else:
        res = out[None, :] if one_row else out
        if res.shape != X2.shape:
            raise ValueError(f"out has shape {out.shape}, expected {X.shape}")
        if not np.shares_memory(res, X2):
            res[...] = X2
    if w is not None:
        for sl in row_blocks(res.shape[0], res.shape[1]):
            reflect_rows_inplace(res[sl], w)
    return res[0] if one_row else res


def reflect_rows_inplace(B: np.ndarray, w: np.ndarray, r_out: np.ndarray | None = None,
                         tmp: np.ndarray | None = None) -> np.ndarray:
    """``B <- B - 2 (B w) w^T`` in place (rows of B reflected by ``I - 2 w w^T``); returns ``r = B w``
    (written into ``r_out`` when given). ``tmp`` is an optional scratch array shaped like B.

    A C-contiguous float64 block takes two BLAS level-2 calls (gemv for r, then the rank-1 update
    dger on ``B.T``, which is Fortran-ordered: no copy), three times faster than numpy's
    outer-product-and-subtract; anything else takes the numpy route.
    """
    if r_out is not None:
        r = np.dot(B, w, out=r_out)
    else:
        r = B @ w
    if B.shape[0] and B.dtype == np.float64 and B.flags.c_contiguous and B.flags.writeable:
        out = dger(-2.0, w, r, a=B.T, overwrite_a=1)
        if not np.shares_memory(out, B):  # f2py made a copy after all: write it back
            B[...] = out.T
        return r
    if tmp is None:
        tmp = np.empty_like(B)
    np.multiply(r[:, None], 2.0 * w, out=tmp)
    B -= tmp
    return r
