"""`plasticity plot {curves,heatmap,components,compare,trajectory}`: the upstream plotting scripts as one
command, plus the trajectory of a family of checkpoints.

Options come from a YAML file (`--config configs/plots/...yaml`) overridden by
flags, with the upstream names (``--bucket_csv``, ``--bucket_type``, ``--agg``,
``--cmap``, ...; dashed spellings work too). Data: a CSV export when given, else
the warehouse (``--warehouse``, ``--model``, ``--run-id``; default the latest run).
No Dagster import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path("results") / "plots"


DATA_OPTIONS = ("warehouse", "model", "run_id", "models", "family", "stages", "bucket_csv", "component_csv",
                "head_metrics_csv")


def add_plot_parser(sub) -> argparse.ArgumentParser:
    from warehouse.settings.options import add_arguments
    from warehouse.present.plot_data import KINDS, PlotOptions

    p = sub.add_parser(
        "plot", help="draw a plot (curves, heatmap, components, compare, trajectory) of the results (PNG, PDF or SVG)",
        description="Plot per-bucket plasticity curves, the q-bucket x k-bucket heatmap, component-weight bars, "
                    "ap_overall by layer across models, or a family's trajectory through its checkpoints "
                    "(trajectory --family F; --warehouse may be a glob or a path with {model} to read one file "
                    "per model). Reads a CSV export or the warehouse. Every option can also be set in the YAML "
                    "given with --config; the command line wins.",
    )
    p.add_argument("kind", choices=KINDS, help=f"what to draw: {'|'.join(KINDS)}")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML plot config, e.g. configs/plots/synthetic-demo-heatmap.yaml (default: none)")
    add_arguments(p, PlotOptions, typed=False, spelling="both", only=("output",))
    add_arguments(p.add_argument_group("data"), PlotOptions, typed=False, spelling="both", only=DATA_OPTIONS)
    add_arguments(p.add_argument_group("presentation"), PlotOptions, typed=False, spelling="both",
                  exclude=DATA_OPTIONS + ("output",))
    p.set_defaults(func=cmd_plot)
    return p


def default_output(kind: str, opts) -> Path:
    from warehouse.present.plot_data import CONFIG_SUFFIX

    if kind == "compare":
        return DEFAULT_OUTPUT_DIR / "model-comparison.png"
    from warehouse.sources.names import safe_path_component

    if kind == "trajectory":
        family = safe_path_component(opts.family, "--family") if opts.family else "family"
        return DEFAULT_OUTPUT_DIR / f"{family}-{CONFIG_SUFFIX[kind]}.png"

    name = safe_path_component(opts.model, "--model") if opts.model else (
        safe_path_component(opts.model_name, "--model_name") if opts.model_name else "plot")
    return DEFAULT_OUTPUT_DIR / f"{name}-{CONFIG_SUFFIX[kind]}.png"


def caption_path(out: Path) -> Path:
    """fig.pdf -> fig.caption.txt, beside the figure."""
    return out.with_suffix(".caption.txt")


def cmd_plot(args: argparse.Namespace) -> int:
    from warehouse.settings.config import DEFAULT_WAREHOUSE, choose_warehouse, say_warehouse
    from warehouse.store.db import check_readable, expand_warehouse_paths
    from warehouse.store.models import bucket_plot_defaults
    from warehouse.present.plot_data import load_plot_options
    from warehouse.present.plots import make_plot
    from warehouse.present.figure_parts import apply_figsize, figure_format, save_figure, write_atomically

    from warehouse.settings.options import options_of
    from warehouse.present.plot_data import PlotOptions

    overrides = {k: getattr(args, k) for k, o in options_of(PlotOptions).items() if o.spec.cli}
    # the one rule of every command: --warehouse, else $PLASTICITY_WAREHOUSE, else the options file's key
    chosen, source = choose_warehouse(overrides.get("warehouse"), args.config, mapping_of="plot options")
    overrides["warehouse"] = chosen
    defaults = {"warehouse": DEFAULT_WAREHOUSE}
    opts = load_plot_options(args.kind, args.config, defaults=defaults, **overrides)
    out = Path(opts.output) if opts.output else default_output(args.kind, opts)  # a bad name stops before reading
    if not (opts.bucket_csv or opts.component_csv or opts.head_metrics_csv):
        say_warehouse(opts.warehouse, source, sys.stderr)
        for path in expand_warehouse_paths([opts.warehouse]):  # an old or empty file: one line, not a traceback
            check_readable(path)
    figure_format(out)  # so does an extension that is not .png, .pdf or .svg
    if opts.model and opts.warehouse and not (opts.bucket_csv or opts.component_csv):
        # the model's bucket scheme and size, as its dataset card gave them (table `models`), unless set
        defaults.update(bucket_plot_defaults(opts.warehouse, opts.model))
        opts = load_plot_options(args.kind, args.config, defaults=defaults, **overrides)
    result, source = make_plot(args.kind, opts)
    apply_figsize(result.figure, opts)
    save_figure(result.figure, out, opts.dpi)
    if opts.no_caption and result.caption:  # for the paper's own caption: the text the figure left out
        write_atomically(caption_path(out), (result.caption + "\n").encode())
    where = source.get("csv") or (
        f"model {source['model']} run {source['run_id']}" if "model" in source
        else (f"family {source['family']}: " if "family" in source else "")
        + "models " + ", ".join(f"{m} (run {r})" for m, r in source.get("runs", {}).items()))
    print(f"wrote {out}: {result.n_rows} row(s), {result.n_heads} head(s) from {where}")
    if opts.no_caption and result.caption:
        print(f"caption: {caption_path(out)}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m cli.plot curves ...`
    parser = argparse.ArgumentParser(prog="plasticity")
    add_plot_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plot", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
