"""CSV exports with the documented column names, one file set per model and run."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb

from warehouse.sources.names import safe_path_component
from warehouse.store import db
from warehouse.store.attention_export import ATTENTION_EXPORTS, copy_options, export_file_name

# head_metrics.csv: the columns earlier exports wrote, first and in their order (the upstream columns, so
# scripts written for the upstream file read it unchanged, by name or by position), then what a paper
# table needs besides: which model and run, the AP interval, its degrees of freedom and the examples.
HEAD_METRICS_UPSTREAM_COLUMNS = (
    "layer, q_head, k_head, n_q_tokens, n_k_tokens, d_model, q_R2_pos, q_beta_norm, q_R2_scalar, "
    "q_mae_baseline, q_mae_proj, q_mae_ratio, q_resid0_skew, q_resid0_kurt, q_resid0_ks_p, "
    "q_noise_med_abs_skew, q_noise_med_abs_kurt, q_noise_med_ks_p, q_noise_frac_ks_p_lt_alpha, "
    "ap_overall, ap_overall_se, estimator"
)
HEAD_METRICS_APPENDED_COLUMNS = "model, run_id, ap_overall_ci_low, ap_overall_ci_high, ap_se_df, n_examples, ap_ci_calibrated"
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


@dataclass
class ExportedFiles:
    """The files one export wrote and the rows in each, as the warehouse counted them while writing
    (COPY's own count), so no caller has to re-read a file, text or binary, to learn its size."""
    run_id: str
    files: dict[str, Path]
    rows: dict[str, int]


def export_csvs(warehouse: str | Path, model: str, run_id: str | None, out_dir: str | Path,
                file_names: dict[str, str] | None = None, timeout_s: float = 60.0,
                tables: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the CSVs of one model+run into out_dir; returns {table: path} (`export_files` also
    returns the row counts)."""
    return export_files(warehouse, model, run_id, out_dir, file_names, timeout_s, tables).files


def export_files(warehouse: str | Path, model: str, run_id: str | None, out_dir: str | Path,
                 file_names: dict[str, str] | None = None, timeout_s: float = 60.0,
                 tables: tuple[str, ...] | None = None) -> ExportedFiles:
    """Write the export files of one model+run into out_dir, with the rows each holds.

    `tables` defaults to the upstream tables and head_errors, plus the
    attention tables when the run computed them. NaN is written as `nan`; the per-token
    attention table goes to Parquet (`warehouse.store.attention_export`).
    """
    specs = {**EXPORTS, **ATTENTION_EXPORTS}
    out_dir = Path(out_dir)
    names = {t: export_file_name(t) for t in specs}
    names.update({t: safe_path_component(n, f"file name of the {t} export") for t, n in (file_names or {}).items()})
    written, rows = {}, {}
    with db.reader(warehouse, timeout_s) as con:
        run_id = run_id or latest_run_id(con, model)
        (known,) = con.execute("SELECT count(*) FROM runs WHERE model = $m AND run_id = $r",
                               {"m": model, "r": run_id}).fetchone()
        if not known:
            raise LookupError(f"no run {run_id!r} of model {model!r} in {warehouse}")
        check_output_folder(out_dir, "export folder")
        staging = _staging_folder(out_dir)  # only once there is something to write
        if tables is None:
            (n_attention,) = con.execute(
                "SELECT count(*) FROM head_attention_summary WHERE model = $m AND run_id = $r", {"m": model, "r": run_id}
            ).fetchone()
            tables = tuple(EXPORTS) + (tuple(ATTENTION_EXPORTS) if n_attention else ())
        try:
            for table in tables:
                columns, order = specs[table]
                path = staging / names[table]
                (rows[table],) = con.execute(
                    f"COPY (SELECT {columns} FROM {table} WHERE model = $m AND run_id = $r ORDER BY {order}) "
                    f"TO '{str(path).replace(chr(39), chr(39) * 2)}' {copy_options(table)}",
                    {"m": model, "r": run_id},
                ).fetchone()
                written[table] = out_dir / names[table]
            _publish(staging, out_dir)
        except (OSError, duckdb.Error) as exc:  # e.g. the disk filled up: no half-written folder is left
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportError(f"export to {out_dir} failed, nothing was written there: {db.one_line(exc)}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ExportedFiles(run_id, written, rows)


class ExportError(OSError):
    """An export that could not be written (the folder is left as it was)."""


def check_output_folder(folder: str | os.PathLike, what: str) -> Path:
    """`folder`, which must be a folder or creatable as one (checked before any work: a file, /dev/null or
    an unwritable place is a ValueError naming it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder}: {existing} is not writable")
    return folder


def _staging_folder(out_dir: Path) -> Path:
    """A fresh folder beside `out_dir` (same file system, so that publishing is a rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = out_dir.parent / f".{out_dir.name}.exporting-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()  # with the umask's permissions, which the published folder keeps
            return staging
        except FileExistsError:
            continue


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged files into `out_dir`: the whole folder in one rename when it is new, else file by
    file (each replaced whole: a reader never sees half a file)."""
    try:
        os.rename(staging, out_dir)  # fails if out_dir exists (and is not empty)
        return
    except OSError:
        out_dir.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        os.replace(f, out_dir / f.name)
    staging.rmdir()


def export_attention(warehouse: str | os.PathLike, model: str, run_id: str | None, out_dir: str | os.PathLike,
                     tables=tuple(ATTENTION_EXPORTS), timeout_s: float = 60.0) -> dict[str, Path]:
    """Write each attention table of the run (latest unless ``run_id``) into ``out_dir``
    (`export_file_name`); returns {table: path}."""
    return export_csvs(warehouse, model, run_id, out_dir, timeout_s=timeout_s, tables=tuple(tables))
