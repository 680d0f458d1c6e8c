"""The numpy shard profile (`profile_shard`) equals its SQL definition (`profile_shard_sql`:
sql/shard_profile.sql + sql/shard_buckets.sql) on good, reordered and damaged shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from test_bad_input import CASES, as_plain_list, rewrite, set_column, shard
from warehouse import db
from warehouse.catalog import ShardInfo, find_shards, profile_shard, profile_shard_sql


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
    con = db.memory_connection()
    try:
        for info in find_shards(small_copy):
            fast = profile_shard(ShardInfo(info.layer, info.head, info.kind, info.path))
            ref = profile_shard_sql(con, ShardInfo(info.layer, info.head, info.kind, info.path))
            unreadable = ref.error is not None and ref.error.problem == "unreadable"
            assert describe(fast, not unreadable) == describe(ref, not unreadable), (name, info.path)
    finally:
        con.close()
