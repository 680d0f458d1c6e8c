"""Attention-plasticity estimators (SPEC 2.8): `bucket_full_cov` (default) and `linear_diag`.

For a key pair with rotated difference ``D = k1 - k2`` and a Gaussian model of the query at
query bucket j with mean ``mu`` and covariance ``S``:

    m = D . mu,   v = D^T S D   (v <= 0 -> 1e-12),   p = Phi(m / sqrt(v)),   AP = 4 p (1 - p).

Random stream: cells are visited in ascending query bucket, then ascending key bucket; each
cell with ``total > 0`` pairs makes exactly one ``rng.integers(0, total, size=n_pairs)`` call
(see `plasticity.pairs`). Both estimators therefore use the same pairs for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
from scipy.special import ndtr

from .pairs import KeyPairIndex, eligibility_mask

#: Ridge added to each bucket covariance ``Sigma_j`` (SPEC 2.8).
SIGMA_RIDGE = 1e-12
#: Floor replacing non-positive pair variances ``v`` (SPEC 2.8).
VAR_FLOOR = 1e-12

KeyDiff = Union[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]


def ap_from_moments(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention plasticity of a pair: ``AP = 4 p (1 - p)``, ``p = Phi(m / sqrt(v))`` (scipy.special.ndtr),
    where ``v <= 0`` is replaced by 1e-12. AP lies in [0, 1]; it is 1 when m = 0."""
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    v = np.where(v <= 0.0, VAR_FLOOR, v)
    p = ndtr(m / np.sqrt(v))
    return 4.0 * p * (1.0 - p)


@dataclass(frozen=True)
class QueryBuckets:
    """Query buckets that enter the estimate: ``bucket > 0`` with at least 2 queries.

    Rows of bucket ``bucket[i]`` are ``start[i]:stop[i]`` of the (bucket-sorted) query arrays;
    ``n`` query counts, ``tau`` mean positions, ``minpos`` smallest positions.
    """

    bucket: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    n: np.ndarray
    tau: np.ndarray
    minpos: np.ndarray

    @classmethod
    def build(cls, bucket_sorted: np.ndarray, position: np.ndarray) -> "QueryBuckets":
        """From query buckets sorted ascending and their positions (raises if not sorted)."""
        b = np.asarray(bucket_sorted).reshape(-1).astype(np.int64)
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != b.shape:
            raise ValueError("query bucket and position must have equal lengths")
        if b.shape[0] == 0:
            z = np.zeros(0, np.int64)
            return cls(z, z, z, z, np.zeros(0), np.zeros(0))
        if np.any(np.diff(b) < 0):
            raise ValueError("queries must be sorted by bucket (TokenArrays.canonical())")
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        stops = np.r_[starts[1:], b.shape[0]]
        counts = stops - starts
        tau = np.add.reduceat(pos, starts) / counts
        minpos = np.minimum.reduceat(pos, starts)
        keep = (b[starts] > 0) & (counts >= 2)
        return cls(
            bucket=b[starts][keep],
            start=starts[keep].astype(np.int64),
            stop=stops[keep].astype(np.int64),
            n=counts[keep].astype(np.int64),
            tau=tau[keep],
            minpos=minpos[keep],
        )


@dataclass(frozen=True)
class CellTable:
    """Per-cell results of one estimator run, in stream order (ascending q_bucket, then k_bucket).

    ``plasticity`` = mean AP over the cell's pairs (NaN when ``n_pairs == 0``);
    ``ap_var`` = sample variance (ddof=1) of the pair APs (0 when n_pairs < 2, NaN when 0);
    ``total_pairs`` = number of same-example pairs the cell could draw from;
    ``q_count`` = number of queries of the cell's query bucket.
    """

    estimator: str
    q_bucket: np.ndarray
    k_bucket: np.ndarray
    plasticity: np.ndarray
    n_pairs: np.ndarray
    total_pairs: np.ndarray
    ap_var: np.ndarray
    q_count: np.ndarray

    @property
    def mean_var(self) -> np.ndarray:
        """Sampling variance of each cell mean: ``ap_var / n_pairs`` (NaN for empty cells)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_pairs > 0, self.ap_var / np.maximum(self.n_pairs, 1), np.nan)

    def rows(self) -> dict[str, np.ndarray]:
        """The `HeadResult.bucket_rows` columns: q_bucket, k_bucket, plasticity, n_pairs."""
        return {
            "q_bucket": self.q_bucket.astype(np.int64),
            "k_bucket": self.k_bucket.astype(np.int64),
            "plasticity": self.plasticity.astype(np.float64),
            "n_pairs": self.n_pairs.astype(np.int64),
        }


def _key_diff(keys: KeyDiff, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    if callable(keys):
        return np.asarray(keys(i1, i2), dtype=np.float64)
    return keys[i1] - keys[i2]


def _cell_stats(ap: np.ndarray, sizes: np.ndarray):
    """Per-cell mean and ddof=1 variance of ``ap`` laid out cell after cell with ``sizes`` entries."""
    k = sizes.shape[0]
    mean = np.full(k, np.nan)
    var = np.full(k, np.nan)
    nz = sizes > 0
    if ap.shape[0]:
        label = np.repeat(np.arange(k), sizes)
        sums = np.bincount(label, weights=ap, minlength=k)
        mean[nz] = sums[nz] / sizes[nz]
        dev = ap - mean[label]
        ss = np.bincount(label, weights=dev * dev, minlength=k)
        multi = sizes >= 2
        var[multi] = ss[multi] / (sizes[multi] - 1)
        var[nz & ~multi] = 0.0
    return mean, var


def _run_cells(
    estimator: str,
    q_bucket: np.ndarray,
    q_position: np.ndarray,
    Xq_rot: np.ndarray | None,
    alpha_rot: np.ndarray,
    beta_rot: np.ndarray,
    resid_var: np.ndarray,
    k_bucket: np.ndarray,
    k_example_id: np.ndarray,
    k_position: np.ndarray,
    keys: KeyDiff,
    *,
    sliding_window: int | None,
    num_pairs_per_bucket: int,
    rng: np.random.Generator,
) -> CellTable:
    alpha_rot = np.asarray(alpha_rot, dtype=np.float64).reshape(-1)
    beta_rot = np.asarray(beta_rot, dtype=np.float64).reshape(-1)
    resid_var = np.asarray(resid_var, dtype=np.float64).reshape(-1)
    d = alpha_rot.shape[0]
    if beta_rot.shape[0] != d or resid_var.shape[0] != d:
        raise ValueError("alpha_rot, beta_rot and resid_var must have equal lengths")
    if int(num_pairs_per_bucket) < 1:
        raise ValueError("num_pairs_per_bucket must be >= 1")
    qb = QueryBuckets.build(q_bucket, q_position)
    kidx = KeyPairIndex.build(k_bucket, k_example_id, k_position)
    elig = eligibility_mask(qb.bucket, qb.minpos, kidx.buckets, kidx.maxpos, sliding_window)
    if estimator == "bucket_full_cov":
        if Xq_rot is None:
            raise ValueError("bucket_full_cov needs the rotated queries Xq_rot")
        Xq_rot = np.asarray(Xq_rot, dtype=np.float64)
        if Xq_rot.ndim != 2 or Xq_rot.shape[1] != d or Xq_rot.shape[0] != np.asarray(q_bucket).shape[0]:
            raise ValueError(f"Xq_rot must be (n_q, {d}), got {Xq_rot.shape}")
    out = {k: [] for k in ("q", "k", "pl", "np", "tot", "var", "qn")}
    ridge = SIGMA_RIDGE * np.eye(d - 1)
    for jj in range(qb.bucket.shape[0]):
        cells = np.flatnonzero(elig[jj])
        if cells.shape[0] == 0:
            continue
        i1, i2, sizes = kidx.draw(cells, num_pairs_per_bucket, rng)
        ap = np.zeros(0)
        if i1.shape[0]:
            D = _key_diff(keys, i1, i2)
            if D.shape != (i1.shape[0], d):
                raise ValueError(f"key differences have shape {D.shape}, expected ({i1.shape[0]}, {d})")
            tau = qb.tau[jj]
            if estimator == "bucket_full_cov":
                rows = Xq_rot[qb.start[jj] : qb.stop[jj], 1:]
                mu = rows.mean(axis=0)
                Y = rows - mu
                Sigma = (Y.T @ Y) / (rows.shape[0] - 1) + ridge
                D0 = D[:, 0]
                D1 = D[:, 1:]
                m = D0 * (alpha_rot[0] + beta_rot[0] * tau) + D1 @ mu
                v = D0 * D0 * resid_var[0] + np.einsum("ij,ij->i", D1 @ Sigma, D1)
            else:
                m = D @ (alpha_rot + beta_rot * tau)
                v = (D * D) @ resid_var
            ap = ap_from_moments(m, v)
        mean, var = _cell_stats(ap, sizes)
        nc = cells.shape[0]
        out["q"].append(np.full(nc, qb.bucket[jj], np.int64))
        out["k"].append(kidx.buckets[cells])
        out["pl"].append(mean)
        out["np"].append(sizes)
        out["tot"].append(kidx.total_pairs[cells])
        out["var"].append(var)
        out["qn"].append(np.full(nc, qb.n[jj], np.int64))

    def cat(key, dtype):
        return np.concatenate(out[key]).astype(dtype) if out[key] else np.zeros(0, dtype)

    return CellTable(
        estimator=estimator,
        q_bucket=cat("q", np.int64),
        k_bucket=cat("k", np.int64),
        plasticity=cat("pl", np.float64),
        n_pairs=cat("np", np.int64),
        total_pairs=cat("tot", np.int64),
        ap_var=cat("var", np.float64),
        q_count=cat("qn", np.int64),
    )


def bucket_full_cov(
    q_bucket: np.ndarray,
    q_position: np.ndarray,
    Xq_rot: np.ndarray,
    alpha_rot: np.ndarray,
    beta_rot: np.ndarray,
    resid_var: np.ndarray,
    k_bucket: np.ndarray,
    k_example_id: np.ndarray,
    k_position: np.ndarray,
    keys: KeyDiff,
    *,
    sliding_window: int | None = None,
    num_pairs_per_bucket: int = 256,
    rng: np.random.Generator,
) -> CellTable:
    """Default estimator (SPEC 2.8). For query bucket j (``j > 0``, ``n_j >= 2``):

    component 0: mean ``m0_j = alpha_rot[0] + beta_rot[0] * tau_j``, variance ``sigma2 = resid_var[0]``;
    components 1..: ``mu_j`` = mean and ``Sigma_j`` = cov (ddof=1) of ``Xq_rot[bucket j, 1:]`` + 1e-12 I.
    ``m = D0 m0_j + D[1:] . mu_j``, ``v = D0^2 sigma2 + D[1:]^T Sigma_j D[1:]``, ``AP = ap_from_moments(m, v)``.

    Queries must be sorted by bucket and keys by (bucket, example_id, position) (canonical order).
    ``keys`` is the rotated key matrix ``Xk_rot`` (n_k, d) in that order, or a callable
    ``(i1, i2) -> Xk_rot[i1] - Xk_rot[i2]``. Returns one row per eligible cell (see `CellTable`).
    """
    return _run_cells(
        "bucket_full_cov", q_bucket, q_position, Xq_rot, alpha_rot, beta_rot, resid_var,
        k_bucket, k_example_id, k_position, keys,
        sliding_window=sliding_window, num_pairs_per_bucket=num_pairs_per_bucket, rng=rng,
    )


def linear_diag(
    q_bucket: np.ndarray,
    q_position: np.ndarray,
    Xq_rot: np.ndarray | None,
    alpha_rot: np.ndarray,
    beta_rot: np.ndarray,
    resid_var: np.ndarray,
    k_bucket: np.ndarray,
    k_example_id: np.ndarray,
    k_position: np.ndarray,
    keys: KeyDiff,
    *,
    sliding_window: int | None = None,
    num_pairs_per_bucket: int = 256,
    rng: np.random.Generator,
) -> CellTable:
    """Upstream-parity estimator (SPEC 2.8): query mean ``alpha_rot + beta_rot * tau_j`` for every
    component and covariance ``diag(resid_var)``: ``m = D . (alpha_rot + beta_rot tau_j)``,
    ``v = sum_c D_c^2 resid_var_c``. Same buckets, cells and pairs as `bucket_full_cov`
    (``Xq_rot`` is not used and may be None)."""
    return _run_cells(
        "linear_diag", q_bucket, q_position, Xq_rot, alpha_rot, beta_rot, resid_var,
        k_bucket, k_example_id, k_position, keys,
        sliding_window=sliding_window, num_pairs_per_bucket=num_pairs_per_bucket, rng=rng,
    )


@dataclass(frozen=True)
class BucketSummary:
    """Per query bucket: mean of its non-NaN cells ``ap`` (K cells) and its sampling variance
    ``var = sum(cell mean_var) / K^2``; ``n`` = query count."""

    bucket: np.ndarray
    n: np.ndarray
    ap: np.ndarray
    var: np.ndarray
    n_cells: np.ndarray


def summarize_buckets(table: CellTable) -> BucketSummary:
    """Bucket plasticity ``AP_j`` = mean of the non-NaN cells of query bucket j, with its variance."""
    ok = ~np.isnan(table.plasticity)
    qb = table.q_bucket[ok]
    if qb.shape[0] == 0:
        z = np.zeros(0, np.int64)
        return BucketSummary(z, z, np.zeros(0), np.zeros(0), z)
    buckets, inv, counts = np.unique(qb, return_inverse=True, return_counts=True)
    ap = np.bincount(inv, weights=table.plasticity[ok]) / counts
    var = np.bincount(inv, weights=table.mean_var[ok]) / counts.astype(np.float64) ** 2
    n = np.zeros(buckets.shape[0], np.int64)
    n[inv] = table.q_count[ok]
    return BucketSummary(buckets, n, ap, var, counts.astype(np.int64))


def aggregate_cells(table: CellTable) -> tuple[float, float]:
    """Head-level ``(ap_overall, ap_overall_se)``; NaN, NaN when no cell has pairs.

    bucket_full_cov: ``ap = sum_j n_j AP_j / N`` over buckets with a non-NaN AP_j (N = sum n_j),
    ``se^2 = sum_j (n_j / N)^2 var_j`` with ``var_j`` from `summarize_buckets`.
    linear_diag: ``ap`` = unweighted mean of the M non-NaN cells, ``se^2 = sum(cell mean_var) / M^2``.
    Cell ``mean_var = ap_var / n_pairs`` (ap_var = ddof-1 variance of the pair APs, 0 if n_pairs < 2).
    """
    ok = ~np.isnan(table.plasticity)
    if not np.any(ok):
        return float("nan"), float("nan")
    if table.estimator == "linear_diag":
        M = int(ok.sum())
        ap = float(table.plasticity[ok].mean())
        var = float(table.mean_var[ok].sum()) / M**2
        return ap, float(np.sqrt(var))
    s = summarize_buckets(table)
    w = s.n / float(s.n.sum())
    ap = float(np.sum(w * s.ap))
    var = float(np.sum(w * w * s.var))
    return ap, float(np.sqrt(var))
