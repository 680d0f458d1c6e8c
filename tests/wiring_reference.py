"""Independent reference for the end-to-end wiring tests (test_e2e_*.py).

What the warehouse stores is recomputed here from the Parquet files without any of the
pipeline's plumbing: shards are read with pyarrow (not `warehouse.run.loading`), the
subsample is taken by its documented rule written out below, the orientation is a
brute-force loop over every key row, and only then are the pure `plasticity` functions
called. Facts the pure functions would share with the pipeline (which cells are eligible,
how many pairs a cell has, how buckets are weighted in `ap_overall`, the scalar position
fit) are recomputed by hand as well, so a bug in those functions cannot hide behind
"both sides agree".

Also here: `write_wiring_dataset`, a small dataset built from the synthetic generator and
then edited so that each wiring mistake named in tests/README.md changes a stored number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
from scipy import stats

from plasticity.head import analyze_head
from plasticity.synthetic import SyntheticSpec, make_key_shard, make_query_shard
from plasticity.types import AnalysisParams, HeadResult, TokenArrays
from warehouse.sources.demo_data import dataset_card, write_shard

# --------------------------------------------------------------------------- reading


def shard_path(root: Path, layer: int, head: int, kind: str) -> Path:
    return Path(root) / f"l{layer:02d}h{head:02d}{kind}" / "data.parquet"


def read_rows(path: Path) -> TokenArrays:
    """Every row of a shard, in file order, vectors as stored (float32)."""
    table = pq.read_table(path)
    vec = table.column("vector").combine_chunks()
    width = vec.type.list_size
    windows = set(table.column("sliding_window").to_pylist()) if "sliding_window" in table.column_names else {None}
    assert len(windows) == 1, f"{path}: mixed sliding windows {windows}"
    return TokenArrays(
        bucket=table.column("bucket").to_numpy().astype(np.int64),
        example_id=table.column("example_id").to_numpy().astype(np.int64),
        position=table.column("position").to_numpy().astype(np.float64),
        vectors=vec.flatten().to_numpy().reshape(-1, width),
        sliding_window=windows.pop(),
    )


def take_rows(rows: TokenArrays, index: np.ndarray) -> TokenArrays:
    return replace(rows, bucket=rows.bucket[index], example_id=rows.example_id[index],
                   position=rows.position[index], vectors=rows.vectors[index], token_str=None)


# --------------------------------------------------------------------------- subsample and orientation


def sample_row_numbers(rows: TokenArrays, cap: int, seed: int) -> np.ndarray:
    """File row numbers of the subsample, by the rule docs/method.md documents: rank rows by
    DuckDB's ``hash(seed, example_id, position)`` (BIGINT, BIGINT, DOUBLE), ties broken by
    (example_id, position), keep the first `cap`. All rows when the shard has no more than `cap`."""
    if rows.n <= cap:
        return np.arange(rows.n)
    con = duckdb.connect()
    try:
        con.register("keys", {"row_number": np.arange(rows.n), "example_id": rows.example_id,
                              "position": rows.position})
        chosen = con.execute(
            "SELECT row_number FROM keys "
            "ORDER BY hash($seed::BIGINT, example_id::BIGINT, position::DOUBLE), example_id, position LIMIT $cap",
            {"seed": seed, "cap": cap},
        ).fetchnumpy()["row_number"]
    finally:
        con.close()
    return np.sort(np.asarray(chosen, dtype=np.int64))


def brute_force_orientation(bucket: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The orientation by a plain loop over the rows: per bucket the mean vector, the average of those
    means with equal weight per bucket, then its sign with 0 -> +1."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for b, v in zip(bucket.tolist(), vectors):
        if b not in sums:
            sums[b] = np.zeros(vectors.shape[1])
            counts[b] = 0
        sums[b] += v.astype(np.float64)
        counts[b] += 1
    means = [sums[b] / counts[b] for b in sorted(sums)]
    average = sum(means) / len(means)
    return np.array([-1.0 if a < 0 else 1.0 for a in average])


def count_weighted_orientation(bucket: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The wrong orientation a pooled mean over rows gives (every row equal, not every bucket)."""
    average = vectors.astype(np.float64).mean(axis=0)
    return np.where(average < 0, -1.0, 1.0)


# --------------------------------------------------------------------------- one head


@dataclass
class ReferenceHead:
    """A head recomputed from its files: the rows used, the orientation, and `analyze_head`'s result."""

    layer: int
    q_head: int
    k_head: int
    q_all: TokenArrays
    k_all: TokenArrays
    q: TokenArrays  # the subsample of the query shard (file order)
    k: TokenArrays
    orientation: np.ndarray
    result: HeadResult


def reference_head(root: Path, layer: int, q_head: int, group_size: int, cap: int,
                   params: AnalysisParams) -> ReferenceHead:
    k_head = q_head // group_size  # GQA pairing of the input rules
    q_all = read_rows(shard_path(root, layer, q_head, "q"))
    k_all = read_rows(shard_path(root, layer, k_head, "k"))
    q = take_rows(q_all, sample_row_numbers(q_all, cap, params.seed))
    k = take_rows(k_all, sample_row_numbers(k_all, cap, params.seed))
    orientation = brute_force_orientation(k_all.bucket, k_all.vectors)  # ALL key rows, not the sample
    result = analyze_head(q, k, orientation, layer=layer, q_head=q_head, params=params)
    return ReferenceHead(layer, q_head, k_head, q_all, k_all, q, k, orientation, result)


# --------------------------------------------------------------------------- hand-made facts


def expected_cells(q: TokenArrays, k: TokenArrays) -> dict[tuple[int, int], int]:
    """{(q_bucket, k_bucket): total same-example key pairs} of every eligible cell (docs/method.md#attention-plasticity),
    enumerated by hand: query buckets j > 0 with >= 2 queries; key buckets c < j holding keys,
    and with the query shard's window w only those with max key position >= min query position
    of j minus w, plus always the nearest key bucket below j."""
    window = q.sliding_window
    key_buckets = sorted(set(k.bucket.tolist()))
    cells = {}
    for j in sorted(set(q.bucket.tolist())):
        in_j = q.bucket == j
        if j <= 0 or in_j.sum() < 2:
            continue
        below = [c for c in key_buckets if c < j]
        for c in below:
            maxpos_k = k.position[k.bucket == c].max()
            if window is None or c == below[-1] or maxpos_k >= q.position[in_j].min() - window:
                per_example = np.unique(k.example_id[k.bucket == c], return_counts=True)[1]
                cells[(j, c)] = int(sum(m * (m - 1) // 2 for m in per_example.tolist()))
    return cells


def boundary_cells(q: TokenArrays, k: TokenArrays) -> list[tuple[int, int]]:
    """Cells whose key bucket ends exactly at the window's edge, ``maxpos_k(c) == minpos_q(j) - w``,
    and that are not the nearest bucket below j: the cells `>` instead of `>=` would drop."""
    if q.sliding_window is None:
        return []
    out = []
    key_buckets = sorted(set(k.bucket.tolist()))
    for j, c in expected_cells(q, k):
        nearest = max(b for b in key_buckets if b < j)
        if c != nearest and k.position[k.bucket == c].max() == q.position[q.bucket == j].min() - q.sliding_window:
            out.append((j, c))
    return out


def query_counts(q: TokenArrays) -> dict[int, int]:
    buckets, counts = np.unique(q.bucket, return_counts=True)
    return dict(zip(buckets.tolist(), counts.tolist()))


def ap_from_cells(cells: list[tuple[int, int, float]], q_counts: dict[int, int], estimator: str) -> float:
    """``ap_overall`` from stored cells (q_bucket, k_bucket, plasticity), by the attention-plasticity aggregation:
    bucket_full_cov: AP_j = mean of j's non-NaN cells, then sum_j n_j AP_j / sum_j n_j with n_j
    the query count of bucket j; linear_diag: the plain mean of the non-NaN cells."""
    valid = [(j, value) for j, _, value in cells if not math.isnan(value)]
    if estimator == "linear_diag":
        return sum(v for _, v in valid) / len(valid)
    per_bucket: dict[int, list[float]] = {}
    for j, value in valid:
        per_bucket.setdefault(j, []).append(value)
    num = sum(q_counts.get(j, 0) * sum(vals) / len(vals) for j, vals in per_bucket.items())
    return num / sum(q_counts.get(j, 0) for j in per_bucket)


def unweighted_bucket_mean(cells: list[tuple[int, int, float]]) -> float:
    """The mean of the bucket plasticities AP_j with equal weight (what a lost weighting gives)."""
    per_bucket: dict[int, list[float]] = {}
    for j, _, value in cells:
        if not math.isnan(value):
            per_bucket.setdefault(j, []).append(value)
    return float(np.mean([np.mean(v) for v in per_bucket.values()]))


def position_metrics(q: TokenArrays, orientation: np.ndarray) -> dict[str, float]:
    """Position regression and scalar predictability numbers by other means: per-dimension least squares with numpy's lstsq, then
    scipy's linregress of log2(p + 1) on the projection onto beta/||beta||."""
    X = q.vectors.astype(np.float64) * orientation
    p = q.position
    design = np.column_stack([np.ones_like(p), p])
    coef, *_ = np.linalg.lstsq(design, X, rcond=None)
    beta = coef[1]
    resid = X - design @ coef
    r2 = 1.0 - (resid**2).sum(axis=0) / np.maximum(((X - X.mean(axis=0)) ** 2).sum(axis=0), 1e-12)
    y = np.log2(p + 1.0)
    projection = X @ (beta / np.linalg.norm(beta))
    fit = stats.linregress(projection, y)
    y_hat = fit.intercept + fit.slope * projection
    baseline = np.mean(np.abs(y - y.mean()))
    mae = np.mean(np.abs(y - y_hat))
    return {"q_R2_pos": float(np.nanmean(r2)), "q_beta_norm": float(np.linalg.norm(beta)),
            "q_R2_scalar": float(fit.rvalue**2), "q_mae_baseline": float(baseline),
            "q_mae_proj": float(mae), "q_mae_ratio": float(mae / baseline)}


# --------------------------------------------------------------------------- the wiring dataset

#: Buckets of 16 positions; a window of 17 puts the key bucket two below a query bucket exactly on
#: the window's edge: maxpos_k(j - 2) = 16 j - 17 = minpos_q(j) - 17.
BUCKET_SIZE = 16
WINDOW = 17
#: A cap below every shard's row count (queries 202, keys 123 rows), and one above them all.
SMALL_CAP = 90
LARGE_CAP = 50000
SEED = 0


def wiring_spec(model: str = "wiring", num_q_heads: int = 4, num_k_heads: int = 2) -> SyntheticSpec:
    return SyntheticSpec(
        model=model, num_layers=2, num_q_heads=num_q_heads, num_k_heads=num_k_heads, head_dim=6,
        num_examples=3, seq_len=8 * BUCKET_SIZE, bucket_size=BUCKET_SIZE, sliding_windows={1: WINDOW},
        noise_scales=(0.4, 1.5, 0.8), seed=11,
    )


def _keep_queries(rows: TokenArrays) -> np.ndarray:
    """Very different query counts per bucket, so weighting by n_j matters: buckets 0, 3, 4, 5 keep
    every query (48), buckets 1, 2, 7 three, bucket 6 one (skipped: fewer than 2 queries). Every
    bucket keeps its first position in example 0, so minpos_q(j) = 16 j."""
    offset = rows.position.astype(np.int64) % BUCKET_SIZE
    few = ((rows.example_id == 0) & np.isin(offset, (0, 8))) | ((rows.example_id == 1) & (offset == 3))
    one = (rows.example_id == 0) & (offset == 0)
    return np.where(np.isin(rows.bucket, (0, 3, 4, 5)), True, np.where(rows.bucket == 6, one, few))


def _keep_keys(rows: TokenArrays) -> np.ndarray:
    """Bucket 0 keeps every key (48), bucket 6 one per example (no same-example pair: NaN cells),
    the others offsets 0, 5, 10, 15 (12). Every bucket keeps its last position, so maxpos_k(c) =
    16 c + 15 and the window edge is reached."""
    offset = rows.position.astype(np.int64) % BUCKET_SIZE
    return np.where(rows.bucket == 0, True,
                    np.where(rows.bucket == 6, offset == 15, np.isin(offset, (0, 5, 10, 15))))


def _edit_key_vectors(keys: TokenArrays, cap: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Key component 0 built so that every wrong orientation gets its sign wrong. Only the sign of
    component 0 reaches a stored number: flipping another component flips one whole semantic
    column of the rotated queries, which leaves |skew|, kurtosis and KS p-values as they were.

    Bucket 0 (48 keys) holds +1, the others -0.3: the equal-weight average of bucket means is
    negative (s_0 = -1; docs/method.md#orientation), a pooled mean over rows positive. On top, inside each bucket
    the subsample is lifted by +2 and the other keys lowered to keep the bucket's mean: the
    same average over the sampled keys only is positive."""
    V = keys.vectors.astype(np.float64).copy()
    n = keys.n
    lift = np.zeros(n)
    sampled = np.zeros(n, bool)
    sampled[sample_row_numbers(keys, cap, seed)] = True
    for b in np.unique(keys.bucket):
        in_b = keys.bucket == b
        share = sampled[in_b].mean()
        if 0.0 < share < 1.0:
            lift[in_b] = np.where(sampled[in_b], 2.0, -2.0 * share / (1.0 - share))
    V[:, 0] = np.where(keys.bucket == 0, 1.0, -0.3) + lift + 0.05 * rng.standard_normal(n)
    return V


def _edit_query_vectors(queries: TokenArrays) -> np.ndarray:
    """Query component 0 shifted by +3, so an orientation taken from the queries has s_0 = +1."""
    V = queries.vectors.astype(np.float64).copy()
    V[:, 0] += 3.0
    return V


def write_wiring_dataset(root: Path, q_heads: dict[int, list[int]] | None = None, *, model: str = "wiring",
                         num_q_heads: int = 4, num_k_heads: int = 2) -> Path:
    """Two layers (layer 1 with a window of 17 positions) of the synthetic generator's heads, thinned
    and edited as described in `_keep_queries`, `_keep_keys`, `_edit_key_vectors` and
    `_edit_query_vectors`. `q_heads`:
    the query heads written per layer (default all); key heads are written as needed."""
    spec = wiring_spec(model, num_q_heads, num_k_heads)
    group = num_q_heads // num_k_heads
    root = Path(root)
    for layer in range(spec.num_layers):
        heads = sorted(q_heads[layer]) if q_heads is not None else list(range(num_q_heads))
        for k_head in sorted({h // group for h in heads}):
            keys = make_key_shard(spec, layer, k_head)
            keys = take_rows(keys, np.flatnonzero(_keep_keys(keys)))
            vectors = _edit_key_vectors(keys, SMALL_CAP, SEED, np.random.default_rng([layer, k_head]))
            write_shard(root, layer, k_head, "k", replace(keys, vectors=vectors))
        for q_head in heads:
            queries = make_query_shard(spec, layer, q_head)
            queries = take_rows(queries, np.flatnonzero(_keep_queries(queries)))
            write_shard(root, layer, q_head, "q", replace(queries, vectors=_edit_query_vectors(queries)))
    (root / "README.md").write_text(dataset_card(spec))
    return root
