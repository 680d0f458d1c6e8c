"""Load one head's rows from its shards as numpy arrays.

A shard is read once, with `pyarrow.parquet` (the vector column dominates and
pyarrow decodes it fastest), straight into numpy. DuckDB is used only to rank
the rows of a shard larger than the cap (docs/method.md#sampling, `sql/sample_rows.sql`),
over the scalar columns already in memory; the connection is made once per
process (`rank_connection`). Compute steps never open the warehouse file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import sql
from plasticity.orientation import bucket_sums, merge_bucket_sums
from plasticity.types import TokenArrays, canonical_sort_order
from warehouse.sources.catalog import ShardError, ShardInfo, to_numpy
from warehouse.sources.shard_profile import open_parquet, read_failure
from warehouse.sources.revision import ChangedFile, verified_bytes

STREAM_BATCH_ROWS = 65536
ROW_COLUMNS = ("bucket", "example_id", "position", "vector")

_RANK_CON = None


def rank_connection():
    """This process's in-memory DuckDB connection for ranking rows (one thread: same order everywhere)."""
    global _RANK_CON
    if _RANK_CON is None:
        from warehouse.store import db

        _RANK_CON = db.memory_connection(1)
    return _RANK_CON


def vector_values(column: pa.ChunkedArray | pa.Array, path: str, expected_dim: int | None) -> np.ndarray:
    """(n, d) view of the stored values (float32 or float64, not copied when possible), validated:
    no null vectors or elements, one width for every row (equal to `expected_dim` when given), all finite."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if arr.null_count:
        raise ShardError(path, "null_values", f"{arr.null_count} row(s) have a null vector")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        offsets = to_numpy(arr.offsets)
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
    values = to_numpy(flat).reshape(n, d)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).any(axis=1).sum())
        raise ShardError(path, "nonfinite_values", f"{bad} vector(s) contain NaN or Inf")
    return values


def open_verified(info: ShardInfo) -> pq.ParquetFile:
    """The shard as a ParquetFile. When the run knows the shard's SHA-256 (`ShardInfo.sha256`), the
    file is read once into memory, hashed, and parsed from those same bytes: a file that changed
    since the run's revision was made is a `changed_during_run` error, never analysed. (A row count
    other than the profile's is the same error: the profile was made from other bytes.)"""
    if info.sha256 is None:
        return open_parquet(info.path)
    try:
        data = verified_bytes(info.path, info.sha256)
    except ChangedFile as exc:
        raise ShardError(info.path, "changed_during_run", str(exc)) from None
    pf = open_parquet(pa.BufferReader(data))
    if info.n_rows is not None and pf.metadata.num_rows != info.n_rows:
        raise ShardError(info.path, "changed_during_run",
                         f"it holds {pf.metadata.num_rows} rows where the run's profile of it counted {info.n_rows}")
    return pf


def read_shard(info: ShardInfo, columns: tuple[str, ...], batch_sums: bool = False):
    """The named columns of a whole shard as an Arrow table, plus, with `batch_sums`, the per-bucket
    vector sums of every 64k-row batch in file order (for the key orientation) and the
    validated vector values (n, d) in file order; otherwise (table, None, None)."""
    try:
        pf = open_verified(info)
        if not batch_sums:
            return pf.read(columns=list(columns), use_threads=False), None, None
        batches, parts, values = [], [], []
        for batch in pf.iter_batches(batch_size=STREAM_BATCH_ROWS, columns=list(columns), use_threads=False):
            vec = vector_values(batch.column("vector"), info.path, info.dim)
            parts.append(bucket_sums(to_numpy(batch.column("bucket")).astype(np.int64), vec))
            batches.append(batch)
            values.append(vec)
        if not batches:
            return pf.read(columns=list(columns), use_threads=False), None, None
        return pa.Table.from_batches(batches), parts, values[0] if len(values) == 1 else np.concatenate(values)
    except ShardError:
        raise
    except Exception as exc:
        raise read_failure(info.path, exc, "cannot read rows") from None


def is_canonical(bucket: np.ndarray, example_id: np.ndarray, position: np.ndarray) -> bool:
    """True when the rows are already sorted by (bucket, example_id, position)."""
    if bucket.shape[0] < 2:
        return True
    db, de = np.diff(bucket), np.diff(example_id)
    return bool(np.all((db > 0) | ((db == 0) & ((de > 0) | ((de == 0) & (position[1:] >= position[:-1]))))))


def sample_indices(example_id: np.ndarray, position: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Row numbers of the `cap` rows the subsample keeps (sql/sample_rows.sql), in no particular order.

    `example_id` and `position` are the shard's columns as stored (numpy, their Parquet types);
    DuckDB scans them in place (a dict of numpy arrays: no copy, and no pandas import).
    """
    con = rank_connection()
    keys = {"row_number": np.arange(example_id.shape[0], dtype=np.int64), "example_id": example_id, "position": position}
    con.register("shard_keys", keys)
    try:
        chosen = con.execute(sql.load("sample_rows"), {"seed": int(seed), "cap": int(cap)}).fetchnumpy()["row_number"]
    finally:
        con.unregister("shard_keys")
    return np.asarray(chosen, dtype=np.int64)


def load_rows(con, info: ShardInfo, cap: int, seed: int, with_tokens: bool = False,
              *, key_sums: bool = False):
    """At most `cap` rows of a shard (docs/method.md#sampling), canonical order (bucket, example_id, position).

    `con` is accepted for compatibility and unused (ranking uses `rank_connection`). With
    `key_sums`, returns (rows, (buckets, sums, counts)) where the sums are the orientation's per-bucket
    vector sums over ALL rows of the shard, read in the same pass.
    """
    if info.error is not None:
        raise info.error
    columns = ROW_COLUMNS + (("token_str",) if (with_tokens and info.has_token_str) else ())
    capped = info.n_rows is not None and info.n_rows > cap
    table, parts, values = read_shard(info, columns, batch_sums=key_sums and capped)
    n = table.num_rows
    if values is None:
        values = vector_values(table.column("vector"), info.path, info.dim)
    try:
        raw_example_id = to_numpy(table.column("example_id"))
        raw_position = to_numpy(table.column("position"))
        bucket = to_numpy(table.column("bucket")).astype(np.int64)
        example_id = raw_example_id.astype(np.int64)
        position = raw_position.astype(np.float64)
    except Exception as exc:  # nulls slipped past the catalog
        raise ShardError(info.path, "null_values", f"cannot read bucket/example_id/position ({exc})") from None
    if n > cap:
        try:
            rows = sample_indices(raw_example_id, raw_position, cap, seed)
        except Exception as exc:
            raise ShardError(info.path, "unreadable", f"cannot rank rows ({type(exc).__name__}: {exc})") from None
    else:
        rows = None
    # canonical order (bucket, example_id, position); (example_id, position) is unique in a shard,
    # so the order is total and a file already in that order needs no sort
    in_order = is_canonical(bucket, example_id, position)
    if rows is None:
        order = None if in_order else canonical_sort_order(bucket, example_id, position)
    elif in_order:
        order = np.sort(rows)
    else:
        order = rows[canonical_sort_order(bucket[rows], example_id[rows], position[rows])]
    tokens = None
    if "token_str" in columns:
        tokens = table.column("token_str").to_numpy(zero_copy_only=False)
    if order is not None:
        bucket, example_id, position = bucket[order], example_id[order], position[order]
        values = np.take(values, order, axis=0)  # gather the stored (float32) values
        tokens = None if tokens is None else tokens[order]
    loaded = TokenArrays(
        bucket=bucket,
        example_id=example_id,
        position=position,
        vectors=values,  # stored precision; the analysis widens to float64 as it reads
        sliding_window=info.sliding_window,
        token_str=tokens,
    )
    if not key_sums:
        return loaded
    if parts is None:  # every row loaded: sum them (in canonical order)
        return loaded, bucket_sums(loaded.bucket, loaded.vectors)
    return loaded, merge_bucket_sums(parts)
