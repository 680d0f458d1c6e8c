"""Writes of results into the warehouse: one transaction per batch of heads.

Every write first deletes the rows of the same (model, run_id, layer, q_head),
so re-running a head replaces it and a re-run never duplicates anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa

from plasticity.types import HeadResult
from warehouse.sources.catalog import CatalogProblem, bucket_columns, catalog_columns
from warehouse.store.models import ModelInfo, replace_model

# Tables holding per-head results; all carry model, run_id, layer, q_head, k_head.
RESULT_TABLES = (
    "head_metrics",
    "head_bucket_plasticity",
    "head_bucket_summary",
    "head_component_weights",
    "head_errors",
    "token_attention",
    "head_attention_summary",
    "query_scale_sweep",
)


@dataclass
class HeadOutcome:
    """What a compute step returns for one head: its results, or the error that stopped it."""

    layer: int
    q_head: int
    k_head: int
    result: HeadResult | None = None
    error: dict | None = None  # {'file', 'problem', 'message'}
    extra_tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # e.g. attention tables

    def tables(self) -> dict[str, dict]:
        """Rows to insert, per table, as column dicts without model/run_id."""
        key = {"layer": self.layer, "q_head": self.q_head, "k_head": self.k_head}
        out: dict[str, dict] = {}
        if self.error is not None:
            out["head_errors"] = {k: np.asarray([v]) for k, v in {**key, **self.error}.items()}
            return out
        res = self.result
        out["head_metrics"] = {k: np.asarray([v]) for k, v in {**key, **res.metrics}.items()}
        for name, cols in (("head_bucket_plasticity", res.bucket_rows), ("head_bucket_summary", res.bucket_summary_rows),
                           ("head_component_weights", res.component_rows)):
            n = len(next(iter(cols.values()))) if cols else 0
            if n:
                out[name] = {**{k: np.full(n, v) for k, v in key.items()}, **cols}
        for name, cols in self.extra_tables.items():
            n = len(next(iter(cols.values()))) if cols else 0
            if n:
                out[name] = {**{k: np.full(n, v) for k, v in key.items()}, **cols}
        return out


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def existing_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def write_outcomes(con: duckdb.DuckDBPyConnection, model: str, run_id: str, outcomes: list[HeadOutcome],
                   present: set[str] | None = None) -> None:
    """Replace the rows of these heads (caller holds the transaction).

    `present`: the warehouse's tables, when the caller already knows them (saves a catalog query
    per batch).
    """
    if not outcomes:
        return
    if present is None:
        present = existing_tables(con)
    keys = pa.table({
        "layer": pa.array([o.layer for o in outcomes], pa.int32()),
        "q_head": pa.array([o.q_head for o in outcomes], pa.int32()),
    })
    con.register("_heads_to_replace", keys)
    for table in RESULT_TABLES:
        if table in present:
            con.execute(
                f"DELETE FROM {table} WHERE model = $model AND run_id = $run_id "
                "AND (layer, q_head) IN (SELECT (layer, q_head) FROM _heads_to_replace)",
                {"model": model, "run_id": run_id},
            )
    con.unregister("_heads_to_replace")
    merged: dict[str, dict[str, list]] = {}
    for o in outcomes:
        for table, cols in o.tables().items():
            dest = merged.setdefault(table, {})
            for k, v in cols.items():
                dest.setdefault(k, []).append(np.asarray(v))
    now = _now()
    for table, cols in merged.items():
        if table not in present:
            raise RuntimeError(f"result table {table} is missing from the warehouse schema")
        data = {k: np.concatenate(v) for k, v in cols.items()}
        n = len(next(iter(data.values())))
        arrow = pa.table({"model": pa.array([model] * n), "run_id": pa.array([run_id] * n), **data})
        if table == "head_errors":
            arrow = arrow.append_column("recorded_at", pa.array([now] * n, pa.timestamp("us")))
        con.register("_new_rows", arrow)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _new_rows")
        con.unregister("_new_rows")


def replace_catalog(con: duckdb.DuckDBPyConnection, model: str, revision: str, shards, info: ModelInfo,
                    problems: list[CatalogProblem] = ()) -> None:
    """Replace the model's shard catalog (`shards`, `shard_buckets`), its `models` row and its
    `catalog_problems` (the caller holds the transaction, so all change together)."""
    replace_model(con, info, list(problems))
    con.execute("DELETE FROM shards WHERE model = $m", {"m": model})
    con.execute("DELETE FROM shard_buckets WHERE model = $m", {"m": model})
    if shards:
        t = pa.table(catalog_columns(shards, model, revision))
        con.register("_shards", t)
        con.execute("INSERT INTO shards BY NAME SELECT * FROM _shards")
        con.unregister("_shards")
    buckets = bucket_columns(shards, model)
    if buckets["model"]:
        t = pa.table(buckets)
        con.register("_buckets", t)
        con.execute("INSERT INTO shard_buckets BY NAME SELECT * FROM _buckets")
        con.unregister("_buckets")


def replace_shard_profiles(con: duckdb.DuckDBPyConnection, model: str, revision: str, shards) -> None:
    """Replace the catalog rows (`shards` by path, `shard_buckets` by head) of these shards only: a streamed
    run records each profile with the results of the heads that read the shard, so a resumed run finds
    the profiles of finished heads' shards (`warehouse.run.hub_stream.reuse_profiles`) without downloading them."""
    shards = list(shards)
    if not shards:
        return
    keys = {"model": [model] * len(shards), "path": [s.path for s in shards], "layer": [s.layer for s in shards],
            "head": [s.head for s in shards], "kind": [s.kind for s in shards]}
    con.register("_profiled", pa.table(keys))
    con.execute("DELETE FROM shards WHERE model = $m AND path IN (SELECT path FROM _profiled)", {"m": model})
    con.execute("DELETE FROM shard_buckets WHERE model = $m AND (layer, head, kind) IN "
                "(SELECT (layer, head, kind) FROM _profiled)", {"m": model})
    con.unregister("_profiled")
    con.register("_shards", pa.table(catalog_columns(shards, model, revision)))
    con.execute("INSERT INTO shards BY NAME SELECT * FROM _shards")
    con.unregister("_shards")
    buckets = bucket_columns(shards, model)
    if buckets["model"]:
        con.register("_buckets", pa.table(buckets))
        con.execute("INSERT INTO shard_buckets BY NAME SELECT * FROM _buckets")
        con.unregister("_buckets")


def start_run(con, run_id: str, model: str, dataset_name: str | None, revision: str, config: dict,
              package_version: str, n_heads: int) -> None:
    con.execute("DELETE FROM runs WHERE run_id = $r AND model = $m", {"r": run_id, "m": model})
    con.execute(
        "INSERT INTO runs (run_id, model, dataset_name, revision, config_json, package_version, started_at, "
        "status, n_heads) VALUES ($run_id, $model, $dataset_name, $revision, $config_json, $package_version, "
        "$started_at, 'running', $n_heads)",
        {
            "run_id": run_id, "model": model, "dataset_name": dataset_name, "revision": revision,
            "config_json": json.dumps(config, sort_keys=True), "package_version": package_version,
            "started_at": _now(), "n_heads": n_heads,
        },
    )


def finish_run(con, run_id: str, model: str) -> tuple[int, int, str]:
    n_done = con.execute(
        "SELECT count(*) FROM head_metrics WHERE run_id = $r AND model = $m", {"r": run_id, "m": model}
    ).fetchone()[0]
    n_err = con.execute(
        "SELECT count(*) FROM head_errors WHERE run_id = $r AND model = $m", {"r": run_id, "m": model}
    ).fetchone()[0]
    status = "succeeded" if n_err == 0 else ("failed" if n_done == 0 else "partial")
    con.execute(
        "UPDATE runs SET ended_at = $t, status = $s, n_done = $d, n_errors = $e WHERE run_id = $r AND model = $m",
        {"t": _now(), "s": status, "d": n_done, "e": n_err, "r": run_id, "m": model},
    )
    return n_done, n_err, status


def stop_run(con, run_id: str, model: str, status: str, error: str) -> None:
    """Mark a run that stopped early ('interrupted' or 'failed'), with its committed counts and the reason."""
    con.execute(
        "UPDATE runs SET ended_at = $t, status = $s, error = $err, "
        "n_done = (SELECT count(*) FROM head_metrics WHERE run_id = $r AND model = $m), "
        "n_errors = (SELECT count(*) FROM head_errors WHERE run_id = $r AND model = $m) "
        "WHERE run_id = $r AND model = $m",
        {"t": _now(), "s": status, "err": error, "r": run_id, "m": model},
    )


def done_heads(con, model: str, run_id: str) -> set[tuple[int, int]]:
    rows = con.execute(
        "SELECT layer, q_head FROM head_metrics WHERE model = $m AND run_id = $r", {"m": model, "r": run_id}
    ).fetchall()
    return {(int(a), int(b)) for a, b in rows}
