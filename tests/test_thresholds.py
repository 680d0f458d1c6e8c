"""Size thresholds of the code, each crossed on both sides against an independent computation:
the regression's streaming blocks (pure function and a whole head through the pipeline), the KS
search's blocks, the attention scan's tiles and blocks, the 64k-row batches of the key sums, and
the batches of heads the pipeline commits together.

Data are built so that crossing a threshold matters (the rows of later blocks differ from the first
block's), and the tests assert that precondition."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from plasticity.attention import token_attention_metrics
from plasticity.estimators import KeyBasis, QueryBuckets, full_cov_model, linear_diag_model, plasticity_cells
from plasticity.head import analyze_head, canonical_order, oriented_rows, pair_rng_seed
from plasticity.jackknife import combine_replicates, example_groups, example_jackknife
from plasticity.orientation import orientation_from_keys
from plasticity.pairs import KeyPairIndex
from plasticity.query_influence import BucketGroupStats, RowRuns
from plasticity.query_pass import rotated_query_pass
from plasticity.attention.scan import BLOCK_BUDGET, BLOCK_ROWS, TILE, block_rows_for
from plasticity.normality import KS_ZLIM, column_moments, ks_grid, ks_statistic
from plasticity.regression import PositionDesign, block_rows, fit_position_regression, fit_rows
from plasticity.rotation import householder_apply, householder_matrix
from plasticity.synthetic import SyntheticSpec, make_key_shard, make_query_shard
from plasticity.types import AnalysisParams, TokenArrays
from warehouse.store import db
from warehouse.sources.catalog import ShardInfo
from warehouse.sources.shard_profile import profile_shard
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_shard, write_synthetic_dataset
from warehouse.run.loading import STREAM_BATCH_ROWS, load_rows
from warehouse.run.pipeline import analyze_dataset
from jackknife_reference import linearised_shifts
from wiring_reference import brute_force_orientation, position_metrics, read_rows, shard_path


# --------------------------------------------------------------------------- regression blocks

def lstsq_fit(p: np.ndarray, X: np.ndarray):
    """Per-column OLS by numpy's least squares: beta, R2, SS_tot, SS_res."""
    design = np.column_stack([np.ones_like(p), p])
    coef, *_ = np.linalg.lstsq(design, X, rcond=None)
    resid = X - design @ coef
    ss_res = (resid**2).sum(axis=0)
    ss_tot = ((X - X.mean(axis=0)) ** 2).sum(axis=0)
    return coef[1], 1.0 - ss_res / ss_tot, ss_tot, ss_res


@pytest.mark.parametrize("d", [8, 256])
@pytest.mark.parametrize("extra", [-1, 0, 1, 2 * 256 + 7])
def test_position_fit_on_both_sides_of_the_streaming_block(d, extra):
    """Rows ordered by position with a strong trend: the first block's mean is far from the mean
    of all rows, so sums kept about the first block and finished wrongly show in R2."""
    B = block_rows(d)
    n = B + extra if extra < 2 * 256 else 3 * B + 7
    rng = np.random.default_rng(d + n)
    p = np.sort(rng.integers(0, 4 * n, n)).astype(np.float64)
    slope = rng.uniform(5.0, 10.0, d) * rng.choice([-1.0, 1.0], d) / (4 * n)
    X = 3.0 + np.outer(p, slope) + rng.normal(size=(n, d)) * rng.uniform(0.1, 0.3, d)
    beta, r2, ss_tot, ss_res = lstsq_fit(p, X)
    if n > B:  # precondition: the rows after the first block are far from its mean (noise sd <= 0.3)
        assert np.abs(X[B:].mean(axis=0) - X[:B].mean(axis=0)).min() > 1.5
    fit = fit_position_regression(p, X)
    np.testing.assert_allclose(fit.beta, beta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.ss_tot, ss_tot, rtol=1e-9)
    np.testing.assert_allclose(fit.ss_res, ss_res, rtol=1e-9)
    np.testing.assert_allclose(fit.r2, r2, rtol=1e-9, atol=1e-12)
    assert fit.r2_overall == pytest.approx(float(np.mean(r2)), rel=1e-9)


LONG = SyntheticSpec(model="long-head", num_layers=1, num_q_heads=1, num_k_heads=1, head_dim=64,
                     num_examples=5, seq_len=1024, bucket_size=256, sliding_windows={}, seed=11)


def test_a_head_longer_than_one_block_is_fitted_like_least_squares(tmp_path):
    """Real heads have up to 50,000 rows; here 5,120 query rows of width 64 (five streaming blocks
    of 1,024 rows, and position buckets of 1,280 rows, each longer than a block) go through the
    pipeline, and what it stores is compared with numpy's least squares, scipy's linregress and
    scipy's KS test on the rows read back with pyarrow (every row is used: the cap is above the row
    count; the position metrics do not depend on the sign orientation)."""
    root = write_synthetic_dataset(tmp_path / LONG.model, LONG, with_truth=False)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False})
    summary = analyze_dataset(cfg, root, progress=False)
    assert summary.n_errors == 0 and summary.n_done == 1
    with db.reader(cfg.warehouse) as con:
        cur = con.execute("SELECT * FROM head_metrics WHERE run_id = $r ORDER BY q_head", {"r": summary.run_id})
        names = [c[0] for c in cur.description]
        stored = [dict(zip(names, row)) for row in cur.fetchall()]
        components = con.execute("SELECT q_head, component, component_r2, weight FROM head_component_weights "
                                 "WHERE run_id = $r ORDER BY q_head, component", {"r": summary.run_id}).fetchall()
    k = read_rows(shard_path(root, 0, 0, "k"))
    orientation = brute_force_orientation(k.bucket, k.vectors)
    for row in stored:
        q = read_rows(shard_path(root, 0, row["q_head"], "q"))
        assert q.n == row["n_q_tokens"] > block_rows(q.d)  # precondition: longer than one block
        assert np.bincount(q.bucket).min() > block_rows(q.d)  # and so is every bucket
        want = position_metrics(q, np.ones(q.d))
        for col, value in want.items():
            assert row[col] == pytest.approx(value, rel=1e-9, abs=1e-12), col
        # each dimension's R2 by least squares and the weights as their shares; the KS p-values of
        # the standardised semantic components (rotated by another streaming pass) by scipy
        X = q.vectors.astype(np.float64) * orientation
        beta, r2, _, _ = lstsq_fit(q.position, X)
        rotated = X @ householder_matrix(beta)
        got = [(c, r, w) for h, c, r, w in components if h == row["q_head"]]
        assert [c for c, _, _ in got] == list(range(q.d))
        np.testing.assert_allclose([r for _, r, _ in got], r2, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose([w for _, _, w in got], np.maximum(r2, 0) / np.maximum(r2, 0).sum(),
                                   rtol=1e-9, atol=1e-12)
        sem = rotated[:, 1:]
        med = np.median([stats.kstest((c - c.mean()) / c.std(ddof=1), "norm").pvalue for c in sem.T])
        assert row["q_noise_med_ks_p"] == pytest.approx(med, rel=1e-9)


@pytest.mark.parametrize("extra", [-1, 0, 1, 300])
def test_moments_and_reflection_on_both_sides_of_the_streaming_block(extra):
    """Column moments and the Householder reflection stream over the same row blocks: against
    numpy's moments over all rows and the explicit reflection matrix."""
    d = 256
    n = block_rows(d) + extra
    rng = np.random.default_rng(n)
    X = rng.gamma(2.0, size=(n, d)) + np.linspace(0.0, 5.0, n)[:, None]  # later blocks differ from the first
    mean, m2, m3, m4 = column_moments(X)
    c = X - X.mean(axis=0)
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-13)
    for k, got in ((2, m2), (3, m3), (4, m4)):
        np.testing.assert_allclose(got, (c**k).mean(axis=0), rtol=1e-10, err_msg=f"m{k}")
    beta = rng.normal(size=d)
    np.testing.assert_allclose(householder_apply(X, beta), X @ householder_matrix(beta), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- KS bins

@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 20000])
def test_ks_statistic_at_the_edges_of_its_bins(n):
    """The KS statistic counts values into a grid of bins and evaluates Phi only in the bins that can
    hold the maximum: scipy's statistic to the bit for values exactly on bin edges (centred and
    scaled, and not), beyond the grid on both sides, ties, and a crowded bin (a column whose spread
    is one outlier: every other value in one bin, sorted by quicksort)."""
    rng = np.random.default_rng(n)
    h, _ = ks_grid(n)
    rows = [rng.standard_normal(n), rng.standard_t(3, n),
            -KS_ZLIM + h * rng.integers(0, int(round(2 * KS_ZLIM / h)) + 1, n),  # on the edges
            np.where(rng.random(n) < 0.5, -1, 1) * (KS_ZLIM + rng.exponential(size=n)),  # beyond the grid
            np.round(rng.standard_normal(n), 1)]  # ties
    if n > 1:
        rows.append(np.r_[rng.standard_normal(n - 1) * 1e-9, 1e3])  # all but one in one bin
    # exact normal quantiles with the top 10 values moved far out: the largest gap is at the top
    rows.append(np.concatenate([stats.norm.ppf((np.arange(n) + 0.5) / n)[: max(n - 10, 0)], 9.0 + np.arange(min(n, 10.0))]))
    Z = np.vstack(rows)
    np.testing.assert_array_equal(ks_statistic(Z), [stats.ks_1samp(z, stats.norm.cdf).statistic for z in Z])
    center, sd = np.full(len(rows), 0.25), np.full(len(rows), 0.5)
    X = Z * 0.5 + 0.25  # standardised: the values back on the edges, up to rounding
    np.testing.assert_array_equal(ks_statistic(X, center, sd),
                                  [stats.ks_1samp((x - 0.25) / 0.5, stats.norm.cdf).statistic for x in X])


# --------------------------------------------------------------------------- attention tiles and blocks

def softmax_rows(q: TokenArrays, k: TokenArrays) -> dict[str, np.ndarray]:
    """Per-query causal softmax of one example written out with numpy: entropy, max, population std."""
    out = {"entropy": [], "max_attn": [], "row_std": []}
    for i in range(q.n):
        keys = k.position <= q.position[i]
        x = k.vectors[keys] @ q.vectors[i] / math.sqrt(q.d)
        w = np.exp(x - x.max())
        w /= w.sum()
        out["entropy"].append(float(-(w * np.log(w)).sum()))
        out["max_attn"].append(float(w.max()))
        out["row_std"].append(float(w.std()))
    return {c: np.array(v) for c, v in out.items()}


@pytest.mark.parametrize("n", [TILE - 1, TILE, TILE + 1, BLOCK_ROWS, BLOCK_ROWS + 1])
def test_attention_rows_on_both_sides_of_tiles_and_blocks(n):
    """Query rows of one example, the count on each side of a score tile and of a kernel block:
    every row equals a softmax written out per query, and forcing other block sizes (one row,
    a tile, a tile and one) leaves every bit as it was."""
    rng = np.random.default_rng(n)
    pos = np.arange(n, dtype=np.float64)
    zeros = np.zeros(n, np.int64)
    q = TokenArrays(zeros, zeros, pos, rng.normal(size=(n, 8)) * 1.5)
    k = TokenArrays(zeros, zeros, pos, rng.normal(size=(n, 8)))
    got = token_attention_metrics(q, k)
    want = softmax_rows(q, k)
    for col in ("max_attn", "row_std"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-12, err_msg=col)
    ent = got["entropy"][2:]  # the token table leaves positions 0 and 1 out
    np.testing.assert_allclose(ent, want["entropy"][2:], rtol=1e-11)
    for forced in (1, TILE, TILE + 1):
        again = token_attention_metrics(q, k, block_rows=forced)
        for col in ("entropy", "max_attn", "row_std", "k_eff"):
            np.testing.assert_array_equal(again[col], got[col], err_msg=f"{col} with blocks of {forced}")


@pytest.mark.parametrize("n_keys, block", [(BLOCK_BUDGET // BLOCK_ROWS - 2 * TILE, BLOCK_ROWS),
                                           (BLOCK_BUDGET // BLOCK_ROWS + TILE, TILE)])
def test_attention_rows_seeing_more_keys_than_a_full_block_allows(n_keys, block):
    """Rows that see many keys get smaller blocks (a block holds at most BLOCK_BUDGET scores): the
    last 130 queries of an example with n_keys keys, on either side of that switch, equal a softmax
    written out per query, and full blocks forced on them change no bit."""
    assert block_rows_for(n_keys + TILE, None) == block  # precondition: each side of the switch
    rng = np.random.default_rng(n_keys)
    pos = np.arange(n_keys, dtype=np.float64)
    zeros = np.zeros(n_keys, np.int64)
    k = TokenArrays(zeros, zeros, pos, rng.normal(size=(n_keys, 8)))
    qpos = pos[-130:]
    q = TokenArrays(zeros[:130], zeros[:130], qpos, rng.normal(size=(130, 8)) * 1.5)
    got = token_attention_metrics(q, k)
    want = softmax_rows(q, k)
    for col in ("entropy", "max_attn", "row_std"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-11, err_msg=col)
    forced = token_attention_metrics(q, k, block_rows=BLOCK_ROWS)
    for col in ("entropy", "max_attn", "row_std", "k_eff"):
        np.testing.assert_array_equal(forced[col], got[col], err_msg=col)


# --------------------------------------------------------------------------- 64k-row batches of the key sums

@pytest.mark.parametrize("n", [STREAM_BATCH_ROWS, STREAM_BATCH_ROWS + 1])
def test_key_sums_of_a_capped_shard_on_both_sides_of_a_read_batch(tmp_path, n):
    """A capped key shard is summed per bucket batch by batch while it is read; the sums over all
    rows equal numpy's sums over the file read with pyarrow, including a last batch of one row
    (made large, so that leaving it out would show)."""
    rng = np.random.default_rng(n)
    position = np.arange(n) % 4096
    example = np.arange(n) // 4096
    vectors = rng.normal(size=(n, 3)).astype(np.float32)
    vectors[-1] = 1000.0
    rows = TokenArrays((position // 512).astype(np.int64), example.astype(np.int64), position.astype(np.float64), vectors)
    path = write_shard(tmp_path, 0, 0, "k", rows)
    info = profile_shard(ShardInfo(0, 0, "k", str(path)))
    loaded, (buckets, sums, counts) = load_rows(None, info, 1000, seed=0, key_sums=True)
    assert loaded.n == 1000
    table = pq.read_table(path)
    b = table.column("bucket").to_numpy()
    v = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float64)
    want_buckets = np.unique(b)
    np.testing.assert_array_equal(buckets, want_buckets)
    np.testing.assert_array_equal(counts, [(b == x).sum() for x in want_buckets])
    np.testing.assert_allclose(sums, [v[b == x].sum(axis=0) for x in want_buckets], rtol=1e-12)


# --------------------------------------------------------------------------- batches of committed heads

@pytest.mark.parametrize("every, seen", [
    (4, [0, 0, 0, 0, 4, 4, 4, 4]),  # a batch of exactly the threshold is committed at once
    (5, [0, 0, 0, 0, 0, 0, 6, 6]),  # one head short of it waits for the next group (groups of 2)
])
def test_heads_are_committed_in_batches_of_the_threshold(small_dataset, tmp_path, monkeypatch, every, seen):
    """Each finished head reports before its batch is written: reading the warehouse at each report
    shows how many heads were committed, on both sides of the batch threshold; the run then holds
    every head once."""
    from warehouse.run import pipeline

    monkeypatch.setattr(pipeline, "FLUSH_EVERY_HEADS", every)
    monkeypatch.setattr(pipeline, "FLUSH_EVERY_SECONDS", 1e9)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             "model": "m"})
    committed = []

    def count(_outcome):
        with db.reader(cfg.warehouse) as con:
            committed.append(con.execute("SELECT count(*) FROM head_metrics").fetchone()[0])

    summary = analyze_dataset(cfg, small_dataset, progress=False, on_outcome=count)
    assert summary.n_done == 8
    assert committed == seen
    with db.reader(cfg.warehouse) as con:
        assert con.execute("SELECT count(*), count(DISTINCT (layer, q_head)) FROM head_metrics").fetchone() == (8, 8)


# --------------------------------------------------------------------------- the jackknife's streaming blocks

JK_SPEC = SyntheticSpec(num_layers=1, num_q_heads=2, num_k_heads=1, head_dim=64, num_examples=16, seq_len=512,
                        bucket_size=128, sliding_windows={}, noise_scales=(0.3,), seed=11)


@pytest.mark.parametrize("estimator", ["bucket_full_cov", "linear_diag"])
def test_jackknife_of_a_head_of_many_blocks_equals_the_unblocked_linearisation(estimator):
    """`ap_overall_se`, every replicate of ap_overall and of each bucket's AP on a head of 8 streaming
    blocks whose buckets span 2 blocks each, against the same linearised jackknife computed from all
    rows at once (`jackknife_reference.linearised_shifts`: lstsq and numpy.cov per replicate). The
    pair side (cells, gradients) is the pipeline's own; the query side is what is streamed."""
    params = AnalysisParams(estimator=estimator, normality_max_dims=0)
    q, k = make_query_shard(JK_SPEC, 0, 1), make_key_shard(JK_SPEC, 0, 0)
    s = orientation_from_keys(k.bucket, k.vectors)
    result = analyze_head(q, k, s, layer=0, q_head=1, params=params)
    # the head's own path up to the jackknife (plasticity.head.analyze_head), to see its replicates
    oq, ok = canonical_order(q), canonical_order(k)
    q_bucket, p = q.bucket[oq].astype(np.int64), q.position[oq].astype(np.float64)
    Xq = oriented_rows(q.vectors, oq, s)
    design = PositionDesign.build(p)
    fit = fit_rows(design, Xq, exact_residuals=False)
    buckets = QueryBuckets.build(q_bucket, p)
    full = estimator == "bucket_full_cov"
    rq = rotated_query_pass(Xq, design, fit, q_bucket, buckets, np.zeros(0, np.int64), bucket_cov=full)
    fr = rq.fit_rot
    model = (full_cov_model(buckets, rq.mu, rq.Sigma, fr.alpha, fr.beta, fr.resid_var, positions=p) if full
             else linear_diag_model(buckets, fr.alpha, fr.beta, fr.resid_var, positions=p))
    kindex = KeyPairIndex.build(k.bucket[ok], k.example_id[ok], k.position[ok].astype(np.float64))
    q_example = q.example_id[oq].astype(np.int64)
    groups = example_groups(q_example, k.example_id[ok])
    Kv = k.vectors[ok].astype(np.float64)
    table = plasticity_cells(model, kindex, lambda i1, i2: Kv[i1] - Kv[i2], sliding_window=None,
                             num_pairs_per_bucket=params.num_pairs_per_bucket,
                             rng=np.random.default_rng(pair_rng_seed(params.seed, 0, 1)),
                             basis=KeyBasis(s=s, w=rq.w), key_group=groups.k_group, n_groups=groups.n_groups)
    jk = example_jackknife(table, buckets, Xq, design, q_bucket, q_example, groups, fit, fit_rot=fr, x0=rq.x0,
                           w=rq.w, mu=rq.mu, Sigma=rq.Sigma)
    assert jk.ap_se == result.metrics["ap_overall_se"]  # the same path as the head's, to the bit
    # preconditions: many blocks, buckets longer than one block, runs (bucket, example) inside blocks
    step = block_rows(JK_SPEC.head_dim)
    assert Xq.shape[0] >= 8 * step and buckets.n.min() >= 2 * step and groups.n_groups == 16
    runs = RowRuns.build(q_bucket, q_example, groups.q_group)
    assert len(list(runs.blocks(step))) >= 8 and (runs.stop - runs.start).max() < step

    shifts = linearised_shifts(Xq, p, groups.q_group, buckets, table.influence, estimator)
    assert np.isfinite(shifts).all() and np.abs(shifts).max() > 1e-4  # the query side moves the replicates
    member = np.equal.outer(np.searchsorted(buckets.start, np.arange(p.shape[0]), side="right") - 1,
                            np.arange(buckets.bucket.shape[0]))[..., None] & (groups.q_group[:, None, None] == np.arange(16))
    stats = BucketGroupStats(n=member.sum(axis=0).astype(np.float64),
                             sp=np.einsum("i,ijg->jg", p - p.mean(), member))  # by group: counts, sums of p - mean(p)
    ref = combine_replicates(table, buckets, stats, shifts, groups.n_examples)
    np.testing.assert_allclose(jk.ap_replicates, ref.ap_replicates, rtol=1e-12, atol=0)
    np.testing.assert_allclose(jk.bucket_replicates, ref.bucket_replicates, rtol=1e-12, atol=0)
    assert jk.ap_se == pytest.approx(ref.ap_se, rel=1e-12)
    np.testing.assert_allclose(jk.bucket_se, ref.bucket_se, rtol=1e-12)
    np.testing.assert_array_equal(result.bucket_summary_rows["ap_se"], jk.bucket_se)
