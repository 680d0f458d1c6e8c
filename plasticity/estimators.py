"""Attention-plasticity estimators (docs/method.md#attention-plasticity): `bucket_full_cov` (default) and `linear_diag`.

For a key pair with rotated difference ``D = k1 - k2`` and a Gaussian model of the query at
query bucket j with mean ``mu`` and covariance ``S``:

    m = D . mu,   v = D^T S D   (v <= 0 -> 1e-12),   p = Phi(m / sqrt(v)),   AP = 4 p (1 - p).

Both estimators plug an estimated mean into ``m``, so ``m`` carries its sampling noise (variance
``w``) and the plain formula reads low near AP = 1 by about (2/pi) w / v: bucket_full_cov's semantic
mean is bucket j's own sample (``w ~ v / n_j``, `mean_noise_variance`), linear_diag's mean a line
fitted to all queries (``w = v * lever_j ~ v / N``). Pair APs are therefore
`plasticity.pair_ap.debiased_ap`, whose expectation is the formula at the true mean, and each cell
mean is clipped to [0, 1].

Random stream: cells are visited in ascending query bucket, then ascending key bucket; each
cell with ``total > 0`` pairs makes exactly one ``rng.integers(0, total, size=n_pairs)`` call
(see `plasticity.pairs`). Both estimators therefore use the same pairs for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from .pair_influence import PairInfluence, PairInfluenceBuilder
from .pair_ap import (  # noqa: F401 (re-exported)
    VAR_FLOOR, ap_from_moments, ap_with_slopes, debiased_ap, debiased_ap_with_slopes, fitted_mean_variance,
    mean_noise_variance,
)
from .key_basis import KeyBasis, reflect_both_sides  # noqa: F401 (re-exported)
from .pairs import KeyPairIndex, eligibility_mask

#: Ridge added to each bucket covariance ``Sigma_j`` (docs/method.md#attention-plasticity).
SIGMA_RIDGE = 1e-12

KeyDiff = Union[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]


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
    ``q_count`` = number of queries of the cell's query bucket;
    ``influence``: the pair side of the example jackknife, when the pass was asked for it.
    """

    estimator: str
    q_bucket: np.ndarray
    k_bucket: np.ndarray
    plasticity: np.ndarray
    n_pairs: np.ndarray
    total_pairs: np.ndarray
    ap_var: np.ndarray
    q_count: np.ndarray
    influence: PairInfluence | None = None

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


@dataclass(frozen=True)
class QueryModel:
    """Gaussian model of the rotated query at each query bucket of ``buckets``.

    ``mean`` (J, d): model mean. bucket_full_cov: ``cov`` (J, d, d) = blockdiag(sigma2, Sigma_j);
    linear_diag: ``diag`` (d,) = resid_var (same for every bucket). ``mean_lever`` (J,): the sampling
    variance of a fitted line's value at ``tau_j`` per unit of residual variance (`fitted_mean_variance`),
    which gives the noise of ``m`` that the debiased pair AP removes (with ``Sigma_j / n_j`` for
    bucket_full_cov's sampled semantic mean); None: the plain pair AP.
    """

    estimator: str
    buckets: QueryBuckets
    mean: np.ndarray
    cov: np.ndarray | None = None
    diag: np.ndarray | None = None
    mean_lever: np.ndarray | None = None


def bucket_moments(buckets: QueryBuckets, Xq_rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query bucket: ``mu_j`` = mean of ``Xq_rot[rows_j, 1:]`` and ``Sigma_j`` = its covariance (ddof=1)
    plus 1e-12 I. Returns (mu (J, d-1), Sigma (J, d-1, d-1))."""
    Xq_rot = np.asarray(Xq_rot, dtype=np.float64)
    d = Xq_rot.shape[1]
    J = buckets.bucket.shape[0]
    mu = np.zeros((J, d - 1))
    Sigma = np.zeros((J, d - 1, d - 1))
    ridge = SIGMA_RIDGE * np.eye(d - 1)
    for jj in range(J):
        rows = Xq_rot[buckets.start[jj] : buckets.stop[jj], 1:]
        mu[jj] = rows.mean(axis=0)
        Y = rows - mu[jj]
        Sigma[jj] = (Y.T @ Y) / (rows.shape[0] - 1) + ridge
    return mu, Sigma


def full_cov_model(
    buckets: QueryBuckets,
    mu: np.ndarray,
    Sigma: np.ndarray,
    alpha_rot: np.ndarray,
    beta_rot: np.ndarray,
    resid_var: np.ndarray,
    *,
    positions: np.ndarray,
) -> QueryModel:
    """bucket_full_cov model: mean ``[alpha_rot[0] + beta_rot[0] tau_j, mu_j]``, covariance
    ``blockdiag(resid_var[0], Sigma_j)`` (``Sigma_j`` already includes the 1e-12 ridge); ``positions``:
    of all the queries the position fit used (for the variance of the fitted component-0 mean)."""
    J = buckets.bucket.shape[0]
    d = np.asarray(alpha_rot).shape[0]
    mean = np.zeros((J, d))
    mean[:, 0] = alpha_rot[0] + beta_rot[0] * buckets.tau
    mean[:, 1:] = mu
    cov = np.zeros((J, d, d))
    cov[:, 0, 0] = resid_var[0]
    cov[:, 1:, 1:] = Sigma
    lever = fitted_mean_variance(buckets.tau, 1.0, positions)
    return QueryModel("bucket_full_cov", buckets, mean, cov=cov, mean_lever=lever)


def linear_diag_model(buckets: QueryBuckets, alpha_rot: np.ndarray, beta_rot: np.ndarray, resid_var: np.ndarray,
                      *, positions: np.ndarray) -> QueryModel:
    """linear_diag model: mean ``alpha_rot + beta_rot tau_j``, covariance ``diag(resid_var)``; ``positions``:
    of all the queries of the position fit (the fitted mean's sampling variance is
    ``resid_var * fitted_mean_variance(tau_j, 1, positions)`` per component)."""
    mean = alpha_rot[None, :] + beta_rot[None, :] * buckets.tau[:, None]
    return QueryModel("linear_diag", buckets, mean, diag=np.asarray(resid_var, dtype=np.float64).copy(),
                      mean_lever=fitted_mean_variance(buckets.tau, 1.0, positions))


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


def plasticity_cells(
    model: QueryModel,
    keys: KeyPairIndex,
    key_diff: KeyDiff,
    *,
    sliding_window: int | None,
    num_pairs_per_bucket: int,
    rng: np.random.Generator,
    basis: KeyBasis | None = None,
    key_group: np.ndarray | None = None,
    n_groups: int = 0,
) -> CellTable:
    """Core of attention plasticity: cells, pair sampling and pair APs for a query model.

    ``key_diff(i1, i2)`` (or an array, differenced by row) gives key differences for canonical key
    rows: rotated differences when ``basis`` is None, raw differences otherwise (the model is then
    mapped into the raw basis, or the differences rotated, whichever is cheaper).
    ``key_group`` (the example group of every canonical key row, in ``range(n_groups)``) asks for
    the pair side of the example jackknife as well (`CellTable.influence`); the APs, the cells and
    the random stream are the same with or without it.
    """
    if int(num_pairs_per_bucket) < 1:
        raise ValueError("num_pairs_per_bucket must be >= 1")
    qb = model.buckets
    d = model.mean.shape[1] if model.mean.ndim == 2 else 0
    elig = eligibility_mask(qb.bucket, qb.minpos, keys.buckets, keys.maxpos, sliding_window)
    full = model.cov is not None
    debias = model.mean_lever is not None
    axis0 = np.zeros(d)
    if d:
        axis0[0] = 1.0
    if full and debias and basis is not None:
        axis0 = basis.map_mean(axis0)  # D_raw . axis0 = rotated component 0 of D
    builder = None if key_group is None else PairInfluenceBuilder(key_group, n_groups, qb.bucket.shape[0], d, full,
                                                                  basis if full else None)
    out = {k: [] for k in ("q", "k", "pl", "np", "tot", "var", "qn")}
    for jj in range(qb.bucket.shape[0]):
        cells = np.flatnonzero(elig[jj])
        if cells.shape[0] == 0:
            continue
        i1, i2, sizes = keys.draw(cells, num_pairs_per_bucket, rng)
        ap = np.zeros(0)
        nc = cells.shape[0]
        if i1.shape[0]:
            D = _key_diff(keys=key_diff, i1=i1, i2=i2)
            if D.shape != (i1.shape[0], d):
                raise ValueError(f"key differences have shape {D.shape}, expected ({i1.shape[0]}, {d})")
            w = None
            if full:
                mean, cov = model.mean[jj], model.cov[jj]
                if basis is not None:
                    mean, cov = basis.map_mean(mean), basis.map_cov(cov)
                m = D @ mean
                v = np.einsum("ij,ij->i", D @ cov, D)
                if debias:  # sampled bucket mean and fitted component-0 line
                    D0 = D @ axis0
                    w = mean_noise_variance(v, D0, model.cov[jj, 0, 0], qb.n[jj], model.mean_lever[jj])
            else:
                if basis is not None:
                    D = basis.rotate(D)
                m = D @ model.mean[jj]
                v = (D * D) @ model.diag
                if debias:  # fitted line of every component: w = lever_j sum_c D_c^2 resid_var_c
                    w = model.mean_lever[jj] * v
            if builder is None:
                ap = ap_from_moments(m, v) if w is None else debiased_ap(m, v, w)
            elif w is None:
                ap, dap_dm, dap_dv = ap_with_slopes(m, v)
                builder.add_bucket(jj, sizes, i1, ap, dap_dm, dap_dv, D)
            elif not full:  # w = lever v moves with the diagonal variances
                ap, dap_dm, dap_dv, dap_dw = debiased_ap_with_slopes(m, v, w)
                builder.add_bucket(jj, sizes, i1, ap, dap_dm, dap_dv + model.mean_lever[jj] * dap_dw, D)
            else:
                # w moves with the covariance C: dw/dC = (D D^T - D0^2 e0 e0^T) / n_j + D0^2 lever e0 e0^T
                ap, dap_dm, dap_dv, dap_dw = debiased_ap_with_slopes(m, v, w)
                inv_n = 1.0 / float(qb.n[jj])
                builder.add_bucket(jj, sizes, i1, ap, dap_dm, dap_dv + dap_dw * inv_n, D,
                                   cov00_slope=dap_dw * (D0 * D0) * (model.mean_lever[jj] - inv_n))
        elif builder is not None:
            builder.add_empty(nc)
        mean_c, var_c = _cell_stats(ap, sizes)
        if debias:
            mean_c = np.clip(mean_c, 0.0, 1.0)  # a single debiased AP may pass 1; a cell's AP may not
        out["q"].append(np.full(nc, qb.bucket[jj], np.int64))
        out["k"].append(keys.buckets[cells])
        out["pl"].append(mean_c)
        out["np"].append(sizes)
        out["tot"].append(keys.total_pairs[cells])
        out["var"].append(var_c)
        out["qn"].append(np.full(nc, qb.n[jj], np.int64))

    def cat(key, dtype):
        return np.concatenate(out[key]).astype(dtype) if out[key] else np.zeros(0, dtype)

    return CellTable(
        estimator=model.estimator,
        q_bucket=cat("q", np.int64),
        k_bucket=cat("k", np.int64),
        plasticity=cat("pl", np.float64),
        n_pairs=cat("np", np.int64),
        total_pairs=cat("tot", np.int64),
        ap_var=cat("var", np.float64),
        q_count=cat("qn", np.int64),
        influence=None if builder is None else builder.build(),
    )


def _check_params(alpha_rot, beta_rot, resid_var):
    alpha_rot = np.asarray(alpha_rot, dtype=np.float64).reshape(-1)
    beta_rot = np.asarray(beta_rot, dtype=np.float64).reshape(-1)
    resid_var = np.asarray(resid_var, dtype=np.float64).reshape(-1)
    d = alpha_rot.shape[0]
    if beta_rot.shape[0] != d or resid_var.shape[0] != d:
        raise ValueError("alpha_rot, beta_rot and resid_var must have equal lengths")
    return alpha_rot, beta_rot, resid_var


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
    """Default estimator (docs/method.md#attention-plasticity). For query bucket j (``j > 0``, ``n_j >= 2``):

    component 0: mean ``m0_j = alpha_rot[0] + beta_rot[0] * tau_j``, variance ``sigma2 = resid_var[0]``;
    components 1..: ``mu_j`` = mean and ``Sigma_j`` = cov (ddof=1) of ``Xq_rot[bucket j, 1:]`` + 1e-12 I.
    ``m = D0 m0_j + D[1:] . mu_j``, ``v = D0^2 sigma2 + D[1:]^T Sigma_j D[1:]``, and the pair's AP is
    ``debiased_ap(m, v, w)`` with ``w`` the sampling variance of ``m`` (`mean_noise_variance`): its
    expectation is ``4 p (1 - p)``, ``p = Phi(m_true / sqrt(v))``, so bucket j's own sampled mean does not
    pull AP below its value; cell means are clipped to [0, 1].

    Queries must be sorted by bucket and keys by (bucket, example_id, position) (canonical order).
    ``keys`` is the rotated key matrix ``Xk_rot`` (n_k, d) in that order, or a callable
    ``(i1, i2) -> Xk_rot[i1] - Xk_rot[i2]``. Returns one row per eligible cell (see `CellTable`).
    """
    alpha_rot, beta_rot, resid_var = _check_params(alpha_rot, beta_rot, resid_var)
    Xq_rot = np.asarray(Xq_rot, dtype=np.float64)
    d = alpha_rot.shape[0]
    if Xq_rot.ndim != 2 or Xq_rot.shape != (np.asarray(q_bucket).shape[0], d):
        raise ValueError(f"Xq_rot must be (n_q, {d}), got {Xq_rot.shape}")
    qb = QueryBuckets.build(q_bucket, q_position)
    mu, Sigma = bucket_moments(qb, Xq_rot)
    model = full_cov_model(qb, mu, Sigma, alpha_rot, beta_rot, resid_var, positions=q_position)
    return plasticity_cells(
        model, KeyPairIndex.build(k_bucket, k_example_id, k_position), keys,
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
    """Upstream-parity estimator (docs/method.md#attention-plasticity): query mean ``alpha_rot + beta_rot * tau_j`` for every
    component and covariance ``diag(resid_var)``: ``m = D . (alpha_rot + beta_rot tau_j)``,
    ``v = sum_c D_c^2 resid_var_c``, and the pair's AP is ``debiased_ap(m, v, lever_j v)`` with
    ``lever_j = fitted_mean_variance(tau_j, 1, q_position)`` (the fitted line's noise, of order 1/N: the
    values move from the plain formula's by about (2/pi) lever_j, a few 1e-5 for tens of thousands of
    queries). Same buckets, cells and pairs as `bucket_full_cov` (``Xq_rot`` is not used and may be None)."""
    alpha_rot, beta_rot, resid_var = _check_params(alpha_rot, beta_rot, resid_var)
    qb = QueryBuckets.build(q_bucket, q_position)
    model = linear_diag_model(qb, alpha_rot, beta_rot, resid_var, positions=q_position)
    return plasticity_cells(
        model, KeyPairIndex.build(k_bucket, k_example_id, k_position), keys,
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
