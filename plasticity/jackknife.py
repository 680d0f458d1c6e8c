"""Standard errors over the sampling of examples (`ap_overall_se`; docs/method.md#attention-plasticity): a delete-a-group
jackknife over groups of examples, linearised in the query model.

Examples (sequences) are the independent units of a capture: queries, keys and key pairs of one
example all go together. The G groups are the examples themselves when there are at most
`MAX_EXAMPLE_GROUPS` of them, else that many groups of examples dealt round-robin in the order of a
fixed hash of ``example_id`` (sizes differ by at most one example). Replicate g is the estimate
without group g, with its jackknife standard error

    se = sqrt((G - 1) / G * sum_g (theta_(g) - mean_g theta_(g))^2),    G - 1 degrees of freedom.

A replicate removes the group's queries from everything the query model is estimated from, and the
group's key pairs from their cells. It holds fixed what is chosen once per head: the orientation
signs, which cells are eligible, the pair draws (the pairs of the other examples stay as drawn), and
for linear_diag the rotation basis. Per query bucket j and group g:

* exactly, from additive per-group sums (`plasticity.query_influence`): the query counts ``n_j``,
  mean positions ``tau_j``, the position fit of the rotated queries (``alpha_rot``, ``beta_rot``,
  ``resid_var``), the semantic bucket means ``mu_j``, the change of ``Sigma_j`` (rank-one downdates),
  for bucket_full_cov the positional direction ``u``; and each cell's mean AP over its remaining
  pairs at the full-data model (`plasticity.pair_influence`);
* to first order: the move of the cell APs caused by the move of the query model, through the
  gradients ``dAP_j/dmean`` and ``dAP_j/dC`` of each bucket's AP.

So ``AP_j^(g) = mean over the cells still holding pairs of their exact key-side means + Delta_jg``;
a bucket left with fewer than 2 queries or without pairs drops out of that replicate, exactly as
the estimator would drop it; `ap_overall`'s replicate aggregates the buckets as the estimator does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit

from .estimators import CellTable, QueryBuckets
from .query_influence import BucketGroupStats, RowRuns, model_shifts_full_cov, model_shifts_linear_diag
from .regression import PositionDesign, PositionFit

#: Largest number of example groups (more examples are dealt into this many groups).
MAX_EXAMPLE_GROUPS = 64
#: Coverage of the stored confidence intervals.
CI_LEVEL = 0.95
#: Where the intervals were checked against known truth (benchmarks/calibrate_regimes.py): buckets of
#: at least this many queries (fewer leave a bias of about one standard error near AP = 1) ...
MIN_CALIBRATED_QUERIES = 100
#: ... and at least this many degrees of freedom (8 example groups; fewer make the linearised
#: jackknife itself uncertain by 25% or more).
MIN_CALIBRATED_DF = 7
#: A head's interval stays calibrated while buckets below MIN_CALIBRATED_QUERIES carry at most this
#: share of its weight (a small first bucket of a logarithmic scheme moves ap_overall little).
MAX_SMALL_BUCKET_WEIGHT = 0.1


# ----------------------------------------------------------------------------- example groups


@dataclass(frozen=True)
class ExampleGroups:
    """Example group (``0 .. n_groups - 1``) of every query and key row, and the number of distinct
    examples among those rows."""

    q_group: np.ndarray
    k_group: np.ndarray
    n_groups: int
    n_examples: int


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of ``x`` as uint64: a fixed, well-spread hash of integer ids."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _runs_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal consecutive values."""
    n = ids.shape[0]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if n else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, n])


def example_groups(q_example_id: np.ndarray, k_example_id: np.ndarray,
                   max_groups: int = MAX_EXAMPLE_GROUPS) -> ExampleGroups:
    """Groups of the examples present in the query or key rows: ``G = min(E, max_groups)`` for E
    examples; examples sorted by ``splitmix64(example_id)`` (ties by id) and dealt round-robin, so
    with ``E <= max_groups`` every example is its own group. (Rows grouped by example, as canonical
    rows are within a bucket, make this cheap: ids are looked up once per run of equal ids.)"""
    q_ex = np.asarray(q_example_id, dtype=np.int64).reshape(-1)
    k_ex = np.asarray(k_example_id, dtype=np.int64).reshape(-1)
    (qs, ql), (ks, kl) = _runs_of(q_ex), _runs_of(k_ex)
    ids = np.unique(np.r_[q_ex[qs], k_ex[ks]])
    E = int(ids.shape[0])
    G = max(1, min(E, int(max_groups)))
    rank = np.empty(E, np.int64)
    with np.errstate(over="ignore"):
        rank[np.lexsort((ids, _mix64(ids)))] = np.arange(E)
    group_of = rank % G
    return ExampleGroups(
        q_group=np.repeat(group_of[np.searchsorted(ids, q_ex[qs])], ql),
        k_group=np.repeat(group_of[np.searchsorted(ids, k_ex[ks])], kl),
        n_groups=G,
        n_examples=E,
    )


# ----------------------------------------------------------------------------- replicates


@dataclass(frozen=True)
class ExampleJackknife:
    """Jackknife standard errors of one head.

    ``ap_se``: of ap_overall; ``bucket``/``bucket_se``: of AP_j for each query bucket with a non-NaN
    AP_j (ascending); ``df = n_groups - 1``; ``ap_replicates`` (G,) and ``bucket_replicates`` (K, G):
    the estimates without each group (NaN where the estimate does not exist without it).
    """

    n_examples: int
    n_groups: int
    ap_se: float
    bucket: np.ndarray
    bucket_se: np.ndarray
    ap_replicates: np.ndarray
    bucket_replicates: np.ndarray

    @property
    def df(self) -> int:
        return self.n_groups - 1


def jackknife_se(replicates: np.ndarray) -> np.ndarray:
    """``sqrt((G-1)/G * sum_g (r_g - mean r)^2)`` along the last axis; NaN when G < 2 or a replicate
    is NaN."""
    r = np.asarray(replicates, dtype=np.float64)
    G = r.shape[-1]
    if G < 2:
        return np.full(r.shape[:-1], np.nan)
    dev = r - r.mean(axis=-1, keepdims=True)
    return np.sqrt((G - 1) / G * np.sum(dev * dev, axis=-1))


def combine_replicates(table: CellTable, buckets: QueryBuckets, stats: BucketGroupStats,
                       shifts: np.ndarray, n_examples: int) -> ExampleJackknife:
    """Replicates of every AP_j and of ap_overall from the exact key side of each cell and the model
    shifts ``Delta_jg``, then `jackknife_se`.

    Cell c without group g: ``(T_c - T_cg) / (P_c - P_cg)`` (T = sum of pair APs, P = pairs; absent
    when no pair is left). ``AP_j^(g)`` = mean of the bucket's remaining cells + ``Delta_jg``, absent
    when no cell or fewer than 2 queries remain. bucket_full_cov: ``ap^(g) = sum_j n'_jg AP_j^(g) /
    sum_j n'_jg``; linear_diag: the mean of all remaining cells, each moved by its bucket's shift.
    """
    inf = table.influence
    G = inf.n_groups
    T = inf.cell_group_ap.sum(axis=1, keepdims=True)
    P = inf.cell_group_pairs.sum(axis=1, keepdims=True)
    left = P - inf.cell_group_pairs
    alive = left > 0
    cell_rep = np.where(alive, (T - inf.cell_group_ap) / np.maximum(left, 1), 0.0)
    full_cells = P[:, 0] > 0
    jj_of_cell = np.searchsorted(buckets.bucket, table.q_bucket)
    J = buckets.bucket.shape[0]
    cell_sum = np.zeros((J, G))
    cell_cnt = np.zeros((J, G))
    np.add.at(cell_sum, jj_of_cell, cell_rep)
    np.add.at(cell_cnt, jj_of_cell, alive.astype(np.float64))
    in_table = np.zeros(J, bool)
    in_table[jj_of_cell[full_cells]] = True
    n_left = buckets.n[:, None] - stats.n
    # a bucket is present in replicate g when the estimator would keep it without g; a NaN shift of
    # a present bucket (no position spread left) makes the replicate NaN rather than dropping it
    present = (cell_cnt > 0) & (n_left >= 2) & in_table[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        bucket_rep = np.where(present, cell_sum / cell_cnt + shifts, np.nan)
        if table.estimator == "linear_diag":
            num = np.where(present, cell_sum + cell_cnt * shifts, 0.0).sum(axis=0)
            den = np.where(present, cell_cnt, 0.0).sum(axis=0)
        else:
            wgt = np.where(present, n_left, 0.0)
            num = np.where(present, wgt * bucket_rep, 0.0).sum(axis=0)
            den = wgt.sum(axis=0)
        ap_rep = np.where(den > 0, num / den, np.nan)
    rows = np.flatnonzero(in_table)
    return ExampleJackknife(
        n_examples=int(n_examples),
        n_groups=G,
        ap_se=float(jackknife_se(ap_rep)) if rows.shape[0] else float("nan"),
        bucket=buckets.bucket[rows],
        bucket_se=jackknife_se(bucket_rep[rows]),
        ap_replicates=ap_rep,
        bucket_replicates=bucket_rep[rows],
    )


def t_interval(estimate, se, df: int, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``estimate -/+ t_{(1+level)/2, df} se``, clipped to [0, 1] (where AP lives); NaN where the
    estimate or se is NaN or ``df < 1``."""
    est = np.asarray(estimate, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    if df < 1:
        nan = np.full(np.broadcast(est, se).shape, np.nan)
        return nan, nan.copy()
    half = stdtrit(df, 0.5 + 0.5 * level) * se  # the t quantile (scipy.stats.t.ppf without its import cost)
    return np.clip(est - half, 0.0, 1.0), np.clip(est + half, 0.0, 1.0)



def example_jackknife(table: CellTable, buckets: QueryBuckets, Xq: np.ndarray, design: PositionDesign,
                      q_bucket: np.ndarray, q_example_id: np.ndarray, groups: ExampleGroups, fit: PositionFit,
                      fit_rot: PositionFit, x0: np.ndarray, w: np.ndarray | None, mu: np.ndarray | None,
                      Sigma: np.ndarray | None) -> ExampleJackknife:
    """The jackknife of one head: ``table`` from `plasticity_cells` with its pair side
    (``table.influence``); the oriented canonical queries ``Xq`` with their buckets, example ids and
    position design; the position fits of ``Xq`` (``fit``) and of ``X_q_rot`` (``fit_rot``, the rotation's refit);
    ``x0`` = column 0 of ``X_q_rot``; the Householder vector ``w``; and, for bucket_full_cov, the
    model's bucket means ``mu`` and covariances ``Sigma`` (`rotated_query_pass`)."""
    inf = table.influence
    if inf is None:
        raise ValueError("the cell table was computed without the pair side of the jackknife (key_group)")
    runs = RowRuns.build(np.asarray(q_bucket), np.asarray(q_example_id), groups.q_group)
    if table.estimator == "bucket_full_cov":
        stats, shifts = model_shifts_full_cov(Xq, design, fit, fit_rot, x0, w, buckets, mu, Sigma, runs,
                                              inf.n_groups, inf.grad_mean, inf.grad_cov)
    else:
        stats, shifts = model_shifts_linear_diag(Xq, design, fit, fit_rot, w, buckets, runs, inf.n_groups,
                                                 inf.grad_mean, inf.grad_diag)
    return combine_replicates(table, buckets, stats, shifts, groups.n_examples)


def calibrated_intervals(n_queries: np.ndarray, weight: np.ndarray, df: int, ap_se: float,
                         bucket_se: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether each stored 95% interval is in the regime where its coverage was checked, ``(head, per
    bucket)``: a bucket's when ``n_queries >= MIN_CALIBRATED_QUERIES``, ``df >= MIN_CALIBRATED_DF`` and
    its se is finite; the head's when ``df >= MIN_CALIBRATED_DF``, ``ap_se`` is finite and the buckets
    below MIN_CALIBRATED_QUERIES hold at most MAX_SMALL_BUCKET_WEIGHT of ``weight`` (the buckets'
    weights in ap_overall: query counts, or numbers of cells for linear_diag)."""
    n = np.asarray(n_queries, dtype=np.int64)
    w = np.asarray(weight, dtype=np.float64)
    enough_df = int(df) >= MIN_CALIBRATED_DF
    big = n >= MIN_CALIBRATED_QUERIES
    buckets = big & enough_df & np.isfinite(np.asarray(bucket_se, dtype=np.float64))
    total = float(w.sum())
    small_share = float(w[~big].sum()) / total if total > 0 else 1.0
    head = bool(enough_df and np.isfinite(ap_se) and small_share <= MAX_SMALL_BUCKET_WEIGHT)
    return head, buckets
