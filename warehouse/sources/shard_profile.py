"""Profile of one shard and the checks of its values: row counts, the sliding window, the observed
position range of every bucket, integer ranges, and buckets that disagree with positions under the
dataset card's bucket scheme. Read with pyarrow (`profile_shard`) or DuckDB (`profile_shard_sql`, the
same numbers from `sql/shard_profile.sql`); a problem is a `ShardError` naming the file.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import sql
from warehouse.sources.card import BucketScheme
from warehouse.sources.catalog import (INT32_MAX, INT32_MIN, MAX_POSITION, MIN_QUERY_ROWS, BucketRange, ShardError,
                                       ShardInfo, check_schema, to_numpy)

#: Bucket-position check (docs/method.md#inputs): exact below this position. qk-sniffer computes buckets in float32
#: (``floor(p / size)``, ``floor(log2(p + 1))``), so at larger positions a bucket edge may move: by a relative
#: 2^-23 for the uniform quotient, by up to an ulp of the float32 logarithm (2^-18 of it below 2^32) for log.
#: The slack allows twice that, and nothing below `BUCKET_EXACT_BELOW`.
BUCKET_EXACT_BELOW = 2.0 ** 20
BUCKET_EDGE_SLACK = {"uniform": 2.0 ** -22, "log": 2.0 ** -18}


def bucket_mismatches(bucket: np.ndarray, position: np.ndarray, scheme: BucketScheme) -> np.ndarray:
    """Rows whose bucket disagrees with their position under `scheme` (a bool mask).

    With ``t = position * BUCKET_EDGE_SLACK[kind]`` for positions >= ``BUCKET_EXACT_BELOW``, else 0:
    uniform (size ``s``): ok when ``b s <= p + t`` and ``p - t < (b + 1) s``, i.e. ``b = floor(p / s)``;
    log (floor ``F``, ``q = p + 1``): ok when ``b >= F``, (``b = F`` or ``2^b <= q + t``) and ``q - t < 2^(b+1)``,
    i.e. ``b = max(floor(log2(p + 1)), F)``. The same expression as sql/shard_profile.sql, operation for
    operation. Integer positions in ``[0, BUCKET_EXACT_BELOW)`` (the usual case) take an integer shortcut
    with the same answers (``t = 0`` there and every quantity is exact): ``b != p // s`` or
    ``b != max(e - 1, F)`` with ``e`` the binary exponent of ``p + 1`` (``frexp``), 100x cheaper.
    """
    if position.dtype.kind in "iu" and position.size and position.min() >= 0 and position.max() < BUCKET_EXACT_BELOW:
        if scheme.kind == "uniform":
            expected = position.astype(np.int64) // scheme.size
        else:
            expected = np.maximum(np.frexp(position + 1.0)[1] - 1, scheme.log_floor)
        return bucket != expected
    b = bucket.astype(np.float64)
    p = position.astype(np.float64)
    t = np.where(p >= BUCKET_EXACT_BELOW, p * BUCKET_EDGE_SLACK[scheme.kind], 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        if scheme.kind == "uniform":
            size = float(scheme.size)
            ok = (b * size <= p + t) & (p - t < (b + 1.0) * size)
        else:
            floor = float(scheme.log_floor)
            q = p + 1.0
            ok = (b >= floor) & ((b == floor) | (np.power(2.0, b) <= q + t)) & (q - t < np.power(2.0, b + 1.0))
    return ~ok


def scheme_parameters(scheme: BucketScheme | None) -> dict:
    """The parameters sql/shard_profile.sql takes for a bucket scheme (None: no scheme check)."""
    return {
        "scheme": None if scheme is None else scheme.kind,
        "bucket_size": 0.0 if scheme is None else float(scheme.size),
        "log_floor": 0.0 if scheme is None or scheme.kind != "log" else float(scheme.log_floor),
        "exact_below": BUCKET_EXACT_BELOW, "edge_slack": 0.0 if scheme is None else BUCKET_EDGE_SLACK[scheme.kind],
    }


def _out_of_int32(prof: dict, column: str) -> int | None:
    lo, hi = prof[f"min_{column}"], prof[f"max_{column}"]
    if lo is not None and int(lo) < INT32_MIN:
        return int(lo)
    if hi is not None and int(hi) > INT32_MAX:
        return int(hi)
    return None


def _check_profile(path: str, prof: dict, ranges: list[BucketRange], kind: str,
                   scheme: BucketScheme | None) -> None:
    """Raise the first problem a shard profile shows (the order is part of the contract)."""
    if prof["n_rows"] == 0:
        raise ShardError(path, "empty", "shard has no rows")
    if prof["n_null_keys"]:
        raise ShardError(path, "null_values", f"{prof['n_null_keys']} row(s) have a null bucket, example_id or position")
    for column in ("bucket", "example_id"):
        bad = _out_of_int32(prof, column)
        if bad is not None:
            raise ShardError(path, "integer_out_of_range",
                             f"column {column} holds {bad}, outside the int32 range of the input format")
    if prof["n_nonfinite_positions"]:
        raise ShardError(path, "nonfinite_values", f"{prof['n_nonfinite_positions']} position(s) are NaN or infinite")
    if prof["n_negative_positions"]:
        raise ShardError(path, "negative_positions", f"{prof['n_negative_positions']} row(s) have a negative position (min {prof['min_position']:g})")
    if prof["n_fractional_positions"]:
        raise ShardError(path, "fractional_positions",
                         f"{prof['n_fractional_positions']} position(s) have a fractional part (e.g. "
                         f"{prof['first_fractional_position']:g}); token positions are whole numbers (a float column "
                         "is accepted only when it holds whole numbers)")
    if prof["max_position"] > MAX_POSITION:
        raise ShardError(path, "position_overflow",
                         f"position {prof['max_position']:g} is beyond {MAX_POSITION} (the input format's int32 positions); "
                         "the position regressions would not be exact")
    if prof["n_negative_buckets"]:
        raise ShardError(path, "negative_buckets",
                         f"{prof['n_negative_buckets']} row(s) have a negative bucket (min {prof['min_bucket']})")
    n_distinct_windows = int(prof["n_windows"]) + (1 if prof["n_null_windows"] else 0)
    if n_distinct_windows > 1:
        raise ShardError(path, "mixed_sliding_window", "sliding_window takes more than one value within the shard")
    window = prof["sliding_window"]
    if window is not None and not INT32_MIN <= int(window) <= INT32_MAX:
        raise ShardError(path, "integer_out_of_range",
                         f"column sliding_window holds {int(window)}, outside the int32 range of the input format")
    if window is not None and int(window) <= 0:
        raise ShardError(path, "invalid_sliding_window",
                         f"sliding_window is {int(window)}; a window must be a positive number of positions")
    if prof["n_duplicate_rows"]:
        raise ShardError(path, "duplicate_rows", f"{prof['n_duplicate_rows']} row(s) repeat an (example_id, position) already present")
    if scheme is not None and prof["n_bucket_mismatches"]:
        raise ShardError(path, "bucket_position_mismatch",
                         f"{prof['n_bucket_mismatches']} row(s) have a bucket that disagrees with their position under "
                         f"the dataset card's {scheme.describe()} (first at position {prof['first_mismatch_position']:g})")
    if scheme is None:
        for lower, upper in zip(ranges, ranges[1:]):
            if lower.max_position >= upper.min_position:
                raise ShardError(path, "bucket_position_mismatch",
                                 f"buckets do not increase with position: bucket {lower.bucket} holds position "
                                 f"{lower.max_position:g} but bucket {upper.bucket} starts at {upper.min_position:g}")
    if kind == "q" and prof["n_rows"] < MIN_QUERY_ROWS:
        raise ShardError(path, "too_few_rows",
                         f"query shard has {prof['n_rows']} row(s); the position regression needs at least "
                         f"{MIN_QUERY_ROWS} (through 2 points it fits exactly: R2 = 1 whatever the data)")


def open_parquet(source) -> pq.ParquetFile:
    """A ParquetFile that checks the CRC of every page whose writer stored one (Parquet's optional
    page checksums; pages without one are read as they are)."""
    return pq.ParquetFile(source, page_checksum_verification=True)


def read_failure(path: str, exc: BaseException, what: str) -> ShardError:
    """The ShardError for an exception raised while reading a shard: `corrupt_page` when a page's
    stored checksum does not match its bytes, else `unreadable`."""
    if "CRC checksum verification failed" in str(exc):
        return ShardError(path, "corrupt_page", f"a data page's bytes do not match its stored checksum, so its values "
                                                f"are not those written ({type(exc).__name__}: {exc})")
    return ShardError(path, "unreadable", f"{what} ({type(exc).__name__}: {exc})")


def _read_schema(path: str) -> tuple[pq.ParquetFile, pa.Schema]:
    try:
        pf = open_parquet(path)
        return pf, pf.schema_arrow
    except Exception as exc:  # truncated footer, not Parquet at all, permission...
        raise ShardError(path, "unreadable", f"cannot read Parquet file ({type(exc).__name__}: {exc})") from None


def table_profile(table: pa.Table, scheme: BucketScheme | None = None) -> tuple[dict, list[BucketRange]]:
    """The profile of `sql/shard_profile.sql` and the bucket ranges of `sql/shard_buckets.sql`,
    computed with numpy from the scalar columns (bucket, example_id, position[, sliding_window]);
    `scheme` is the dataset's bucket scheme (None: unknown, no bucket-position count).

    Equal to the SQL results (tests/test_catalog_profile.py); about 10x cheaper per shard, which
    matters when a model has thousands of shards. Only shards with null values need
    `pyarrow.compute` (whose import alone costs half a second in the process that profiles).
    """
    n = table.num_rows
    cols = {c: table.column(c) for c in ("bucket", "example_id", "position")}
    window = table.column("sliding_window") if "sliding_window" in table.column_names else None
    prof = {
        "n_rows": n, "n_examples": 0, "n_null_keys": 0,
        "n_duplicate_rows": 0, "n_negative_positions": 0, "n_nonfinite_positions": 0, "n_fractional_positions": 0,
        "first_fractional_position": None,
        "min_position": None, "max_position": None,
        "n_windows": 0, "n_null_windows": n if window is None else window.null_count, "sliding_window": None,
        "min_bucket": None, "max_bucket": None, "min_example_id": None, "max_example_id": None,
        "n_negative_buckets": 0, "n_bucket_mismatches": 0, "first_mismatch_position": None,
    }
    if window is not None and window.null_count == 0 and n:
        w = to_numpy(window)
        prof["n_windows"] = 1 if np.all(w == w[0]) else int(np.unique(w).shape[0])
        prof["sliding_window"] = int(w.min())
    elif window is not None and window.null_count < n:
        import pyarrow.compute as pc

        valid = window.drop_null()
        prof["n_windows"] = int(pc.count_distinct(valid).as_py())
        prof["sliding_window"] = pc.min(valid).as_py()
    if any(c.null_count for c in cols.values()):
        import pyarrow.compute as pc

        null_rows = None
        for c in cols.values():
            if c.null_count:
                m = pc.is_null(c)
                null_rows = m if null_rows is None else pc.or_(null_rows, m)
        prof["n_null_keys"] = int(pc.sum(null_rows).as_py() or 0)
        prof["n_examples"] = int(pc.count_distinct(cols["example_id"]).as_py())
        return prof, []
    if n == 0:
        return prof, []
    bucket = to_numpy(cols["bucket"])
    example = to_numpy(cols["example_id"])
    raw_pos = to_numpy(cols["position"])
    pos = raw_pos.astype(np.float64)
    prof["min_bucket"], prof["max_bucket"] = int(bucket.min()), int(bucket.max())
    prof["min_example_id"], prof["max_example_id"] = int(example.min()), int(example.max())
    prof["n_negative_buckets"] = int(np.count_nonzero(bucket < 0)) if prof["min_bucket"] < 0 else 0
    if scheme is not None:
        bad = bucket_mismatches(bucket, raw_pos, scheme)
        prof["n_bucket_mismatches"] = int(np.count_nonzero(bad))
        if prof["n_bucket_mismatches"]:
            prof["first_mismatch_position"] = float(pos[bad].min())
    prof["min_position"] = float(pos.min())
    prof["max_position"] = float(pos.max())
    finite = np.isfinite(pos)
    prof["n_nonfinite_positions"] = int(n - np.count_nonzero(finite))
    prof["n_negative_positions"] = int(np.count_nonzero(pos < 0))
    if raw_pos.dtype.kind == "f":  # integer columns are whole by type
        fractional = finite & (pos != np.floor(pos))
        prof["n_fractional_positions"] = int(np.count_nonzero(fractional))
        if prof["n_fractional_positions"]:
            prof["first_fractional_position"] = float(pos[fractional].min())
    # duplicates of (example_id, position) and distinct examples: sort (cheap when the file is
    # already in that order)
    ex = example.astype(np.int64)
    same_ex = ex[1:] == ex[:-1]
    if np.all((ex[1:] > ex[:-1]) | (same_ex & (pos[1:] > pos[:-1]))):
        n_dup = 0
        n_examples = n - int(np.count_nonzero(same_ex))
    else:
        order = np.lexsort((pos, ex))
        e_s, p_s = ex[order], pos[order]
        same_e_s = e_s[1:] == e_s[:-1]
        n_examples = n - int(np.count_nonzero(same_e_s))
        # positions with NaN are rejected before duplicates are looked at, so this only needs to
        # be right for finite values
        n_dup = int(np.count_nonzero(same_e_s & (p_s[1:] == p_s[:-1])))
    prof["n_examples"] = n_examples
    prof["n_duplicate_rows"] = n_dup
    # bucket ranges, ascending bucket
    b = bucket.astype(np.int64)
    if np.all(b[1:] >= b[:-1]):
        b_s, p_b = b, pos
    else:
        order = np.argsort(b, kind="stable")
        b_s, p_b = b[order], pos[order]
    starts = np.flatnonzero(np.r_[True, b_s[1:] != b_s[:-1]])
    counts = np.diff(np.r_[starts, n])
    lo = np.minimum.reduceat(p_b, starts)
    hi = np.maximum.reduceat(p_b, starts)
    mu = np.add.reduceat(p_b, starts) / counts
    ranges = [BucketRange(int(bb), int(c), float(l), float(h), float(m))
              for bb, c, l, h, m in zip(b_s[starts], counts, lo, hi, mu)]
    return prof, ranges


def profile_shard(info: ShardInfo, scheme: BucketScheme | None = None) -> ShardInfo:
    """Fill `info` from the file: schema checks, row counts, window, bucket ranges, the input value
    checks (`_check_profile`; buckets against `scheme`, the dataset's bucket scheme, when known).

    Reads only the footer and the scalar columns. Any problem, including an unexpected exception
    (`catalog_failed`), is stored in `info.error` (never raised) so the catalog lists every shard,
    good or bad. A shard that already has an error (a duplicate, a shard outside the layout) is left as is.
    """
    if info.error is not None:
        return info
    try:
        _profile_into(info, scheme)
    except ShardError as err:
        info.error = err
    except Exception as exc:  # a bug or a file nothing above anticipated: this shard fails, the catalog goes on
        info.error = ShardError(info.path, "catalog_failed",
                                f"unexpected error while cataloguing the shard ({type(exc).__name__}: {exc})")
    return info


def _profile_into(info: ShardInfo, scheme: BucketScheme | None) -> None:
    """`profile_shard` without the error handling (raises ShardError)."""
    path = info.path
    pf, schema = _read_schema(path)
    info.dim, has_window, info.has_token_str = check_schema(path, schema)
    columns = ["bucket", "example_id", "position"] + (["sliding_window"] if has_window else [])
    try:
        table = pf.read(columns=columns, use_threads=False)
    except Exception as exc:
        raise read_failure(path, exc, "cannot read Parquet data") from None
    try:
        prof, ranges = table_profile(table, scheme)
    except Exception as exc:  # a column pyarrow can read but not convert
        raise ShardError(path, "unreadable", f"cannot profile rows ({type(exc).__name__}: {exc})") from None
    info.n_rows = int(prof["n_rows"])
    info.n_examples = int(prof["n_examples"])
    _check_profile(path, prof, ranges, info.kind, scheme)
    info.sliding_window = None if prof["sliding_window"] is None else int(prof["sliding_window"])
    info.buckets = ranges


def profile_shard_sql(con: duckdb.DuckDBPyConnection, info: ShardInfo, scheme: BucketScheme | None = None) -> ShardInfo:
    """`profile_shard` done by DuckDB with sql/shard_profile.sql and sql/shard_buckets.sql.

    The readable definition of the profile; `profile_shard` computes the same with numpy
    and the tests hold the two equal.
    """
    path = info.path
    try:
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # truncated footer, not Parquet at all, permission...
            raise ShardError(path, "unreadable", f"cannot read Parquet file ({type(exc).__name__}: {exc})") from None
        info.dim, has_window, info.has_token_str = check_schema(path, schema)
        profile_sql = sql.load("shard_profile").format(
            sliding_window="sliding_window" if has_window else "NULL::INTEGER"
        )
        try:
            cur = con.execute(profile_sql, {"path": path, **scheme_parameters(scheme)})
            names = [d[0] for d in cur.description]
            prof = dict(zip(names, cur.fetchone()))
        except duckdb.Error as exc:
            raise ShardError(path, "unreadable", f"cannot read Parquet data ({exc})") from None
        info.n_rows = int(prof["n_rows"])
        info.n_examples = int(prof["n_examples"])
        ranges = []
        if not prof["n_null_keys"] and prof["n_rows"]:
            cur = con.execute(sql.load("shard_buckets"), {"path": path})
            ranges = [BucketRange(int(b), int(n), float(lo), float(hi), float(mu)) for b, n, lo, hi, mu in cur.fetchall()]
        _check_profile(path, prof, ranges, info.kind, scheme)
        info.sliding_window = None if prof["sliding_window"] is None else int(prof["sliding_window"])
        info.buckets = ranges
    except ShardError as err:
        info.error = err
    return info
