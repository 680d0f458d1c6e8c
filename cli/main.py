"""`plasticity` command line: demo, analyze, sql, export, generate (+ plot, validate, ui).

Dagster is imported only by the subcommands that need it, so the analysis
commands start fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

# Parallelism comes from worker processes; one BLAS thread each also keeps
# floating-point reductions the same whatever the machine (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from warehouse.settings.config import (  # noqa: E402 (after the thread settings)
    MAX_SEED, say_warehouse, warehouse_option)
from warehouse.sources.names import name_problem, terminal_safe  # noqa: E402
from warehouse.settings.options import option  # noqa: E402
from cli.tables import format_table  # noqa: E402

DEMO_ROOT = Path("data/demo")


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    from warehouse.settings.config import RunConfig
    from warehouse.settings.options import add_arguments

    group = parser.add_argument_group("config keys (each overrides the same key of --config)")
    add_arguments(group, RunConfig, typed=False, dest_prefix="cfg_", spelling="underscore", exclude=exclude)


def _overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _load_config(args: argparse.Namespace, extra: dict | None = None):
    """The run config of `analyze` / `demo`; the warehouse by `choose_warehouse`'s rule (its source is
    left in ``args.warehouse_source`` for `_say_warehouse`)."""
    from warehouse.settings.config import choose_warehouse, load_config

    overrides = {**(extra or {}), **_overrides(args)}
    cfg = load_config(args.config, overrides, overrides_from="command line")  # every config error first
    chosen, args.warehouse_source = choose_warehouse(overrides.get("warehouse"), args.config)
    if chosen is not None and chosen != cfg.warehouse:
        cfg.warehouse = chosen
        cfg.validate()
    return cfg


def resolve_dataset(cfg) -> tuple[Path, str | None, str | None, object]:
    """(dataset root, model name, revision sha, the Hub branch's files or None) for a config: a local
    folder, or a Hub branch.

    The root is the folder the config's `model_dir` is relative to (the snapshot root for the Hub). A
    streamed Hub run (``hub_download: stream``) downloads nothing here but the card: its shards come as
    the run needs them (`warehouse.run.hub_stream`).
    """
    if cfg.dataset_local_root:
        return Path(cfg.dataset_local_root), cfg.model, None, None
    if not cfg.dataset_name:
        raise ValueError("config needs dataset_local_root (a local folder) or dataset_name (+ revision) on the Hub")
    from warehouse.sources import hub

    ref = hub.get_branch(cfg.dataset_name, cfg.revision or "main")
    if cfg.model is None:  # the branch name becomes the model name, and a folder name: check it before downloading
        from warehouse.sources.names import safe_path_component

        safe_path_component(ref.name, f"model name from the Hub branch of {cfg.dataset_name} (set --model)")
    if cfg.hub_download == "stream":
        from warehouse.sources import hub_files

        files = hub_files.open_branch(cfg.dataset_name, ref.name, ref.sha,
                                      hub_files.streamed_dir(cfg.dataset_cache_dir, cfg.dataset_name, ref.sha),
                                      model_dir=cfg.model_dir)
        return files.local_dir, cfg.model or ref.name, ref.sha, files
    shards_dir = hub.download_branch(
        cfg.dataset_name, ref.name, ref.sha, model_dir=cfg.model_dir, cache_dir=cfg.dataset_cache_dir,
        max_workers=cfg.download_max_workers,
    )
    root = shards_dir
    for _ in Path(cfg.model_dir).parts if cfg.model_dir else ():
        root = root.parent
    return root, cfg.model or ref.name, ref.sha, None


def _print_summary(summary) -> None:
    print(
        f"model {summary.model}  run {summary.run_id}  revision {summary.revision}\n"
        f"heads: {summary.n_heads} total, {summary.n_computed} computed, {summary.n_skipped} already done; "
        f"{summary.n_done} with results, {summary.n_errors} with errors; status {summary.status}; "
        f"{summary.seconds:.1f}s",
    )


def _print_errors(warehouse: str, model: str, run_id: str) -> None:
    from warehouse.store.sandbox import read_only_query

    names, rows = read_only_query(
        warehouse,
        "SELECT layer, q_head, problem, message FROM head_errors WHERE model = $m AND run_id = $r ORDER BY layer, q_head",
        {"m": model, "r": run_id},
    )
    if rows:
        print("\nerrors:")
        print(format_table(names, rows, max_rows=20))


def cmd_analyze(args: argparse.Namespace) -> int:
    from warehouse.store.export import check_output_folder, export_csvs, results_dir
    from warehouse.run.pipeline import analyze_dataset

    from warehouse.store.db import warehouse_for_model

    cfg = _load_config(args)  # every config error stops here, before any file is read or folder made
    check_output_folder(cfg.output_dir, "output_dir")  # a file or /dev/null: before the run, not after it
    root, model, sha, hub_files = resolve_dataset(cfg)
    cfg.warehouse = warehouse_for_model(cfg.warehouse, model)  # {model}: this model's own file
    summary = analyze_dataset(cfg, root, model=model, revision=sha, resume=not args.fresh, progress=not args.quiet,
                              hub=hub_files)
    _print_summary(summary)
    out = results_dir(cfg.output_dir, summary.model, summary.run_id)
    files = export_csvs(cfg.warehouse, summary.model, summary.run_id, out,
                        {"head_metrics": cfg.output_csv, "head_bucket_plasticity": cfg.bucket_csv,
                         "head_component_weights": cfg.component_csv})
    say_warehouse(cfg.warehouse, args.warehouse_source)
    print("csv: " + ", ".join(str(p) for p in files.values()))
    _print_errors(cfg.warehouse, summary.model, summary.run_id)
    return 0 if summary.n_done else 1


FAMILY_HINT = "SELECT family, step, layer, n_heads, mean_ap, ci_low, ci_high FROM family_layer_trajectory ORDER BY ALL"


def cmd_demo_family(args: argparse.Namespace) -> int:
    """`plasticity demo --family`: generate the synthetic family, analyse every checkpoint, print and draw
    the trajectory next to the generator's truth."""
    from plasticity.synthetic import FamilySpec
    from warehouse.store.db import expand_warehouse_paths, warehouse_for_model
    from warehouse.sources.demo_data import family_layer_truth, write_synthetic_family
    from warehouse.store.export import check_output_folder, export_csvs, results_dir
    from warehouse.store.families import load_trajectory
    from warehouse.run.kernel_cache import sharing_cores
    from warehouse.run.pipeline import analyze_dataset
    from warehouse.present.plot_data import load_plot_options
    from warehouse.present.figure_parts import save_figure
    from warehouse.present.trajectory_plots import plot_trajectory

    fam = FamilySpec()
    root = Path(args.data) / fam.family
    configs = {}
    for step in fam.steps:  # every config error stops here, before anything is written
        model = fam.model(step)
        # the checkpoints are tiny: one process each (a worker pool per checkpoint would cost more than its heads)
        cfg = _load_config(args, {"dataset_local_root": str(root / model), "model": model, "family": fam.family,
                                  "stage": fam.stage(step), "step": step, "max_workers": 1})
        cfg.warehouse = warehouse_for_model(cfg.warehouse, model)
        configs[step] = cfg.validate()
        check_output_folder(cfg.output_dir, "output_dir")
    print(f"family {fam.family}: {len(fam.steps)} checkpoints in {root} (steps {', '.join(map(str, fam.steps))})")
    with sharing_cores():
        folders = write_synthetic_family(root, fam, regenerate=args.regenerate)
    summaries = []
    for step, cfg in configs.items():
        summary = analyze_dataset(cfg, folders[step], model=cfg.model, resume=not args.fresh, progress=not args.quiet)
        export_csvs(cfg.warehouse, summary.model, summary.run_id, results_dir(cfg.output_dir, summary.model,
                                                                              summary.run_id))
        _print_summary(summary)
        summaries.append(summary)
    warehouses = list(dict.fromkeys(cfg.warehouse for cfg in configs.values()))
    traj = load_trajectory(expand_warehouse_paths(warehouses), fam.family)
    truth = family_layer_truth(folders)
    rows = []
    for r in traj.layers.itertuples(index=False):
        true = truth[(int(r.step), int(r.layer))]
        rows.append((r.step, r.stage, r.layer, r.n_heads, r.mean_value, r.ci_low, r.ci_high, true,
                     abs(r.mean_value - true)))
    print("\nper (step, layer): mean ap_overall over the layer's heads with its 95% t-interval, and the "
          "generator's true mean (law: sigma = head_scale * (step / first step) ^ layer_rate, "
          f"layer rates {', '.join(f'{x:+g}' for x in fam.layer_rates)})")
    print(format_table(["step", "stage", "layer", "n_heads", "mean_ap", "ci_low", "ci_high", "ap_true", "abs_err"],
                       rows))
    errors = [r[-1] for r in rows]
    print(f"mean |mean_ap - ap_true| over {len(errors)} (step, layer) cells: {sum(errors) / len(errors):.4f} "
          "(the interval is the spread of the layer's heads, not the error of their mean)")
    opts = load_plot_options("trajectory", None, family=fam.family)
    out = Path(configs[fam.steps[0]].output_dir) / "plots" / f"{fam.family}-trajectory.png"
    save_figure(plot_trajectory(traj, opts).figure, out, opts.dpi)
    where = " ".join(f"--warehouse {w}" for w in warehouses)
    print(f"\nplot: {out}")
    say_warehouse(warehouses, args.warehouse_source)
    print(f'try: plasticity sql "{FAMILY_HINT}" {where}')
    print(f"     plasticity plot trajectory --family {fam.family} --metric q_R2_pos --warehouse "
          f"'{configs[fam.steps[0]].warehouse if len(warehouses) == 1 else _template(args)}'")
    return 0 if all(s.n_errors == 0 for s in summaries) else 1


def _template(args: argparse.Namespace) -> str:
    """The --warehouse value as given (e.g. with {model})."""
    from warehouse.settings.config import choose_warehouse

    return choose_warehouse(_overrides(args).get("warehouse"))[0] or "data/warehouse.duckdb"


def cmd_demo(args: argparse.Namespace) -> int:
    if args.family:
        return cmd_demo_family(args)
    from plasticity.synthetic import SyntheticSpec
    from warehouse.store.sandbox import read_only_query
    from warehouse.sources.demo_data import read_ground_truth, write_synthetic_dataset
    from warehouse.store.export import check_output_folder, export_csvs, results_dir
    from warehouse.run.kernel_cache import sharing_cores
    from warehouse.run.pipeline import analyze_dataset

    spec = SyntheticSpec()
    root = Path(args.data) / spec.model
    from warehouse.store.db import warehouse_for_model

    cfg = _load_config(args, {"dataset_local_root": str(root), "model": spec.model})  # before writing anything
    check_output_folder(cfg.output_dir, "output_dir")
    cfg.warehouse = warehouse_for_model(cfg.warehouse, spec.model)
    cfg.check_layers_exist(set(range(spec.num_layers)))
    if args.regenerate or not (root / "ground_truth.json").exists():
        print(f"generating synthetic dataset {spec.model} in {root} ...")
        with sharing_cores():
            write_synthetic_dataset(root, spec)
    summary = analyze_dataset(cfg, root, model=spec.model, resume=not args.fresh, progress=not args.quiet)
    out = results_dir(cfg.output_dir, summary.model, summary.run_id)
    export_csvs(cfg.warehouse, summary.model, summary.run_id, out)
    truth = {(t["layer"], t["q_head"]): t.get("ap_true") for t in read_ground_truth(root)}
    names, rows = read_only_query(
        cfg.warehouse,
        "SELECT layer, q_head, k_head, q_R2_pos, q_R2_scalar, ap_overall, ap_overall_se, ap_overall_ci_low, "
        "ap_overall_ci_high FROM head_metrics "
        "WHERE model = $m AND run_id = $r ORDER BY layer, q_head",
        {"m": summary.model, "r": summary.run_id},
    )
    table = []
    for r in rows:
        true = truth.get((r[0], r[1]))
        known = true is not None and r[7] is not None and r[8] is not None
        table.append(r + (true, None if true is None else abs(r[5] - true),
                          None if not known else ("yes" if r[7] <= true <= r[8] else "no")))
    print(format_table(names + ["ap_true", "abs_err", "ci_holds_truth"], table))
    errs = [t[-2] for t in table if t[-2] is not None]
    if errs:
        print(f"\nmean |ap_overall - ap_true| over {len(errs)} heads: {sum(errs) / len(errs):.4f}")
    held = [t[-1] == "yes" for t in table if t[-1] is not None]
    if held:
        print(f"95% intervals holding ap_true: {sum(held)} of {len(held)} heads ({100.0 * sum(held) / len(held):.0f}%; "
              f"ap_true averages a sample of the dataset's own key pairs, so it has a little noise of its own)")
    _print_summary(summary)
    say_warehouse(cfg.warehouse, args.warehouse_source)
    print(f"csv: {out}/")
    print(f'try: plasticity sql "SELECT model, layer, avg(ap_overall) AS mean_ap, count(*) AS n_heads FROM latest_head_metrics GROUP BY ALL ORDER BY ALL" --warehouse {cfg.warehouse}')
    _print_errors(cfg.warehouse, summary.model, summary.run_id)
    return 0 if summary.n_errors == 0 else 1


def cmd_export(args: argparse.Namespace) -> int:
    from warehouse.store.export import export_csvs
    from warehouse.sources.names import safe_path_component

    from warehouse.store.export import check_output_folder

    out = Path(args.out) if args.out else Path("results") / safe_path_component(args.model, "--model")
    check_output_folder(out, "--out")
    from warehouse.store.db import reading_warehouse

    warehouse = reading_warehouse(args.warehouse, args.model)
    files = export_csvs(warehouse, args.model, args.run_id, out)
    for table, path in files.items():
        print(f"{table}: {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from plasticity.synthetic import SyntheticSpec
    from warehouse.sources.demo_data import write_synthetic_dataset
    from warehouse.settings.options import OptionError

    if args.q_heads % args.k_heads:
        raise OptionError(f"q_heads = {args.q_heads}: must be a multiple of k_heads = {args.k_heads} (GQA)")
    spec = SyntheticSpec(
        model=args.model, num_layers=args.layers, num_q_heads=args.q_heads, num_k_heads=args.k_heads,
        head_dim=args.dim, num_examples=args.examples, seq_len=args.seq_len, bucket_size=args.bucket_size,
        capture_fraction=args.capture_fraction, seed=args.seed, structure=args.layer_plasticity,
    )
    root = write_synthetic_dataset(Path(args.out), spec, with_truth=not args.no_truth)
    print(f"wrote {spec.num_layers * (spec.num_q_heads + spec.num_k_heads)} shards to {root}")
    return 0


# --------------------------------------------------------------------------- options of the commands
# Declared once each (warehouse.settings.options): type, default, accepted values and the one-line help.


@dataclass
class RunOptions:
    """`analyze` and `demo` (besides the config keys)."""

    config: str | None = option(None, help="YAML config (configs/*.yaml); the config-key flags override its keys",
                                metavar="YAML", accepts="a file")
    fresh: bool = option(False, switch=True, help="recompute every head instead of resuming the run")
    quiet: bool = option(False, switch=True, help="no progress bar")


@dataclass
class DemoOptions:
    data: str = option(str(DEMO_ROOT), help="folder for the demo dataset", accepts="a folder")
    regenerate: bool = option(False, switch=True, help="rewrite the demo dataset")
    family: bool = option(False, switch=True,
                          help="a family of synthetic checkpoints instead: analyse each, print the trajectory next "
                               "to the truth, draw it (--warehouse may contain {model}: one file per checkpoint)")


@dataclass
class ExportOptions:
    model: str = option(None, required=True, help="model in the warehouse")
    run_id: str | None = option(None, help="run of the model", default_text="its latest run")
    out: str | None = option(None, help="folder for the CSVs", accepts="a folder", default_text="results/<model>")
    warehouse: str | None = warehouse_option()


@dataclass
class GenerateOptions:
    out: str = option(None, required=True, help="dataset folder to write", accepts="a folder")
    model: str = option("synthetic", check=name_problem, help="model name in the dataset card",
                        accepts="a name without / \\ : or control characters")
    layers: int = option(4, ge=1, help="layers")
    q_heads: int = option(4, ge=1, help="query heads per layer")
    k_heads: int = option(2, ge=1, help="key heads per layer (must divide q-heads)")
    dim: int = option(16, ge=2, help="head dimension")
    examples: int = option(16, ge=1, help="sequences captured")
    seq_len: int = option(512, ge=2, help="tokens per sequence")
    bucket_size: int = option(64, ge=1, help="positions per bucket")
    capture_fraction: float = option(1.0, gt=0, le=1, help="share of positions captured (1 = dense)")
    seed: int = option(0, ge=0, le=MAX_SEED, help="generator seed: draws the heads' plasticity (unless "
                                                  "--layer-plasticity grid) and the noise")
    layer_plasticity: str = option("random", choices=("random", "rising", "falling", "grid"),
                                   help="how plastic the heads are: random (each head drawn from the seed, AP from "
                                        "~0 to ~1), rising / falling (drawn around a level rising / falling with "
                                        "depth), grid (the demo's fixed layout; the seed changes only the noise)")
    no_truth: bool = option(False, switch=True, help="skip the ground-truth computation")


EPILOG = (
    "Every number is defined in docs/metrics.md (the metric reference) and computed as docs/method.md "
    "describes; setup and recipes are in README.md, the rest in docs/. `plasticity COMMAND --help` lists each command's options with their "
    "defaults and accepted values. Exit status: 0 done, 1 some heads or checks failed, 2 bad input "
    "(config, query, file)."
)


class CommandParser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped flag: the closest flag of the command given."""

    def parse_args(self, args=None, namespace=None):
        from warehouse.settings.options import unknown_flags_message

        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parser(parsed)
            flags = [f for action in command._actions for f in action.option_strings]
            command.error(unknown_flags_message(unknown, flags))
        return parsed

    def _command_parser(self, parsed) -> argparse.ArgumentParser:
        """The subcommand's parser (e.g. `plasticity plot`), whose flags the suggestion comes from."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None):
                return action.choices[getattr(parsed, action.dest)]
        return self


def build_parser() -> argparse.ArgumentParser:
    from warehouse.settings.options import add_arguments

    parser = CommandParser(prog="plasticity", description="Attention-plasticity warehouse", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate the synthetic demo dataset, analyse it, print a summary",
                       epilog=EPILOG)
    add_arguments(p, DemoOptions)
    add_arguments(p, RunOptions)
    _add_config_flags(p, exclude=("family", "stage", "step"))  # the demo's checkpoints name their own
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="analyse one model's dataset into the warehouse and export CSVs",
                       epilog=EPILOG)
    add_arguments(p, RunOptions)
    _add_config_flags(p)
    p.set_defaults(func=cmd_analyze)

    from cli.sql import SqlOptions, cmd_sql

    p = sub.add_parser("sql", help="run read-only SQL on the warehouse (sandboxed by DuckDB)", epilog=EPILOG)
    add_arguments(p, SqlOptions)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("export", help="write the CSVs of a model's run")
    add_arguments(p, ExportOptions)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="write a synthetic sniffer dataset")
    add_arguments(p, GenerateOptions)
    p.set_defaults(func=cmd_generate)

    from cli.plot import add_plot_parser  # no Dagster import
    from cli.upgrade import add_upgrade_parser
    from cli.ui import add_ui_parser  # imports Dagster only when `ui` runs

    add_plot_parser(sub)
    add_upgrade_parser(sub)
    add_ui_parser(sub)

    from warehouse.present.attention_plots import add_attention_plot_parser  # seaborn only when it runs
    from warehouse.present.validation import add_validate_parser  # the attention validation report

    add_validate_parser(sub)
    add_attention_plot_parser(sub)
    return parser


def _interrupt_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["demo"] and not {"-h", "--help"} & set(words):
        # a fresh machine's first demo: the kernels compile while this process imports and generates
        from warehouse.run.kernel_cache import DamagedKernelCache, start_kernel_warmup

        try:
            start_kernel_warmup()
        except DamagedKernelCache as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from warehouse.store.db import WarehouseError
    from warehouse.sources.hub import HubError

    import duckdb

    args = build_parser().parse_args(argv)
    if args.command in ("analyze", "demo", "sql") and threading.current_thread() is threading.main_thread():
        # a run stopped with SIGTERM, or by closing its terminal (SIGHUP), unwinds like Ctrl-C: the run is
        # marked interrupted, workers stop, sql removes its spill folder
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, _interrupt_on_sigterm)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `plasticity ... | head`: the reader has what it wanted; nothing more to say, and no traceback when
        # Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a command stopped by SIGPIPE
    except (FileNotFoundError, LookupError, ValueError, HubError, WarehouseError) as exc:
        print(f"error: {terminal_safe(str(exc), keep_lines=True)}", file=sys.stderr)
        return 2
    except (OSError, duckdb.IOException, duckdb.TransactionException) as exc:
        # a full disk (also when a commit cannot write its log), a vanished folder: one line, not a traceback
        from warehouse.store.db import one_line

        print(f"error: {terminal_safe(one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
