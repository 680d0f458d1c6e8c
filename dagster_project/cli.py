"""`plasticity` command line: demo, analyze, sql, export, generate (+ plot, validate, ui).

Dagster is imported only by the subcommands that need it, so the analysis
commands start fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# Parallelism comes from worker processes; one BLAS thread each also keeps
# floating-point reductions the same whatever the machine (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

DEMO_ROOT = Path("data/demo")


def _format_value(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(names: list[str], rows: list[tuple], max_rows: int | None = None) -> str:
    """A plain fixed-width text table."""
    shown = rows if max_rows is None else rows[:max_rows]
    cells = [[_format_value(v) for v in r] for r in shown]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more row(s)")
    return "\n".join(lines)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from warehouse.config import config_fields

    group = parser.add_argument_group("config overrides (any YAML key)")
    for f in config_fields():
        group.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", default=None, metavar="VALUE")


def _overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def resolve_dataset(cfg) -> tuple[Path, str | None, str | None]:
    """(dataset root, model name, revision sha) for a config: a local folder, or a Hub branch.

    The root is the folder the config's `model_dir` is relative to (the snapshot root for the Hub).
    """
    if cfg.dataset_local_root:
        return Path(cfg.dataset_local_root), cfg.model, None
    if not cfg.dataset_name:
        raise ValueError("config needs dataset_local_root (a local folder) or dataset_name (+ revision) on the Hub")
    from warehouse import hub

    ref = hub.get_branch(cfg.dataset_name, cfg.revision or "main")
    shards_dir = hub.download_branch(
        cfg.dataset_name, ref.name, ref.sha, model_dir=cfg.model_dir, cache_dir=cfg.dataset_cache_dir,
        max_workers=cfg.download_max_workers,
    )
    root = shards_dir
    for _ in Path(cfg.model_dir).parts if cfg.model_dir else ():
        root = root.parent
    return root, cfg.model or ref.name, ref.sha


def _print_summary(summary) -> None:
    print(
        f"model {summary.model}  run {summary.run_id}  revision {summary.revision}\n"
        f"heads: {summary.n_heads} total, {summary.n_computed} computed, {summary.n_skipped} already done; "
        f"{summary.n_done} with results, {summary.n_errors} with errors; status {summary.status}; "
        f"{summary.seconds:.1f}s",
    )


def _print_errors(warehouse: str, model: str, run_id: str) -> None:
    from warehouse.db import read_only_query

    names, rows = read_only_query(
        warehouse,
        "SELECT layer, q_head, problem, message FROM head_errors WHERE model = $m AND run_id = $r ORDER BY layer, q_head",
        {"m": model, "r": run_id},
    )
    if rows:
        print("\nerrors:")
        print(format_table(names, rows, max_rows=20))


def cmd_analyze(args: argparse.Namespace) -> int:
    from warehouse.config import load_config
    from warehouse.export import export_csvs
    from warehouse.pipeline import analyze_dataset

    cfg = load_config(args.config, _overrides(args))
    root, model, sha = resolve_dataset(cfg)
    summary = analyze_dataset(cfg, root, model=model, revision=sha, resume=not args.fresh, progress=not args.quiet)
    _print_summary(summary)
    out = Path(cfg.output_dir) / summary.model / summary.run_id
    files = export_csvs(cfg.warehouse, summary.model, summary.run_id, out,
                        {"head_metrics": cfg.output_csv, "head_bucket_plasticity": cfg.bucket_csv,
                         "head_component_weights": cfg.component_csv})
    print(f"warehouse: {cfg.warehouse}\ncsv: " + ", ".join(str(p) for p in files.values()))
    _print_errors(cfg.warehouse, summary.model, summary.run_id)
    return 0 if summary.n_done else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from plasticity.synthetic import SyntheticSpec
    from warehouse.config import load_config
    from warehouse.db import read_only_query
    from warehouse.demo_data import read_ground_truth, write_synthetic_dataset
    from warehouse.export import export_csvs
    from warehouse.pipeline import analyze_dataset

    spec = SyntheticSpec()
    root = Path(args.data) / spec.model
    if args.regenerate or not (root / "ground_truth.json").exists():
        print(f"generating synthetic dataset {spec.model} in {root} ...")
        write_synthetic_dataset(root, spec)
    overrides = {"dataset_local_root": str(root), "model": spec.model, **_overrides(args)}
    cfg = load_config(args.config, overrides)
    summary = analyze_dataset(cfg, root, model=spec.model, resume=not args.fresh, progress=not args.quiet)
    out = Path(cfg.output_dir) / summary.model / summary.run_id
    export_csvs(cfg.warehouse, summary.model, summary.run_id, out)
    truth = {(t["layer"], t["q_head"]): t.get("ap_true") for t in read_ground_truth(root)}
    names, rows = read_only_query(
        cfg.warehouse,
        "SELECT layer, q_head, k_head, q_R2_pos, q_R2_scalar, ap_overall, ap_overall_se FROM head_metrics "
        "WHERE model = $m AND run_id = $r ORDER BY layer, q_head",
        {"m": summary.model, "r": summary.run_id},
    )
    table = [r + (truth.get((r[0], r[1])), abs(r[5] - truth[(r[0], r[1])]) if truth.get((r[0], r[1])) is not None else None) for r in rows]
    print(format_table(names + ["ap_true", "abs_err"], table))
    errs = [t[-1] for t in table if t[-1] is not None]
    if errs:
        print(f"\nmean |ap_overall - ap_true| over {len(errs)} heads: {sum(errs) / len(errs):.4f}")
    _print_summary(summary)
    print(f"warehouse: {cfg.warehouse}\ncsv: {out}/")
    print(f'try: plasticity sql "SELECT model, layer, avg(ap_overall) AS mean_ap, count(*) AS n_heads FROM latest_head_metrics GROUP BY ALL ORDER BY ALL" --warehouse {cfg.warehouse}')
    _print_errors(cfg.warehouse, summary.model, summary.run_id)
    return 0 if summary.n_errors == 0 else 1


def cmd_sql(args: argparse.Namespace) -> int:
    from warehouse.db import ReadOnlyViolation, read_only_query

    try:
        names, rows = read_only_query(args.warehouse, args.query)
    except ReadOnlyViolation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(names)
        w.writerows(rows)
    else:
        print(format_table(names, rows, max_rows=args.max_rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from warehouse.export import export_csvs

    files = export_csvs(args.warehouse, args.model, args.run_id, Path(args.out) if args.out else Path("results") / args.model)
    for table, path in files.items():
        print(f"{table}: {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from plasticity.synthetic import SyntheticSpec
    from warehouse.demo_data import write_synthetic_dataset

    spec = SyntheticSpec(
        model=args.model, num_layers=args.layers, num_q_heads=args.q_heads, num_k_heads=args.k_heads,
        head_dim=args.dim, num_examples=args.examples, seq_len=args.seq_len, bucket_size=args.bucket_size,
        capture_fraction=args.capture_fraction, seed=args.seed,
    )
    root = write_synthetic_dataset(Path(args.out), spec, with_truth=not args.no_truth)
    print(f"wrote {spec.num_layers * (spec.num_q_heads + spec.num_k_heads)} shards to {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from warehouse.config import DEFAULT_WAREHOUSE

    parser = argparse.ArgumentParser(
        prog="plasticity", description="Attention-plasticity warehouse",
        epilog="What every table and column means (formula, range, units, estimation, caveats): docs/metrics.md "
               "in the repository; the same one-line texts are DuckDB comments: plasticity sql \"SELECT table_name, "
               "column_name, comment FROM duckdb_columns() WHERE NOT internal\"")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the synthetic demo dataset, analyse it, print a summary")
    p.add_argument("--data", default=str(DEMO_ROOT), help="folder for the demo dataset (default data/demo)")
    p.add_argument("--config", default=None, help="optional YAML config")
    p.add_argument("--regenerate", action="store_true", help="rewrite the demo dataset")
    p.add_argument("--fresh", action="store_true", help="recompute every head instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="analyse one model's dataset into the warehouse and export CSVs")
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("--fresh", action="store_true", help="recompute every head instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sql", help="run a read-only SQL query on the warehouse")
    p.add_argument("query")
    p.add_argument("--warehouse", default=os.environ.get("PLASTICITY_WAREHOUSE", DEFAULT_WAREHOUSE))
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--max-rows", type=int, default=200)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("export", help="write the CSVs of a model's run")
    p.add_argument("--model", required=True)
    p.add_argument("--run-id", default=None, help="default: the model's latest run")
    p.add_argument("--out", default=None, help="default results/<model>")
    p.add_argument("--warehouse", default=os.environ.get("PLASTICITY_WAREHOUSE", DEFAULT_WAREHOUSE))
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="write a synthetic sniffer dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="synthetic")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=4)
    p.add_argument("--k-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bucket-size", type=int, default=64)
    p.add_argument("--capture-fraction", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-truth", action="store_true", help="skip the ground-truth computation")
    p.set_defaults(func=cmd_generate)

    from dagster_project.plot_cli import add_plot_parser  # no Dagster import
    from dagster_project.ui import add_ui_parser  # imports Dagster only when `ui` runs

    add_plot_parser(sub)
    add_ui_parser(sub)

    from warehouse.attention_plots import add_attention_plot_parser  # SPEC 4; seaborn only when it runs
    from warehouse.validation import add_validate_parser  # SPEC 4 validation report

    add_validate_parser(sub)
    add_attention_plot_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from warehouse.hub import HubError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, LookupError, ValueError, HubError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
