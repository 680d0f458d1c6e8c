"""Catalog of sniffer shards: find them, validate their schema, profile them.

A shard is `l{LL}h{HH}{q|k}/data.parquet` under the dataset root (optionally
under `model_dir`); its identity is (layer, head, kind), so `l0h0q` and `l00h00q`
name the same head (both are then a `duplicate_shard` error). Validation
problems become `ShardError`s that name the file and the problem; the pipeline
records them against the affected heads. Files that cannot be any head (numbers
beyond the stored integer range) are `CatalogProblem`s of the dataset. The profile of a shard and the
checks of its values are in `warehouse.sources.shard_profile`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

SHARD_RE = re.compile(r"^l([0-9]+)h([0-9]+)([qk])$")  # ASCII digits only
REQUIRED_COLUMNS = ("bucket", "example_id", "position", "vector")
USED_COLUMNS = REQUIRED_COLUMNS + ("sliding_window", "token_str")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # the warehouse stores layer, head, bucket, example_id, window as INTEGER
#: Positions must lie in the int32 range of the input format: beyond it they no longer fit the integer columns a capture
#: writes, and the regressions' sums of squared positions lose exactness long before they overflow.
MAX_POSITION = INT32_MAX
#: A query shard needs 3 rows: through 2 points the position regression (docs/method.md#position-regression) fits exactly, so
#: every component would get R2 = 1 whatever the data, and the residual statistics have no data.
MIN_QUERY_ROWS = 3


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
class CatalogProblem:
    """A problem of the dataset that belongs to no head (a file no head can be, the card...)."""

    file: str | None
    problem: str
    message: str


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
    # SHA-256 of the content the run's revision was made from (None: not known, not verified); the
    # worker that reads the shard checks its bytes against it (warehouse.sources.revision.verified_bytes)
    sha256: str | None = None

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
            "problem": None if self.error is None else self.error.problem,
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


@dataclass
class ShardScan:
    """What a dataset folder holds: the shards (duplicates marked), the files that cannot be a head,
    and every shard file's path (all of them count for the dataset revision)."""

    base: Path
    shards: list[ShardInfo]
    problems: list[CatalogProblem]
    paths: list[str]


_KIND_NAMES = {"q": "query", "k": "key"}


def scan_shards(root: str | Path, model_dir: str | None = None, listing: list[str] | None = None) -> ShardScan:
    """Every ``lXXhYY{q,k}/data.parquet`` under root (or root/model_dir), shards sorted by (layer, kind, head).

    Two folders naming one (layer, head, kind) are each a `duplicate_shard` error (never two values for one
    head). A layer or head number beyond the stored integer range is a `CatalogProblem`, not a shard.
    `listing`: the shard folder names the dataset holds, when its files are not (all) on disk yet (a
    streamed Hub run lists them from the Hub and downloads each group's shards as its turn comes).
    """
    base = Path(root) / model_dir if model_dir else Path(root)
    if listing is None and not base.is_dir():
        raise FileNotFoundError(f"dataset folder {base} does not exist")
    found: list[ShardInfo] = []
    problems: list[CatalogProblem] = []
    paths: list[str] = []
    for sub in (base.iterdir() if listing is None else (base / name for name in listing)):
        m = SHARD_RE.match(sub.name)
        if not m:
            continue
        path = sub / "data.parquet"
        try:
            present = True if listing is not None else path.is_file()
        except OSError as exc:  # e.g. a folder we may not list
            present = True
            unreadable = ShardError(path, "catalog_failed", f"cannot stat the shard ({type(exc).__name__}: {exc})")
        else:
            unreadable = None
        if not present:
            continue
        paths.append(str(path))
        layer, head = int(m[1]), int(m[2])
        if layer > INT32_MAX or head > INT32_MAX:
            problems.append(CatalogProblem(str(path), "integer_out_of_range",
                                           f"{path}: layer {m[1]} / head {m[2]} is beyond the stored integer range "
                                           f"(at most {INT32_MAX}); the shard is not used"))
            continue
        found.append(ShardInfo(layer, head, m[3], str(path), error=unreadable))
    if not found:
        extra = f" ({len(problems)} with unusable layer/head numbers)" if problems else ""
        raise FileNotFoundError(f"no lXXhYY{{q,k}}/data.parquet shards under {base}{extra}")
    found.sort(key=lambda s: (s.layer, s.kind, s.head, s.path))
    copies: dict[tuple[int, int, str], list[ShardInfo]] = defaultdict(list)
    for s in found:
        copies[(s.layer, s.head, s.kind)].append(s)
    for (layer, head, kind), same in copies.items():
        if len(same) > 1:
            names = ", ".join(Path(c.path).parent.name for c in same)
            for c in same:
                c.error = ShardError(c.path, "duplicate_shard",
                                     f"{len(same)} shard folders ({names}) name {_KIND_NAMES[kind]} head {head} of "
                                     f"layer {layer}; none of them is used")
    return ShardScan(base, found, problems, paths)


def find_shards(root: str | Path, model_dir: str | None = None) -> list[ShardInfo]:
    """The shards of `scan_shards`, sorted by (layer, kind, head)."""
    return scan_shards(root, model_dir).shards


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def check_schema(path: str, schema: pa.Schema) -> tuple[int | None, bool, bool]:
    """Validate column presence and types. Returns (dim or None, has sliding_window, has token_str)."""
    names = set(schema.names)
    repeated = sorted({c for c in schema.names if c in USED_COLUMNS and schema.names.count(c) > 1})
    if repeated:
        raise ShardError(path, "duplicate_columns", f"column(s) {', '.join(repeated)} appear more than once")
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
