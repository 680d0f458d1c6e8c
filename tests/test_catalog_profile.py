"""The numpy shard profile (`profile_shard`) equals its SQL definition (`profile_shard_sql`:
sql/shard_profile.sql + sql/shard_buckets.sql) on good, reordered and damaged shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from test_bad_input import CASES, as_plain_list, rewrite, set_column, shard
from warehouse.store import db
from warehouse.sources.card import BucketScheme, find_card, read_card
from warehouse.sources.catalog import ShardInfo, find_shards
from warehouse.sources.shard_profile import bucket_mismatches, profile_shard, profile_shard_sql


def with_nulls(table, column, rows):
    values = table.column(column).to_pylist()
    for i in rows:
        values[i] = None
    return set_column(table, column, pa.array(values, table.schema.field(column).type))


def shuffled(table):
    return table.take(np.random.default_rng(0).permutation(table.num_rows))


def fractional_positions(table):
    pos = table.column("position").to_numpy().astype(np.float64) + 0.25
    return set_column(table, "position", pa.array(pos, pa.float64()))


EXTRA = [
    ("shuffled_rows", lambda p: rewrite(p, shuffled)),
    ("fractional_positions", lambda p: rewrite(p, lambda t: shuffled(fractional_positions(t)))),
    ("plain_list_vectors", lambda p: rewrite(p, as_plain_list)),
    ("no_window_column", lambda p: rewrite(p, lambda t: t.drop_columns(["sliding_window"]))),
    ("all_null_window", lambda p: rewrite(p, lambda t: set_column(t, "sliding_window", pa.nulls(t.num_rows, pa.int32())))),
    ("some_null_window", lambda p: rewrite(p, lambda t: with_nulls(t, "sliding_window", [2, 7]))),
    ("null_example_id", lambda p: rewrite(p, lambda t: with_nulls(t, "example_id", [3, 9]))),
    ("null_bucket", lambda p: rewrite(p, lambda t: with_nulls(t, "bucket", [0]))),
    ("nan_position", lambda p: rewrite(p, lambda t: set_column(t, "position", pc.if_else(
        pa.array(np.arange(t.num_rows) == 5), pa.scalar(float("nan")), pc.cast(t.column("position"), pa.float64()))))),
    ("duplicates_unsorted", lambda p: rewrite(p, lambda t: shuffled(pa.concat_tables([t, t.slice(3, 4)])))),
    ("int64_keys", lambda p: rewrite(p, lambda t: set_column(set_column(t, "bucket", pc.cast(t.column("bucket"), pa.int64())),
                                                             "example_id", pc.cast(t.column("example_id"), pa.int64())))),
]


def describe(info: ShardInfo, with_message: bool) -> dict:
    err = None
    if info.error is not None:
        err = (info.error.problem, info.error.message if with_message else None)
    return {
        "n_rows": info.n_rows, "dim": info.dim, "sliding_window": info.sliding_window,
        "n_examples": info.n_examples, "has_token_str": info.has_token_str,
        "buckets": info.buckets, "error": err,
    }


@pytest.mark.parametrize("name,damage", [(c[0], c[2]) for c in CASES if c[0] != "missing_key_shard"] + EXTRA,
                         ids=[c[0] for c in CASES if c[0] != "missing_key_shard"] + [e[0] for e in EXTRA])
def test_numpy_profile_equals_sql_profile(name, damage, small_copy):
    target = next((c[1] for c in CASES if c[0] == name), (1, 0, "q"))  # layer 1 has a sliding window
    damage(shard(small_copy, *target))
    scheme = read_card(find_card(small_copy)).scheme  # uniform buckets of 32 (None when a case removed the card)
    con = db.memory_connection()
    try:
        for info in find_shards(small_copy):
            fast = profile_shard(ShardInfo(info.layer, info.head, info.kind, info.path), scheme)
            ref = profile_shard_sql(con, ShardInfo(info.layer, info.head, info.kind, info.path), scheme)
            unreadable = ref.error is not None and ref.error.problem == "unreadable"
            assert describe(fast, not unreadable) == describe(ref, not unreadable), (name, info.path)
    finally:
        con.close()


def exact_bucket(position: np.ndarray, scheme: BucketScheme) -> np.ndarray:
    """The bucket qk-sniffer means, in integer arithmetic: floor(p / size), or max(bit_length(p + 1) - 1, F)."""
    p = position.astype(np.int64)
    if scheme.kind == "uniform":
        return p // scheme.size
    return np.maximum(np.array([int(x + 1).bit_length() - 1 for x in p]), scheme.log_floor)


@pytest.mark.parametrize("scheme", [BucketScheme("uniform", 64), BucketScheme("uniform", 7), BucketScheme("log", 128),
                                    BucketScheme("log", 1), BucketScheme("log", 100)])
def test_bucket_check_is_exact_below_2_pow_20_and_equal_to_sql(scheme, tmp_path):
    rng = np.random.default_rng(5)
    edges = np.array([0, 1, 2, 63, 64, 65, 126, 127, 128, 255, 256, 1023, 1024, 2**20 - 2, 2**20 - 1])
    pos = np.unique(np.r_[edges, rng.integers(0, 2**20, 3000)])
    truth = exact_bucket(pos, scheme)
    for shift in (0, -1, 1):
        bucket = truth + shift
        for stored in (np.int32, np.int64, np.float64):  # the integer shortcut and the float expression
            bad = bucket_mismatches(bucket, pos.astype(stored), scheme)
            assert bad.tolist() == (bucket != truth).tolist(), (shift, stored)
    # beyond 2**20 an edge may move by float32 rounding (qk-sniffer's arithmetic): a neighbour bucket at a
    # position within float32 rounding of its edge is accepted, anything further is not
    if scheme.kind == "uniform":
        far = np.array([(2**24 // scheme.size + 3) * scheme.size, (2**26 // scheme.size + 5) * scheme.size], dtype=np.float64)
        assert not bucket_mismatches(exact_bucket(far, scheme), far, scheme).any()
        assert not bucket_mismatches(exact_bucket(far, scheme) - 1, far, scheme).any()  # at an edge: rounding
        beyond = (far * 2.0**-22 // scheme.size).astype(np.int64) + 2  # buckets further than the rounding reaches
        assert bucket_mismatches(exact_bucket(far, scheme) - beyond, far, scheme).all()
    else:
        near = np.array([2.0**24 - 2])  # log2(2**24 - 1) rounds to 24 in float32
        assert not bucket_mismatches(np.array([24]), near, scheme).any()
        assert not bucket_mismatches(np.array([23]), near, scheme).any()
        assert bucket_mismatches(np.array([24]), np.array([2.0**23 + 10]), scheme).all()
    # the SQL profile counts exactly the same rows
    shuffled_truth = truth.copy()
    shuffled_truth[::7] += 1
    shuffled_truth[3::7] = np.maximum(shuffled_truth[3::7] - 1, 0)  # one bucket low: the upper edges
    path = tmp_path / "l00h00q" / "data.parquet"
    path.parent.mkdir()
    n = pos.shape[0]
    pq.write_table(pa.table({
        "bucket": pa.array(shuffled_truth, pa.int32()), "example_id": pa.array(np.zeros(n), pa.int32()),
        "position": pa.array(pos, pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 2), pa.float32()), 2),
    }), path)
    fast = profile_shard(ShardInfo(0, 0, "q", str(path)), scheme)
    con = db.memory_connection()
    try:
        ref = profile_shard_sql(con, ShardInfo(0, 0, "q", str(path)), scheme)
    finally:
        con.close()
    assert fast.error is not None and fast.error.problem == "bucket_position_mismatch"
    assert describe(fast, True) == describe(ref, True)
    expected = int(np.count_nonzero(shuffled_truth != truth))
    assert fast.error.message.startswith(f"{expected} row(s)")
