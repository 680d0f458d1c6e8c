"""CSV exports with the upstream column names, one file set per model and run."""

from __future__ import annotations

import os
from pathlib import Path

from warehouse.store import db
from warehouse.store.attention_export import ATTENTION_EXPORTS, copy_options, export_file_name
from warehouse.sources.names import safe_path_component

# head_metrics.csv: the columns earlier exports wrote, first and in their order (the upstream columns, so
# scripts written for the upstream file read it unchanged, by name or by position), then what a paper
# table needs besides: which model and run, the AP interval, its degrees of freedom and the examples.
HEAD_METRICS_UPSTREAM_COLUMNS = (
    "layer, q_head, k_head, n_q_tokens, n_k_tokens, d_model, q_R2_pos, q_beta_norm, q_R2_scalar, "
    "q_mae_baseline, q_mae_proj, q_mae_ratio, q_resid0_skew, q_resid0_kurt, q_resid0_ks_p, "
    "q_noise_med_abs_skew, q_noise_med_abs_kurt, q_noise_med_ks_p, q_noise_frac_ks_p_lt_alpha, "
    "ap_overall, ap_overall_se, estimator"
)
HEAD_METRICS_APPENDED_COLUMNS = "model, run_id, ap_overall_ci_low, ap_overall_ci_high, ap_se_df, n_examples"
HEAD_METRICS_COLUMNS = f"{HEAD_METRICS_UPSTREAM_COLUMNS}, {HEAD_METRICS_APPENDED_COLUMNS}"
EXPORTS = {
    "head_metrics": (HEAD_METRICS_COLUMNS, "layer, q_head"),
    "head_bucket_plasticity": ("layer, q_head, k_head, q_bucket, k_bucket, plasticity, n_pairs", "layer, q_head, q_bucket, k_bucket"),
    "head_component_weights": ("layer, q_head, k_head, component, component_r2, weight", "layer, q_head, component"),
    "head_errors": ("layer, q_head, k_head, file, problem, message", "layer, q_head"),
}


def results_dir(base: str | Path, model: str, run_id: str) -> Path:
    """<base>/<model>/<run_id>/, the folder of one run's files; both names must be safe folder names."""
    return Path(base) / safe_path_component(model, "model name") / safe_path_component(run_id, "run id")


def latest_run_id(con, model: str) -> str:
    row = con.execute(
        "SELECT run_id FROM runs WHERE model = $m ORDER BY started_at DESC, run_id LIMIT 1", {"m": model}
    ).fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT DISTINCT model FROM runs ORDER BY 1").fetchall()]
        raise LookupError(f"no run of model {model!r} in the warehouse (models: {', '.join(known) or 'none'})")
    return row[0]


def export_csvs(warehouse: str | Path, model: str, run_id: str | None, out_dir: str | Path,
                file_names: dict[str, str] | None = None, timeout_s: float = 60.0,
                tables: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the CSVs of one model+run into out_dir; returns {table: path}.

    `tables` defaults to the upstream tables and head_errors, plus the
    attention tables when the run computed them. NaN is written as `nan`; the per-token
    attention table goes to Parquet (`warehouse.store.attention_export`).
    """
    specs = {**EXPORTS, **ATTENTION_EXPORTS}
    out_dir = Path(out_dir)
    names = {t: export_file_name(t) for t in specs}
    names.update({t: safe_path_component(n, f"file name of the {t} export") for t, n in (file_names or {}).items()})
    written = {}
    with db.reader(warehouse, timeout_s) as con:
        run_id = run_id or latest_run_id(con, model)
        (known,) = con.execute("SELECT count(*) FROM runs WHERE model = $m AND run_id = $r",
                               {"m": model, "r": run_id}).fetchone()
        if not known:
            raise LookupError(f"no run {run_id!r} of model {model!r} in {warehouse}")
        out_dir.mkdir(parents=True, exist_ok=True)  # only once there is something to write
        if tables is None:
            (n_attention,) = con.execute(
                "SELECT count(*) FROM head_attention_summary WHERE model = $m AND run_id = $r", {"m": model, "r": run_id}
            ).fetchone()
            tables = tuple(EXPORTS) + (tuple(ATTENTION_EXPORTS) if n_attention else ())
        for table in tables:
            columns, order = specs[table]
            path = out_dir / names[table]
            con.execute(
                f"COPY (SELECT {columns} FROM {table} WHERE model = $m AND run_id = $r ORDER BY {order}) "
                f"TO '{str(path).replace(chr(39), chr(39) * 2)}' {copy_options(table)}",
                {"m": model, "r": run_id},
            )
            written[table] = path
    return written


def export_attention(warehouse: str | os.PathLike, model: str, run_id: str | None, out_dir: str | os.PathLike,
                     tables=tuple(ATTENTION_EXPORTS), timeout_s: float = 60.0) -> dict[str, Path]:
    """Write each attention table of the run (latest unless ``run_id``) into ``out_dir``
    (`export_file_name`); returns {table: path}."""
    return export_csvs(warehouse, model, run_id, out_dir, timeout_s=timeout_s, tables=tuple(tables))
