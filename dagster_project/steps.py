"""The work behind each asset, as plain functions over `warehouse` and `plasticity`.

The assets in ``assets/`` only resolve their partition, call one function here
and turn the result into Dagster metadata. No Dagster import, so everything
here can be called (and tested) without an instance.

Single-writer rule: every write below is one short `warehouse.store.db.writer`
transaction in the calling process; the per-head compute runs in worker
processes that read shards through their own in-memory DuckDB connections
(`warehouse.run.worker_pool.iter_outcomes`) and never open the warehouse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import pandas as pd

import sql
from dagster_project.registry import DEMO_MODEL, DatasetEntry
from warehouse.store import db
from warehouse.settings.config import RunConfig


class HubClient(Protocol):
    def head_sha(self, repo_id: str, branch: str) -> str: ...

    def snapshot(self, repo_id: str, branch: str, sha: str, model_dir: str | None = None) -> Path: ...

    def snapshot_path(self, repo_id: str, sha: str) -> Path: ...

    def branch_files(self, repo_id: str, branch: str, sha: str, model_dir: str | None = None): ...


# --------------------------------------------------------------------------- datasets


def has_shards(root: Path, model_dir: str | None) -> bool:
    base = root / model_dir if model_dir else root
    return base.is_dir() and any(base.glob("l*h*[qk]/data.parquet"))


def ensure_local_dataset(entry: DatasetEntry, cfg: RunConfig) -> Path:
    """The local folder of a dataset; the demo dataset is generated on first use."""
    root = Path(entry.local_root)
    if has_shards(root, cfg.model_dir):
        return root
    if entry.key == DEMO_MODEL:
        from plasticity.synthetic import SyntheticSpec
        from warehouse.sources.demo_data import write_synthetic_dataset

        write_synthetic_dataset(root, SyntheticSpec())
        return root
    raise FileNotFoundError(
        f"dataset folder {root} of model {entry.key!r} ({entry.config_path}) holds no lXXhYY{{q,k}}/data.parquet shards")


def open_dataset(entry: DatasetEntry, cfg: RunConfig, hub: HubClient, sha: str | None = None
                 ) -> tuple[Path, str | None, object]:
    """(dataset root, pinned commit sha or None for a local folder, the Hub branch's files when streamed).

    A Hub branch is pinned to `sha` (default: the branch head now). Streamed (``hub_download: stream``,
    the default) only its listing and card are fetched here, the shards come as the step needs them,
    within the disk budget; else the whole branch is downloaded. The root returned is the snapshot
    folder, `cfg.model_dir` stays below it.
    """
    if not entry.is_hub:
        return ensure_local_dataset(entry, cfg), None, None
    sha = sha or hub.head_sha(entry.repo_id, entry.branch)
    if cfg.hub_download == "stream":
        files = hub.branch_files(entry.repo_id, entry.branch, sha, cfg.model_dir)
        return files.local_dir, sha, files
    return hub.snapshot(entry.repo_id, entry.branch, sha, cfg.model_dir), sha, None


# --------------------------------------------------------------------------- catalog


@dataclass
class CatalogResult:
    model: str
    revision: str
    root: Path
    num_layers: int
    num_q_heads: int
    num_k_heads: int
    n_shards: int
    n_query: int
    n_key: int
    n_bad: int
    n_bucket_rows: int
    layout_source: str  # config | card | shards
    bucket_scheme: str | None
    n_problems: int  # catalog_problems rows (the dataset's, not any head's)
    shards: pd.DataFrame  # the catalog rows written (without model)
    n_profiled: int = 0  # shards whose profile is known (streamed: from an earlier run at this commit)
    streamed: bool = False  # a streamed Hub branch: the analysis step profiles each shard as it downloads it


def build_shard_catalog(entry: DatasetEntry, cfg: RunConfig, root: Path, sha: str | None,
                        warehouse: str, lock_timeout_s: float = 60.0, hub_files=None) -> CatalogResult:
    """Resolve the layout and the dataset card, profile every shard and replace the model's catalog rows
    (`shards`, `shard_buckets`, `models`, `catalog_problems`), as `analyze_dataset` does.

    `hub_files`: a streamed Hub branch. Nothing is downloaded here: the catalog lists the commit's shards by
    name (errors known from names: duplicates, outside the layout) with the profiles stored by an earlier run
    at the same commit, and the analysis step, which downloads each shard once within the disk budget,
    profiles the others and records the complete catalog (so a partition run downloads each shard once)."""
    from warehouse.run.planning import build_catalog, find_catalog, local_revision
    from warehouse.store.families import checkpoint_of
    from warehouse.store.results import replace_catalog

    # the layout is resolved before the warehouse is touched: a dataset whose layout cannot be known
    # creates no warehouse file
    if hub_files is not None:
        from warehouse.run.hub_stream import reuse_profiles

        cat = find_catalog(root, cfg, listing=hub_files.shard_folders)
        db.ensure_schema(warehouse, lock_timeout_s)
        reuse_profiles(warehouse, lock_timeout_s, entry.key, sha, cat, needed=set())
    else:
        cat = build_catalog(root, cfg)
        db.ensure_schema(warehouse, lock_timeout_s)
    revision = sha or local_revision(cat)
    with db.writer(warehouse, lock_timeout_s) as con:
        replace_catalog(con, entry.key, revision, cat.shards, cat.model_info(entry.key, cfg.dataset_name, revision, checkpoint_of(cfg)),
                        cat.problems)
    rows = pd.DataFrame([s.row() for s in cat.shards])
    return CatalogResult(
        model=entry.key, revision=revision, root=Path(root), num_layers=cat.num_layers,
        num_q_heads=cat.num_q_heads, num_k_heads=cat.num_k_heads, n_shards=len(cat.shards),
        n_query=sum(s.kind == "q" for s in cat.shards), n_key=sum(s.kind == "k" for s in cat.shards),
        n_bad=sum(s.error is not None for s in cat.shards),
        n_bucket_rows=sum(len(s.buckets) for s in cat.shards), layout_source=cat.layout.source,
        bucket_scheme=None if cat.card.scheme is None else cat.card.scheme.describe(), n_problems=len(cat.problems),
        shards=rows, n_profiled=sum(s.n_rows is not None for s in cat.shards), streamed=hub_files is not None,
    )


def catalog_revision(warehouse: str, model: str, lock_timeout_s: float = 60.0) -> str | None:
    """The dataset revision the shard catalog of `model` was built from (None: no catalog yet)."""
    if not Path(warehouse).exists():
        return None
    with db.reader(warehouse, lock_timeout_s) as con:
        row = con.execute("SELECT any_value(revision) FROM shards WHERE model = $m", {"m": model}).fetchone()
    return None if row is None else row[0]


@dataclass
class HeadSamplesResult:
    model: str
    n_heads: int
    n_missing_key: int
    n_plan_problems: int  # heads that cannot run (missing query or key shard, outside the layout)
    group_size: int
    layout: tuple[int, int, int]
    q_sample_rows: int
    k_sample_rows: int
    preview: pd.DataFrame


def refresh_head_samples(model: str, cfg: RunConfig, warehouse: str, lock_timeout_s: float = 60.0
                         ) -> HeadSamplesResult:
    """Rebuild the model's head_samples rows (GQA pairing, expected heads, sample sizes) from its shard
    catalog and the layout the catalog step resolved (table `models`), in SQL."""
    from warehouse.sources.layout import HeadLayout, expected_query_layers
    from warehouse.store.models import read_model
    from warehouse.run.planning import plan_parameters

    with db.writer(warehouse, lock_timeout_s) as con:
        con.execute(sql.load("head_samples_schema"))
        info = read_model(con, model)
        layers = [r[0] for r in con.execute("SELECT DISTINCT layer FROM shards WHERE model = $m", {"m": model}).fetchall()]
        if info is None or not layers:
            raise LookupError(f"no shard catalog for model {model!r} in {warehouse}: materialize shard_catalog first")
        layout = HeadLayout(info["num_layers"], info["num_q_heads"], info["num_k_heads"], info["layout_source"])
        expected = expected_query_layers(layout, layers, head_sampling=info["head_sampling"] is not None,
                                         full_attention_only=info["attention_scope"] == "full_only", layers=cfg.layers)
        group = layout.group_size
        con.execute("DELETE FROM head_samples WHERE model = $m", {"m": model})
        con.execute("INSERT INTO head_samples BY NAME " + sql.load("head_samples"),
                    plan_parameters(layout, expected, cfg, model))
        df = con.execute(
            "SELECT layer, q_head, k_head, q_rows, k_rows, q_sample_rows, k_sample_rows, q_dim, k_dim, "
            "sliding_window, plan_problem FROM head_samples WHERE model = $m "
            "ORDER BY layer, q_head",
            {"m": model},
        ).df()
    return HeadSamplesResult(
        model=model, n_heads=len(df), n_missing_key=int((df["plan_problem"] == "missing_key_shard").sum()),
        n_plan_problems=int(df["plan_problem"].notna().sum()),
        group_size=group, layout=(layout.num_layers, layout.num_q_heads, layout.num_k_heads),
        q_sample_rows=int(df["q_sample_rows"].fillna(0).sum()), k_sample_rows=int(df["k_sample_rows"].fillna(0).sum()),
        preview=df,
    )


# --------------------------------------------------------------------------- analysis


def run_analysis(entry: DatasetEntry, cfg: RunConfig, root: Path, sha: str | None, *, fresh: bool = False,
                 on_outcome: Callable | None = None, hub_files=None):
    """warehouse.run.pipeline.analyze_dataset for one model: heads computed in worker processes, written here
    (`hub_files`: a streamed Hub branch)."""
    from warehouse.run.pipeline import analyze_dataset

    summary = analyze_dataset(cfg, root, model=entry.key, revision=sha, resume=not fresh, progress=False,
                              on_outcome=on_outcome, hub=hub_files)
    if hub_files is not None:  # streamed: the shard profiles, hence the sample sizes, are known only now
        refresh_head_samples(entry.key, cfg, cfg.warehouse, cfg.lock_timeout_s)
    return summary


RESULT_PREVIEWS = {
    "head_metrics": ("layer, q_head, k_head, n_q_tokens, q_R2_pos, q_R2_scalar, q_mae_ratio, ap_overall, "
                     "ap_overall_se", "layer, q_head"),
    "head_bucket_plasticity": ("q_bucket, count(*) AS n_cells, avg(plasticity) FILTER (WHERE NOT isnan(plasticity)) "
                               "AS mean_plasticity, sum(n_pairs) AS n_pairs", None),
    "head_bucket_summary": ("q_bucket, avg(ap) AS mean_ap, avg(ap_se) FILTER (WHERE NOT isnan(ap_se)) AS mean_ap_se, "
                            "count(*) AS n_heads", None),
    "head_component_weights": ("component, avg(weight) AS mean_weight, avg(component_r2) AS mean_r2, "
                               "count(*) AS n_heads", None),
    "head_errors": ("layer, q_head, k_head, problem, message", "layer, q_head"),
    "token_attention": ("layer, count(*) AS n_tokens, avg(entropy) AS mean_entropy, avg(max_attn) AS mean_max_attn, "
                        "avg(key_coverage) AS mean_key_coverage", None),
    "head_attention_summary": ("layer, q_head, k_head, attn_class, mean_entropy_ratio, mean_max_attn, row_std, "
                               "local_bias_ratio, gain, entropy_monotonic", "layer, q_head"),
    "query_scale_sweep": ("scale, avg(mean_entropy) AS mean_entropy, avg(mean_max_attn) AS mean_max_attn, "
                          "avg(mean_k_eff) AS mean_k_eff", None),
}


def result_counts_and_previews(warehouse: str, model: str, run_id: str, limit: int = 20,
                               lock_timeout_s: float = 60.0) -> dict[str, tuple[int, pd.DataFrame]]:
    """{table: (rows in this run, a small preview)}; aggregated previews for the long tables."""
    out = {}
    with db.reader(warehouse, lock_timeout_s) as con:
        for table, (cols, order) in RESULT_PREVIEWS.items():
            p = {"m": model, "r": run_id}
            n = con.execute(f"SELECT count(*) FROM {table} WHERE model = $m AND run_id = $r", p).fetchone()[0]
            if order is None:  # aggregate per first column
                key = cols.split(",")[0]
                q = f"SELECT {cols} FROM {table} WHERE model = $m AND run_id = $r GROUP BY {key} ORDER BY {key}"
            else:
                q = f"SELECT {cols} FROM {table} WHERE model = $m AND run_id = $r ORDER BY {order}"
            out[table] = (int(n), con.execute(q + f" LIMIT {int(limit)}", p).df())
    return out


def latest_run(warehouse: str, model: str, lock_timeout_s: float = 60.0) -> dict:
    """The model's latest row of the `runs` table."""
    from warehouse.store.export import latest_run_id

    with db.reader(warehouse, lock_timeout_s) as con:
        run_id = latest_run_id(con, model)
        cur = con.execute("SELECT * FROM runs WHERE model = $m AND run_id = $r", {"m": model, "r": run_id})
        names = [d[0] for d in cur.description]
        return dict(zip(names, cur.fetchone()))


# --------------------------------------------------------------------------- exports


@dataclass
class ExportResult:
    model: str
    run_id: str
    out_dir: Path
    files: dict[str, Path]
    rows: dict[str, int] = field(default_factory=dict)
    preview: pd.DataFrame | None = None


def export_run(warehouse: str, exports_dir: str, model: str, cfg: RunConfig, lock_timeout_s: float = 60.0
               ) -> ExportResult:
    """The CSVs (docs/method.md#tables) of the model's latest run into <exports_dir>/<model>/<run_id>/."""
    from warehouse.store.export import export_files, latest_run_id, results_dir

    with db.reader(warehouse, lock_timeout_s) as con:
        run_id = latest_run_id(con, model)
    out_dir = results_dir(exports_dir, model, run_id)
    exported = export_files(warehouse, model, run_id, out_dir,
                            {"head_metrics": cfg.output_csv, "head_bucket_plasticity": cfg.bucket_csv,
                             "head_component_weights": cfg.component_csv}, timeout_s=lock_timeout_s)
    # row counts from the warehouse's own COPY, never by reading the files back: the per-token
    # attention export is Parquet (binary), and a count from a file could disagree with the table
    files, rows = exported.files, exported.rows
    preview = pd.read_csv(files["head_metrics"], nrows=20) if rows.get("head_metrics") else None
    return ExportResult(model, run_id, out_dir, files, rows, preview)


# --------------------------------------------------------------------------- plots


def plot_defaults(warehouse: str, model: str, lock_timeout_s: float = 60.0) -> dict:
    """bucket_type / bucket_min_size of the model's bucket scheme, as the catalog recorded it (table `models`)."""
    from warehouse.store.models import bucket_plot_defaults

    return bucket_plot_defaults(warehouse, model, lock_timeout_s)


@dataclass
class PlotOutput:
    kind: str
    path: Path
    png: bytes
    result: object  # warehouse.present.figure_parts.PlotResult
    source: dict
    config_file: Path | None


def render_plot(kind: str, warehouse: str | list[str], out_path: Path, plot_configs_dir: Path,
                model: str | None = None, defaults: dict | None = None, lock_timeout_s: float = 60.0) -> PlotOutput:
    """Draw one plot from the warehouse (latest run of `model`) with configs/plots/<model>-<kind>.yaml if present.

    For the comparison, `warehouse` may be several files (one per model); their latest runs are combined.
    """
    from warehouse.present import plots
    from warehouse.present import figure_parts
    from warehouse.present import plot_data

    cfg_file = plot_data.config_path_for(plot_configs_dir, kind, model)
    cfg_file = cfg_file if cfg_file.is_file() else None
    opts = plot_data.load_plot_options(kind, cfg_file, defaults=defaults)
    # the asset always plots the warehouse's latest run, whatever data source the YAML names
    paths = [warehouse] if isinstance(warehouse, (str, os.PathLike)) else list(warehouse)
    opts.warehouse, opts.bucket_csv, opts.component_csv, opts.head_metrics_csv = str(paths[0]) if paths else None, \
        None, None, None
    if kind == "compare":
        frames = [plot_data.load_comparison(p, opts.models, opts.metric, lock_timeout_s)
                  for p in paths if Path(p).exists()]
        frames = [f for f in frames if not f.empty]
        values = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["model", "run_id", "layer", "q_head", "value"])
        if opts.models:
            missing = sorted(set(opts.models) - set(values["model"]))
            if missing:
                raise LookupError(f"no run of model(s) {', '.join(missing)} in {', '.join(map(str, paths))}")
        result = plots.plot_model_comparison(values, opts)
        source = {"runs": values.groupby("model")["run_id"].first().to_dict()}
    else:
        opts.model, opts.run_id = model, None
        result, source = plots.make_plot(kind, opts, timeout_s=lock_timeout_s)
    figure_parts.apply_figsize(result.figure, opts)  # as `plasticity plot` does: the config's size, if it sets one
    png = figure_parts.png_bytes(result.figure, opts.dpi)
    out_path = figure_parts.write_atomically(out_path, png)
    return PlotOutput(kind, out_path, png, result, source, cfg_file)


# --------------------------------------------------------------------------- families


def safe_family(family: str) -> str:
    """A family name as one folder name (a partition key is untrusted text)."""
    from warehouse.sources.names import safe_path_component

    return safe_path_component(family, "family name (partition key)")


@dataclass
class TrajectoryOutput:
    metric: str
    path: Path
    png: bytes
    csv: Path
    trajectory: object  # warehouse.store.families.Trajectory
    result: object  # warehouse.present.figure_parts.PlotResult


def render_trajectories(paths: list[str], family: str, out_dir: Path, plot_configs_dir: Path,
                        lock_timeout_s: float = 60.0) -> list[TrajectoryOutput]:
    """The family's ap_overall trajectory (and the metric of configs/plots/<family>-trajectory.yaml when it
    names another), each as <out_dir>/trajectory-<metric>.png and the per-layer table as .csv."""
    from warehouse.present import figure_parts
    from warehouse.present import plot_data
    from warehouse.store.families import load_trajectory
    from warehouse.present.trajectory_plots import plot_trajectory

    cfg_file = plot_data.config_path_for(plot_configs_dir, "trajectory", family)
    opts = plot_data.load_plot_options("trajectory", cfg_file if cfg_file.is_file() else None, family=family)
    out = []
    for metric in dict.fromkeys(["ap_overall", opts.metric]):
        traj = load_trajectory(paths, family, metric, opts.stages, lock_timeout_s)
        result = plot_trajectory(traj, opts)
        figure_parts.apply_figsize(result.figure, opts)
        png = figure_parts.png_bytes(result.figure, opts.dpi)
        path = figure_parts.write_atomically(out_dir / f"trajectory-{metric}.png", png)
        csv = figure_parts.write_atomically(out_dir / f"trajectory-{metric}.csv",
                                     traj.layers.to_csv(index=False, na_rep="nan").encode())
        out.append(TrajectoryOutput(metric, path, png, csv, traj, result))
    return out

