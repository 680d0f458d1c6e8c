"""Data-quality checks on the warehouse, as plain functions over a DuckDB connection.

Each check is one SQL file (sql/check_*.sql) returning the offending rows; a
check passes when there are none. The Dagster asset checks (assets/*.py) are
thin wrappers around `evaluate`; tests call `evaluate` on tables they corrupt.
No Dagster import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

import sql

WEIGHT_SUM_TOLERANCE = 1e-6

# natural key of every result row within one (model, run_id)
RESULT_KEYS = {
    "head_metrics": "layer, q_head",
    "head_bucket_plasticity": "layer, q_head, q_bucket, k_bucket",
    "head_bucket_summary": "layer, q_head, q_bucket",
    "head_component_weights": "layer, q_head, component",
    "head_errors": "layer, q_head",
    "token_attention": "layer, q_head, example_id, position",
    "head_attention_summary": "layer, q_head",
    "query_scale_sweep": "layer, q_head, scale",
}


@dataclass(frozen=True)
class CheckDef:
    name: str
    table: str  # the table (asset) the check is about
    description: str
    scoped_by_run: bool  # True: (model, run_id); False: model only


CHECKS: dict[str, CheckDef] = {c.name: c for c in (
    CheckDef("shard_schema_valid", "shards",
             "Every shard of the model passed schema and content validation (columns, types, widths, "
             "finite values, positions, one sliding window).", False),
    CheckDef("shard_widths_consistent", "shards",
             "All shards of the model have the same vector width.", False),
    CheckDef("every_query_head_has_key_head", "head_samples",
             "Every query head has the shard of its key head (k_head = q_head // group).", False),
    CheckDef("query_key_widths_match", "head_samples",
             "Query and key vectors of every head pair have the same width.", False),
    CheckDef("ap_overall_in_unit_interval", "head_metrics",
             "ap_overall lies in [0, 1] for every head (NaN = nothing eligible, allowed).", True),
    CheckDef("plasticity_in_unit_interval", "head_bucket_plasticity",
             "Every cell plasticity lies in [0, 1] (NaN = no key pairs, allowed).", True),
    CheckDef("weights_sum_to_one", "head_component_weights",
             f"The component weights of every head sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}).", True),
    *(CheckDef(f"no_duplicate_rows_{t}", t, f"No two rows of {t} share ({keys}) within a run.", True)
      for t, keys in RESULT_KEYS.items()),
)}


@dataclass
class CheckOutcome:
    name: str
    table: str
    passed: bool
    n_checked: int  # rows in scope
    violations: pd.DataFrame  # the offending rows (at most `limit`)
    n_violations: int
    description: str
    #: shards not profiled yet (a streamed Hub partition profiles each shard as its group is analysed):
    #: a check over them has checked nothing, so it does not pass until they are profiled
    n_not_profiled: int = 0

    @property
    def message(self) -> str:
        if self.n_not_profiled and not self.n_violations:
            return (f"{self.name}: {self.n_not_profiled} of {self.n_checked + self.n_not_profiled} shard(s) not "
                    f"profiled yet (a streamed Hub run profiles each shard as it analyses it): checked "
                    f"{self.n_checked}; materialize shard_catalog again after head_analysis to check them all")
        if self.passed:
            return f"{self.name}: passed on {self.n_checked} row(s) of {self.table}"
        return f"{self.name}: {self.n_violations} violation(s) in {self.table} ({self.n_checked} row(s) checked)"


def _query(check: CheckDef) -> tuple[str, dict]:
    name = check.name
    if name == "shard_schema_valid":
        return sql.load("check_shard_errors"), {}
    if name == "shard_widths_consistent":
        return sql.load("check_shard_widths"), {}
    if name == "every_query_head_has_key_head":
        return sql.load("check_missing_key_heads"), {}
    if name == "query_key_widths_match":
        return sql.load("check_head_widths"), {}
    if name == "ap_overall_in_unit_interval":
        return sql.load("check_unit_interval").format(table="head_metrics", column="ap_overall"), {}
    if name == "plasticity_in_unit_interval":
        return sql.load("check_unit_interval").format(table="head_bucket_plasticity", column="plasticity"), {}
    if name == "weights_sum_to_one":
        return sql.load("check_weight_sums"), {"tolerance": WEIGHT_SUM_TOLERANCE}
    if name.startswith("no_duplicate_rows_"):
        return sql.load("check_duplicates").format(table=check.table, keys=RESULT_KEYS[check.table]), {}
    raise KeyError(name)


def evaluate(con, name: str, model: str, run_id: str | None = None, limit: int = 20) -> CheckOutcome:
    """Run one check for a model (and run, for result tables) on an open connection."""
    check = CHECKS[name]
    if check.scoped_by_run and run_id is None:
        raise ValueError(f"check {name} needs the run_id")
    query, params = _query(check)
    params = {**params, "model": model}
    if check.scoped_by_run:
        params["run_id"] = run_id
        n_checked = con.execute(sql.load("check_scope_count").format(table=check.table),
                                {"model": model, "run_id": run_id}).fetchone()[0]
    else:
        n_checked = con.execute(f"SELECT count(*) FROM {check.table} WHERE model = $model",
                                {"model": model}).fetchone()[0]
    n_not_profiled = 0
    if check.table == "shards":  # a listed shard not read yet has no profile and no error
        n_not_profiled = con.execute(sql.load("check_shards_not_profiled"), {"model": model}).fetchone()[0]
        n_checked -= n_not_profiled
    rows = con.execute(query, params).df()
    return CheckOutcome(name, check.table, rows.empty and not n_not_profiled, int(n_checked), rows.head(limit),
                        int(len(rows)), check.description, int(n_not_profiled))


def checks_for(table: str) -> list[str]:
    return [c.name for c in CHECKS.values() if c.table == table]
