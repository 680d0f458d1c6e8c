"""`load_rows` returns a shard's rows (all of them, or the subsample) in canonical order,
whatever the order of the file."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_bad_input import rewrite, set_column, shard
from warehouse.sources.catalog import ShardInfo
from warehouse.sources.shard_profile import profile_shard
from warehouse.run.loading import load_rows


def shuffled(table):
    return table.take(np.random.default_rng(1).permutation(table.num_rows))


def fractional(table):  # float positions: the canonical sort can no longer pack integer keys
    pos = table.column("position").to_numpy().astype(np.float64) + 0.5
    return set_column(table, "position", pa.array(pos, pa.float64()))


def expected_rows(path, cap, seed):
    """The rows the subsample keeps, straight from the file with DuckDB, in canonical order."""
    con = duckdb.connect()
    try:
        rel = con.execute(
            "SELECT bucket, example_id, position, vector FROM ("
            "  SELECT * FROM read_parquet($path)"
            "  ORDER BY hash($seed::BIGINT, example_id::BIGINT, position::DOUBLE), example_id, position LIMIT $cap)"
            " ORDER BY bucket, example_id, position",
            {"path": str(path), "seed": seed, "cap": cap},
        ).fetchnumpy()
    finally:
        con.close()
    return rel


@pytest.mark.parametrize("layout", ["as_written", "shuffled", "shuffled_fractional"])
@pytest.mark.parametrize("cap_fraction", [1.0, 0.6])
def test_load_rows_gives_the_chosen_rows_in_canonical_order(small_copy, layout, cap_fraction):
    path = shard(small_copy, 1, 2, "q")
    if layout != "as_written":
        rewrite(path, shuffled if layout == "shuffled" else (lambda t: shuffled(fractional(t))))
    n = pq.ParquetFile(path).metadata.num_rows
    cap = n if cap_fraction == 1.0 else int(n * cap_fraction)
    info = profile_shard(ShardInfo(1, 2, "q", str(path)))
    if layout == "shuffled_fractional":  # a run refuses such a shard; the loader's general sort is still tested
        assert info.error.problem == "fractional_positions"
        info.error = None
    rows = load_rows(None, info, cap, seed=7)
    ref = expected_rows(path, cap, 7)
    assert rows.n == cap
    np.testing.assert_array_equal(rows.bucket, ref["bucket"])
    np.testing.assert_array_equal(rows.example_id, ref["example_id"])
    np.testing.assert_array_equal(rows.position, ref["position"])
    np.testing.assert_array_equal(rows.vectors, np.stack(ref["vector"]))
    key = np.lexsort((rows.position, rows.example_id, rows.bucket))
    np.testing.assert_array_equal(key, np.arange(cap))  # canonical order
