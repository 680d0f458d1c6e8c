"""The work behind each asset, as plain functions over `warehouse` and `plasticity`.

The assets in ``assets/`` only resolve their partition, call one function here
and turn the result into Dagster metadata. No Dagster import, so everything
here can be called (and tested) without an instance.

Single-writer rule: every write below is one short `warehouse.db.writer`
transaction in the calling process; the per-head compute runs in worker
processes that read shards through their own in-memory DuckDB connections
(`warehouse.pipeline.iter_outcomes`) and never open the warehouse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import pandas as pd

import sql
from dagster_project.registry import DEMO_MODEL, DatasetEntry
from warehouse import db
from warehouse.catalog import ShardInfo, infer_layout, read_dataset_card
from warehouse.config import RunConfig


class HubClient(Protocol):
    def head_sha(self, repo_id: str, branch: str) -> str: ...

    def snapshot(self, repo_id: str, branch: str, sha: str, model_dir: str | None = None) -> Path: ...

    def snapshot_path(self, repo_id: str, sha: str) -> Path: ...


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
        from warehouse.demo_data import write_synthetic_dataset

        write_synthetic_dataset(root, SyntheticSpec())
        return root
    raise FileNotFoundError(
        f"dataset folder {root} of model {entry.key!r} ({entry.config_path}) holds no lXXhYY{{q,k}}/data.parquet shards")


def open_dataset(entry: DatasetEntry, cfg: RunConfig, hub: HubClient, sha: str | None = None
                 ) -> tuple[Path, str | None]:
    """(dataset root, pinned commit sha or None for a local folder).

    A Hub branch is downloaded pinned to `sha` (default: the branch head now);
    the root returned is the snapshot folder, `cfg.model_dir` stays below it.
    """
    if not entry.is_hub:
        return ensure_local_dataset(entry, cfg), None
    sha = sha or hub.head_sha(entry.repo_id, entry.branch)
    return hub.snapshot(entry.repo_id, entry.branch, sha, cfg.model_dir), sha


def dataset_card(entry: DatasetEntry, cfg: RunConfig, hub: HubClient | None, sha: str | None) -> dict:
    """The dataset card's front matter if the dataset is on disk already (no download), else {}."""
    if entry.is_hub:
        if hub is None or not sha:
            return {}
        root = hub.snapshot_path(entry.repo_id, sha)
    else:
        root = Path(entry.local_root)
    base = root / cfg.model_dir if cfg.model_dir else root
    return read_dataset_card(base) or read_dataset_card(root)


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
    card: dict
    shards: pd.DataFrame  # the catalog rows written (without model)


def build_shard_catalog(entry: DatasetEntry, cfg: RunConfig, root: Path, sha: str | None,
                        warehouse: str, lock_timeout_s: float = 60.0) -> CatalogResult:
    """Profile every shard (SQL over Parquet, in memory) and replace the model's catalog rows."""
    from warehouse.pipeline import build_catalog, local_revision
    from warehouse.results import replace_catalog

    cat = build_catalog(root, cfg, threads=max(1, cfg.duckdb_threads))
    revision = sha or local_revision(cat.shards)
    db.ensure_schema(warehouse, lock_timeout_s)
    with db.writer(warehouse, lock_timeout_s) as con:
        replace_catalog(con, entry.key, revision, cat.shards)
    rows = pd.DataFrame([s.row() for s in cat.shards])
    return CatalogResult(
        model=entry.key, revision=revision, root=Path(root), num_layers=cat.num_layers,
        num_q_heads=cat.num_q_heads, num_k_heads=cat.num_k_heads, n_shards=len(cat.shards),
        n_query=sum(s.kind == "q" for s in cat.shards), n_key=sum(s.kind == "k" for s in cat.shards),
        n_bad=sum(s.error is not None for s in cat.shards),
        n_bucket_rows=sum(len(s.buckets) for s in cat.shards), card=cat.card, shards=rows,
    )


def catalog_revision(warehouse: str, model: str, lock_timeout_s: float = 60.0) -> str | None:
    """The dataset revision the shard catalog of `model` was built from (None: no catalog yet)."""
    if not Path(warehouse).exists():
        return None
    with db.reader(warehouse, lock_timeout_s) as con:
        row = con.execute("SELECT any_value(revision) FROM shards WHERE model = $m", {"m": model}).fetchone()
    return None if row is None else row[0]


def layout_for(shards: list[ShardInfo], cfg: RunConfig) -> tuple[int, int, int]:
    """(num_layers, num_q_heads, num_k_heads): the config's, else inferred (as `build_catalog` does)."""
    if cfg.num_q_heads is not None:
        num_layers = cfg.num_layers if cfg.num_layers is not None else infer_layout(shards)[0]
        return num_layers, cfg.num_q_heads, cfg.num_k_heads
    inferred = infer_layout(shards)
    return (cfg.num_layers if cfg.num_layers is not None else inferred[0]), inferred[1], inferred[2]


@dataclass
class HeadSamplesResult:
    model: str
    n_heads: int
    n_missing_key: int
    group_size: int
    layout: tuple[int, int, int]
    q_sample_rows: int
    k_sample_rows: int
    preview: pd.DataFrame


def refresh_head_samples(model: str, cfg: RunConfig, warehouse: str, lock_timeout_s: float = 60.0
                         ) -> HeadSamplesResult:
    """Rebuild the model's head_samples rows (GQA pairing + sample sizes) from its shard catalog, in SQL."""
    with db.writer(warehouse, lock_timeout_s) as con:
        con.execute(sql.load("head_samples_schema"))
        rows = con.execute("SELECT layer, head, kind, path FROM shards WHERE model = $m", {"m": model}).fetchall()
        if not rows:
            raise LookupError(f"no shard catalog for model {model!r} in {warehouse}: materialize shard_catalog first")
        layout = layout_for([ShardInfo(int(a), int(b), c, p) for a, b, c, p in rows], cfg)
        group = layout[1] // layout[2]
        con.execute("DELETE FROM head_samples WHERE model = $m", {"m": model})
        con.execute(
            "INSERT INTO head_samples BY NAME " + sql.load("head_samples"),
            {"model": model, "group_size": group, "cap": cfg.max_tokens_per_head, "num_layers": layout[0],
             "num_q_heads": layout[1], "layers": cfg.layers},
        )
        df = con.execute(
            "SELECT layer, q_head, k_head, q_rows, k_rows, q_sample_rows, k_sample_rows, q_dim, k_dim, "
            "sliding_window, k_path IS NULL AS missing_key FROM head_samples WHERE model = $m ORDER BY layer, q_head",
            {"m": model},
        ).df()
    return HeadSamplesResult(
        model=model, n_heads=len(df), n_missing_key=int(df["missing_key"].sum()) if len(df) else 0,
        group_size=group, layout=layout,
        q_sample_rows=int(df["q_sample_rows"].fillna(0).sum()), k_sample_rows=int(df["k_sample_rows"].fillna(0).sum()),
        preview=df,
    )


# --------------------------------------------------------------------------- analysis


def run_analysis(entry: DatasetEntry, cfg: RunConfig, root: Path, sha: str | None, *, fresh: bool = False,
                 on_outcome: Callable | None = None):
    """warehouse.pipeline.analyze_dataset for one model: heads computed in worker processes, written here."""
    from warehouse.pipeline import analyze_dataset

    return analyze_dataset(cfg, root, model=entry.key, revision=sha, resume=not fresh, progress=False,
                           on_outcome=on_outcome)


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
    from warehouse.export import latest_run_id

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
    """The SPEC section 3 CSVs of the model's latest run into <exports_dir>/<model>/<run_id>/."""
    from warehouse.export import export_csvs, latest_run_id

    with db.reader(warehouse, lock_timeout_s) as con:
        run_id = latest_run_id(con, model)
    out_dir = Path(exports_dir) / model / run_id
    files = export_csvs(warehouse, model, run_id, out_dir,
                        {"head_metrics": cfg.output_csv, "head_bucket_plasticity": cfg.bucket_csv,
                         "head_component_weights": cfg.component_csv}, timeout_s=lock_timeout_s)
    rows = {}
    for table, path in files.items():
        with open(path) as fh:
            rows[table] = max(0, sum(1 for _ in fh) - 1)
    preview = pd.read_csv(files["head_metrics"], nrows=20) if rows.get("head_metrics") else None
    return ExportResult(model, run_id, out_dir, files, rows, preview)


# --------------------------------------------------------------------------- plots


def card_plot_defaults(card: dict) -> dict:
    """bucket_type / bucket_min_size from a dataset card (qk-sniffer and our synthetic cards)."""
    from warehouse.plots import BUCKET_TYPES

    out = {}
    bucket_type = card.get("bucket_type")
    if bucket_type in BUCKET_TYPES:
        out["bucket_type"] = bucket_type
    size = card.get("bucket_min_size", card.get("bucket_size"))
    try:
        if size is not None and float(size) > 0:
            out["bucket_min_size"] = float(size)
    except (TypeError, ValueError):
        pass
    return out


@dataclass
class PlotOutput:
    kind: str
    path: Path
    png: bytes
    result: object  # warehouse.plots.PlotResult
    source: dict
    config_file: Path | None


def render_plot(kind: str, warehouse: str | list[str], out_path: Path, plot_configs_dir: Path,
                model: str | None = None, defaults: dict | None = None, lock_timeout_s: float = 60.0) -> PlotOutput:
    """Draw one plot from the warehouse (latest run of `model`) with configs/plots/<model>-<kind>.yaml if present.

    For the comparison, `warehouse` may be several files (one per model); their latest runs are combined.
    """
    from warehouse import plots

    cfg_file = plots.config_path_for(plot_configs_dir, kind, model)
    cfg_file = cfg_file if cfg_file.is_file() else None
    opts = plots.load_plot_options(kind, cfg_file, defaults=defaults)
    # the asset always plots the warehouse's latest run, whatever data source the YAML names
    paths = [warehouse] if isinstance(warehouse, (str, os.PathLike)) else list(warehouse)
    opts.warehouse, opts.bucket_csv, opts.component_csv, opts.head_metrics_csv = str(paths[0]) if paths else None, \
        None, None, None
    if kind == "compare":
        frames = [plots.load_comparison(p, opts.models, opts.metric, lock_timeout_s) for p in paths if Path(p).exists()]
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
    png = plots.png_bytes(result.figure, opts.dpi)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    tmp.replace(out_path)
    return PlotOutput(kind, out_path, png, result, source, cfg_file)
