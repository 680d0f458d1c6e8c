"""Catalog of sniffer shards: find them, validate their schema, profile them.

A shard is `l{LL}h{HH}{q|k}/data.parquet` under the dataset root (optionally
under `model_dir`). Validation problems become `ShardError`s that name the file
and the problem; the pipeline records them against the affected heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import sql

SHARD_RE = re.compile(r"^l(\d+)h(\d+)([qk])$")
REQUIRED_COLUMNS = ("bucket", "example_id", "position", "vector")


class ShardError(ValueError):
    """A shard that cannot be used. `problem` is a short category stored in head_errors."""

    def __init__(self, path: str | Path, problem: str, message: str):
        self.path = str(path)
        self.problem = problem
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):  # keep the fields when crossing a process boundary
        return (ShardError, (self.path, self.problem, self.message))


@dataclass
class BucketRange:
    bucket: int
    n_rows: int
    min_position: float
    max_position: float
    mean_position: float


@dataclass
class ShardInfo:
    layer: int
    head: int
    kind: str  # 'q' | 'k'
    path: str
    n_rows: int | None = None
    dim: int | None = None  # None for a plain list<float> column until read
    sliding_window: int | None = None
    n_examples: int | None = None
    has_token_str: bool = False
    buckets: list[BucketRange] = field(default_factory=list)
    error: ShardError | None = None

    @property
    def min_bucket(self) -> int | None:
        return self.buckets[0].bucket if self.buckets else None

    @property
    def max_bucket(self) -> int | None:
        return self.buckets[-1].bucket if self.buckets else None

    def row(self) -> dict:
        positions = [b.min_position for b in self.buckets] + [b.max_position for b in self.buckets]
        return {
            "layer": self.layer,
            "head": self.head,
            "kind": self.kind,
            "path": self.path,
            "n_rows": self.n_rows,
            "dim": self.dim,
            "sliding_window": self.sliding_window,
            "n_examples": self.n_examples,
            "n_buckets": len(self.buckets) if self.buckets else None,
            "min_bucket": self.min_bucket,
            "max_bucket": self.max_bucket,
            "min_position": min(positions) if positions else None,
            "max_position": max(positions) if positions else None,
            "has_token_str": self.has_token_str,
            "error": None if self.error is None else str(self.error),
        }


def catalog_columns(shards, model: str, revision: str | None) -> dict[str, list]:
    """The `shards` table's columns (sql/schema.sql) for these shards: model, revision, then
    the fields of `ShardInfo.row`, one list per column."""
    rows = [s.row() for s in shards]
    cols = {"model": [model] * len(rows), "revision": [revision] * len(rows)}
    for key in rows[0] if rows else ():
        cols[key] = [r[key] for r in rows]
    return cols


def bucket_columns(shards, model: str) -> dict[str, list]:
    """The `shard_buckets` table's columns: model, then layer, head, kind and the `BucketRange`
    fields, one row per bucket of every shard (built field by field: `dataclasses.asdict` deep-copies
    each value and took a third of the parent's catalog time on a 360-shard model)."""
    names = [f.name for f in fields(BucketRange)]
    cols: dict[str, list] = {key: [] for key in ("model", "layer", "head", "kind", *names)}
    for s in shards:
        m = len(s.buckets)
        cols["model"] += [model] * m
        cols["layer"] += [s.layer] * m
        cols["head"] += [s.head] * m
        cols["kind"] += [s.kind] * m
        for key in names:
            cols[key] += [getattr(b, key) for b in s.buckets]
    return cols


_NUMPY_TYPES = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64,
}


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric Arrow column without nulls as a (read-only, zero-copy when one chunk) numpy array.

    Same values as ``column.to_numpy()``, without the pandas import pyarrow's own conversion makes
    (half a second in every fresh worker process).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dtype = _NUMPY_TYPES.get(arr.type)
    if dtype is None or arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * itemsize)


def find_shards(root: str | Path, model_dir: str | None = None) -> list[ShardInfo]:
    """All `lXXhYY{q,k}/data.parquet` under root (or root/model_dir), sorted by (layer, kind, head)."""
    base = Path(root) / model_dir if model_dir else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder {base} does not exist")
    found = []
    for sub in base.iterdir():
        m = SHARD_RE.match(sub.name)
        if m and (sub / "data.parquet").is_file():
            found.append(ShardInfo(int(m[1]), int(m[2]), m[3], str(sub / "data.parquet")))
    if not found:
        raise FileNotFoundError(f"no lXXhYY{{q,k}}/data.parquet shards under {base}")
    return sorted(found, key=lambda s: (s.layer, s.kind, s.head))


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def check_schema(path: str, schema: pa.Schema) -> tuple[int | None, bool, bool]:
    """Validate column presence and types. Returns (dim or None, has sliding_window, has token_str)."""
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ShardError(path, "missing_columns", f"missing column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    for col in ("bucket", "example_id"):
        t = schema.field(col).type
        if not _is_int(t):
            raise ShardError(path, "wrong_type", f"column {col} must be an integer type, found {t}")
    t = schema.field("position").type
    if not (_is_int(t) or pa.types.is_floating(t)):
        raise ShardError(path, "wrong_type", f"column position must be int32 (or float), found {t}")
    vt = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(vt) or pa.types.is_list(vt) or pa.types.is_large_list(vt)):
        raise ShardError(path, "wrong_type", f"column vector must be fixed_size_list<float32> or list<float>, found {vt}")
    if not pa.types.is_floating(vt.value_type):
        raise ShardError(path, "wrong_type", f"column vector must hold floats, found {vt}")
    dim = vt.list_size if pa.types.is_fixed_size_list(vt) else None
    has_window = "sliding_window" in names
    if has_window:
        wt = schema.field("sliding_window").type
        if not (_is_int(wt) or pa.types.is_null(wt)):
            raise ShardError(path, "wrong_type", f"column sliding_window must be int32 (nullable), found {wt}")
    has_tokens = "token_str" in names and (
        pa.types.is_string(schema.field("token_str").type) or pa.types.is_large_string(schema.field("token_str").type)
    )
    return dim, has_window, has_tokens


def _check_profile(path: str, prof: dict) -> None:
    """Raise the first problem a shard profile shows (the order is part of the contract)."""
    if prof["n_rows"] == 0:
        raise ShardError(path, "empty", "shard has no rows")
    if prof["n_null_keys"]:
        raise ShardError(path, "null_values", f"{prof['n_null_keys']} row(s) have a null bucket, example_id or position")
    if prof["n_nonfinite_positions"]:
        raise ShardError(path, "nonfinite_values", f"{prof['n_nonfinite_positions']} position(s) are NaN or infinite")
    if prof["n_negative_positions"]:
        raise ShardError(path, "negative_positions", f"{prof['n_negative_positions']} row(s) have a negative position (min {prof['min_position']:g})")
    n_distinct_windows = int(prof["n_windows"]) + (1 if prof["n_null_windows"] else 0)
    if n_distinct_windows > 1:
        raise ShardError(path, "mixed_sliding_window", "sliding_window takes more than one value within the shard")
    if prof["n_duplicate_rows"]:
        raise ShardError(path, "duplicate_rows", f"{prof['n_duplicate_rows']} row(s) repeat an (example_id, position) already present")


def _read_schema(path: str) -> tuple[pq.ParquetFile, pa.Schema]:
    try:
        pf = pq.ParquetFile(path)
        return pf, pf.schema_arrow
    except Exception as exc:  # truncated footer, not Parquet at all, permission...
        raise ShardError(path, "unreadable", f"cannot read Parquet file ({type(exc).__name__}: {exc})") from None


def table_profile(table: pa.Table) -> tuple[dict, list[BucketRange]]:
    """The profile of `sql/shard_profile.sql` and the bucket ranges of `sql/shard_buckets.sql`,
    computed with numpy from the scalar columns (bucket, example_id, position[, sliding_window]).

    Equal to the SQL results (tests/test_catalog_profile.py); about 10x cheaper per shard, which
    matters when a model has thousands of shards. Only shards with null values need
    `pyarrow.compute` (whose import alone costs half a second in the process that profiles).
    """
    n = table.num_rows
    cols = {c: table.column(c) for c in ("bucket", "example_id", "position")}
    window = table.column("sliding_window") if "sliding_window" in table.column_names else None
    prof = {
        "n_rows": n, "n_examples": 0, "n_null_keys": 0,
        "n_duplicate_rows": 0, "n_negative_positions": 0, "n_nonfinite_positions": 0,
        "min_position": None, "max_position": None,
        "n_windows": 0, "n_null_windows": n if window is None else window.null_count, "sliding_window": None,
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
    prof["min_position"] = float(pos.min())
    prof["max_position"] = float(pos.max())
    finite = np.isfinite(pos)
    prof["n_nonfinite_positions"] = int(n - np.count_nonzero(finite))
    prof["n_negative_positions"] = int(np.count_nonzero(pos < 0))
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


def profile_shard(info: ShardInfo) -> ShardInfo:
    """Fill `info` from the file: schema checks, row counts, window, bucket ranges.

    Reads only the footer and the scalar columns. Any problem is stored in
    `info.error` (never raised) so the catalog lists every shard, good or bad.
    """
    path = info.path
    try:
        pf, schema = _read_schema(path)
        info.dim, has_window, info.has_token_str = check_schema(path, schema)
        columns = ["bucket", "example_id", "position"] + (["sliding_window"] if has_window else [])
        try:
            table = pf.read(columns=columns, use_threads=False)
        except Exception as exc:
            raise ShardError(path, "unreadable", f"cannot read Parquet data ({type(exc).__name__}: {exc})") from None
        try:
            prof, ranges = table_profile(table)
        except Exception as exc:  # a column pyarrow can read but not convert
            raise ShardError(path, "unreadable", f"cannot profile rows ({type(exc).__name__}: {exc})") from None
        info.n_rows = int(prof["n_rows"])
        info.n_examples = int(prof["n_examples"])
        _check_profile(path, prof)
        info.sliding_window = None if prof["sliding_window"] is None else int(prof["sliding_window"])
        info.buckets = ranges
    except ShardError as err:
        info.error = err
    return info


def profile_shard_sql(con: duckdb.DuckDBPyConnection, info: ShardInfo) -> ShardInfo:
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
            cur = con.execute(profile_sql, {"path": path})
            names = [d[0] for d in cur.description]
            prof = dict(zip(names, cur.fetchone()))
        except duckdb.Error as exc:
            raise ShardError(path, "unreadable", f"cannot read Parquet data ({exc})") from None
        info.n_rows = int(prof["n_rows"])
        info.n_examples = int(prof["n_examples"])
        _check_profile(path, prof)
        info.sliding_window = None if prof["sliding_window"] is None else int(prof["sliding_window"])
        cur = con.execute(sql.load("shard_buckets"), {"path": path})
        info.buckets = [BucketRange(int(b), int(n), float(lo), float(hi), float(mu)) for b, n, lo, hi, mu in cur.fetchall()]
    except ShardError as err:
        info.error = err
    return info


def infer_num_layers(shards: list[ShardInfo]) -> int:
    """Number of layers from the shard names present (the highest layer + 1); needs no head counts,
    so configured head counts are never second-guessed by the shard names."""
    if not shards:
        raise ValueError("no shards (lXXhYYq, lXXhYYk) found")
    return max(s.layer for s in shards) + 1


def infer_layout(shards: list[ShardInfo]) -> tuple[int, int, int]:
    """(num_layers, num_q_heads, num_k_heads) from the shard names present."""
    q = [s for s in shards if s.kind == "q"]
    k = [s for s in shards if s.kind == "k"]
    if not q:
        raise ValueError("no query shards (lXXhYYq) found")
    num_layers = infer_num_layers(shards)
    num_q = max(s.head for s in q) + 1
    num_k = (max(s.head for s in k) + 1) if k else num_q
    if num_q % num_k:
        raise ValueError(
            f"inferred {num_q} query heads and {num_k} key heads, which is not a whole GQA group; "
            "set num_q_heads/num_k_heads in the config"
        )
    return num_layers, num_q, num_k


def read_dataset_card(root: str | Path) -> dict:
    """YAML front matter of the dataset card (README.md), or {} when absent or unparsable."""
    import yaml

    card = Path(root) / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        front = text.split("---", 2)[1]
        data = yaml.safe_load(front)
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}
