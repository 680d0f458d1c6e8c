"""Load one head's rows from its shards as numpy arrays (via DuckDB/Arrow).

Compute steps use their own in-memory DuckDB connection (`db.memory_connection`);
they never open the warehouse file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import sql
from plasticity.orientation import bucket_sums, merge_bucket_sums
from plasticity.types import TokenArrays
from warehouse.catalog import ShardError, ShardInfo

STREAM_BATCH_ROWS = 65536


def vectors_from_arrow(column: pa.ChunkedArray | pa.Array, path: str, expected_dim: int | None) -> np.ndarray:
    """(n, d) float64 from a list/fixed_size_list column; raises ShardError on ragged or non-finite data."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if arr.null_count:
        raise ShardError(path, "null_values", f"{arr.null_count} row(s) have a null vector")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        flat = arr.flatten()
    else:
        offsets = arr.offsets.to_numpy()
        lengths = np.diff(offsets)
        if n and lengths.min() != lengths.max():
            raise ShardError(
                path, "ragged_vectors",
                f"vector widths differ between rows (from {lengths.min()} to {lengths.max()})",
            )
        d = int(lengths[0]) if n else (expected_dim or 0)
        flat = arr.flatten()
    if expected_dim is not None and d != expected_dim:
        raise ShardError(path, "ragged_vectors", f"vector width {d} differs from the schema's {expected_dim}")
    if d == 0:
        raise ShardError(path, "wrong_type", "vectors have width 0")
    if flat.null_count:
        raise ShardError(path, "null_values", f"{flat.null_count} vector element(s) are null")
    values = flat.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values.reshape(n, d))).any(axis=1).sum())
        raise ShardError(path, "nonfinite_values", f"{bad} vector(s) contain NaN or Inf")
    return values.reshape(n, d)


def load_rows(con, info: ShardInfo, cap: int, seed: int, with_tokens: bool = False) -> TokenArrays:
    """At most `cap` rows of a shard (SPEC 2.1), canonical order (bucket, example_id, position)."""
    if info.error is not None:
        raise info.error
    extra = ", t.token_str" if (with_tokens and info.has_token_str) else ""
    if info.n_rows is not None and info.n_rows <= cap:
        query = sql.load("all_rows").format(extra_columns=extra.replace("t.", ""))
        params = {"path": info.path}
    else:
        query = sql.load("sample_rows").format(extra_columns=extra)
        params = {"path": info.path, "seed": int(seed), "cap": int(cap)}
    try:
        table = con.sql(query, params=params).to_arrow_table()
    except Exception as exc:
        raise ShardError(info.path, "unreadable", f"cannot read rows ({type(exc).__name__}: {exc})") from None
    vectors = vectors_from_arrow(table.column("vector"), info.path, info.dim)
    tokens = table.column("token_str").to_numpy(zero_copy_only=False) if extra else None
    return TokenArrays(
        bucket=table.column("bucket").to_numpy().astype(np.int64),
        example_id=table.column("example_id").to_numpy().astype(np.int64),
        position=table.column("position").to_numpy().astype(np.float64),
        vectors=vectors,
        sliding_window=info.sliding_window,
        token_str=tokens,
    )


def key_bucket_sums(info: ShardInfo, loaded: TokenArrays | None = None):
    """Per-bucket vector sums and counts over ALL rows of a key shard (SPEC 2.2).

    When `loaded` already holds every row (the shard fits the cap) it is reused;
    otherwise the file is streamed in batches in file order, so memory stays
    bounded by one batch and the sums do not depend on thread count.
    """
    if loaded is not None and info.n_rows is not None and loaded.n == info.n_rows:
        return bucket_sums(loaded.bucket, loaded.vectors)
    parts = []
    try:
        pf = pq.ParquetFile(info.path)
        for batch in pf.iter_batches(batch_size=STREAM_BATCH_ROWS, columns=["bucket", "vector"]):
            vec = vectors_from_arrow(batch.column("vector"), info.path, info.dim)
            parts.append(bucket_sums(batch.column("bucket").to_numpy().astype(np.int64), vec))
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(info.path, "unreadable", f"cannot stream rows ({type(exc).__name__}: {exc})") from None
    return merge_bucket_sums(parts)
