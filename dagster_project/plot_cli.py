"""`plasticity plot {curves,heatmap,components,compare}`: the upstream plotting scripts as one command.

Options come from a YAML file (`--config configs/plots/...yaml`) overridden by
flags, with the upstream names (``--bucket_csv``, ``--bucket_type``, ``--agg``,
``--cmap``, ...; dashed spellings work too). Data: a CSV export when given, else
the warehouse (``--warehouse``, ``--model``, ``--run-id``; default the latest run).
No Dagster import.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path("results") / "plots"


def _flag(parser, name: str, **kwargs) -> None:
    dashed = name.replace("_", "-")
    names = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    parser.add_argument(*names, dest=name, default=None, **kwargs)


def _bool(value: str) -> bool:
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_plot_parser(sub) -> argparse.ArgumentParser:
    from warehouse.plots import AGGREGATIONS, BUCKET_TYPES, KINDS

    p = sub.add_parser(
        "plot", help="draw a plot (curves, heatmap, components, compare) of the results to a PNG",
        description="Plot per-bucket plasticity curves, the q-bucket x k-bucket heatmap, component-weight bars, "
                    "or ap_overall by layer across models. Reads a CSV export or the warehouse.",
    )
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--config", default=None, help="YAML plot config (e.g. configs/plots/synthetic-demo-heatmap.yaml)")
    _flag(p, "output", metavar="PNG", help=f"output file (default {DEFAULT_OUTPUT_DIR}/<model>-<kind>.png)")
    g = p.add_argument_group("data")
    _flag(g, "warehouse", help="DuckDB warehouse (default $PLASTICITY_WAREHOUSE or data/warehouse.duckdb)")
    _flag(g, "model", help="model in the warehouse")
    _flag(g, "run_id", help="run of the model (default: its latest)")
    _flag(g, "models", nargs="+", help="compare: models to show (default: all)")
    _flag(g, "bucket_csv", help="head_bucket_plasticity.csv instead of the warehouse (curves, heatmap)")
    _flag(g, "component_csv", help="head_component_weights.csv instead of the warehouse (components)")
    _flag(g, "head_metrics_csv", help="head_metrics.csv instead of the warehouse (compare)")
    g = p.add_argument_group("presentation")
    _flag(g, "bucket_type", choices=BUCKET_TYPES, help="uniform (default) or log buckets")
    _flag(g, "bucket_min_size", type=float, help="bucket width (uniform) or multiplier (log)")
    _flag(g, "model_name", help="label in the title")
    _flag(g, "title")
    _flag(g, "color_by_layer", type=_bool, nargs="?", const=True, help="curves: colour heads by layer")
    _flag(g, "color_trend", type=_bool, nargs="?", const=True, help="curves: colour heads by rising/falling trend")
    _flag(g, "agg", choices=AGGREGATIONS, help="heatmap: aggregate heads with mean (default) or median")
    _flag(g, "cmap", help="heatmap colour map (default viridis)")
    _flag(g, "vmin", type=float)
    _flag(g, "vmax", type=float)
    _flag(g, "max_components", type=int, help="components: show the first N only")
    _flag(g, "metric", help="compare: head_metrics column (default ap_overall)")
    _flag(g, "normalize_depth", type=_bool, nargs="?", const=True, help="compare: x = layer / last layer")
    _flag(g, "dpi", type=int)
    p.set_defaults(func=cmd_plot)
    return p


OPTION_ARGS = (
    "output", "warehouse", "model", "run_id", "models", "bucket_csv", "component_csv", "head_metrics_csv",
    "bucket_type", "bucket_min_size", "model_name", "title", "color_by_layer", "color_trend", "agg", "cmap",
    "vmin", "vmax", "max_components", "metric", "normalize_depth", "dpi",
)


def default_output(kind: str, opts) -> Path:
    from warehouse.plots import CONFIG_SUFFIX

    if kind == "compare":
        return DEFAULT_OUTPUT_DIR / "model-comparison.png"
    name = opts.model or opts.model_name or "plot"
    return DEFAULT_OUTPUT_DIR / f"{name}-{CONFIG_SUFFIX[kind]}.png"


def cmd_plot(args: argparse.Namespace) -> int:
    from warehouse.config import DEFAULT_WAREHOUSE
    from warehouse.models import bucket_plot_defaults
    from warehouse.plots import load_plot_options, make_plot, save_png

    overrides = {k: getattr(args, k) for k in OPTION_ARGS}
    defaults = {"warehouse": os.environ.get("PLASTICITY_WAREHOUSE", DEFAULT_WAREHOUSE)}
    opts = load_plot_options(args.kind, args.config, defaults=defaults, **overrides)
    if opts.model and opts.warehouse and not (opts.bucket_csv or opts.component_csv):
        # the model's bucket scheme and size, as its dataset card gave them (table `models`), unless set
        defaults.update(bucket_plot_defaults(opts.warehouse, opts.model))
        opts = load_plot_options(args.kind, args.config, defaults=defaults, **overrides)
    result, source = make_plot(args.kind, opts)
    out = Path(opts.output) if opts.output else default_output(args.kind, opts)
    save_png(result.figure, out, opts.dpi)
    where = source.get("csv") or (
        f"model {source['model']} run {source['run_id']}" if "model" in source
        else "models " + ", ".join(f"{m} (run {r})" for m, r in source.get("runs", {}).items()))
    print(f"wrote {out}: {result.n_rows} row(s), {result.n_heads} head(s) from {where}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m dagster_project.plot_cli curves ...`
    parser = argparse.ArgumentParser(prog="plasticity")
    add_plot_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plot", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
