"""Seaborn plots of the attention tables of one model's run.

* ``scale``    mean entropy / max_attn / k_eff (any ``query_scale_sweep`` metric) against
               the query scale, one line per chosen head (the query-scale intervention plots);
               by default the three heads with the highest gain and the three with the
               lowest (target vs control), or every head when there are at most six.
* ``classes``  per layer, how many heads are sharp / medium / uniform (stacked bars).

Each ``plot_*`` function reads the warehouse read-only (the model's latest run unless a
run id is given), writes a PNG atomically and returns an `AttentionPlot`: the PNG path
(it is also ``os.PathLike``) and the data frame holding exactly the values drawn.
Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot. No Dagster. The command-line glue is `add_attention_plot_parser`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from warehouse.store import db
from warehouse.settings.config import warehouse_option
from warehouse.sources.names import safe_path_component
from warehouse.settings.options import add_arguments, option

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "SCALE_METRICS",
    "DEFAULT_METRICS",
    "CLASSES",
    "AttentionPlot",
    "scale_sweep_data",
    "class_counts_data",
    "default_heads",
    "coinciding_heads",
    "plot_scale_sweep",
    "draw_scale_sweep",
    "plot_attention_classes",
    "add_attention_plot_parser",
    "cmd_attention_plot",
]

# metric name -> column of query_scale_sweep (per-head means at one query scale)
SCALE_METRICS = {
    "entropy": "mean_entropy",
    "entropy_ratio": "mean_entropy_ratio",
    "max_attn": "mean_max_attn",
    "k_eff": "mean_k_eff",
    "row_std": "mean_row_std",
}
METRIC_LABELS = {
    "entropy": "mean entropy (nats)",
    "entropy_ratio": "mean entropy / log(n_keys)",
    "max_attn": "mean max attention weight",
    "k_eff": "mean k_eff (keys for 90% mass)",
    "row_std": "mean row std of weights",
}
DEFAULT_METRICS = ("entropy", "max_attn", "k_eff")
NOT_ESTIMABLE = "not estimable"  # the class bar of heads whose attention the capture cannot give
CLASSES = ("sharp", "medium", "uniform", "unknown", NOT_ESTIMABLE)
CLASS_COLORS = {"sharp": "#1f77b4", "medium": "#ff7f0e", "uniform": "#7f7f7f", "unknown": "#d9d9d9",
                NOT_ESTIMABLE: "#f2f2f2"}
#: SQL: the head's attention is estimable from its capture (rows written before `status` existed
#: count when their mean key coverage is 1, as in `warehouse.present.report_parts.head_status`)
ESTIMABLE_SQL = "coalesce(h.status IN ('exact', 'partial'), h.mean_key_coverage = 1.0, false)"
DEFAULT_OUTPUT_DIR = Path("results") / "plots"
N_DEFAULT_EACH = 3  # default heads: this many highest-gain and lowest-gain heads
#: scale plot: curves closer than this fraction of a panel's value range at every scale look identical
COINCIDE_REL_TOL = 0.01
# colour-blind-safe (Okabe-Ito), neighbours far apart
HEAD_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000", "#E69F00", "#56B4E9")
HEAD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
HEAD_DASHES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


@dataclass(frozen=True)
class AttentionPlot:
    path: Path  # the PNG
    data: pd.DataFrame  # exactly the values drawn
    run_id: str
    kind: str

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def png(self) -> bytes:
        return self.path.read_bytes()


# --------------------------------------------------------------------------- data


def _run_and_frame(warehouse, model: str, run_id: str | None, query: str, timeout_s: float):
    from warehouse.present.validation import resolve_run_id

    with db.reader(warehouse, timeout_s) as con:
        run_id = resolve_run_id(con, model, run_id)
        df = con.execute(query, {"m": model, "r": run_id}).df()
    return run_id, df


def _head_label(layer, q_head) -> str:
    return f"L{int(layer)} H{int(q_head)}"


def default_heads(summary: pd.DataFrame, n_each: int = N_DEFAULT_EACH) -> list[tuple[int, int]]:
    """Every head when there are at most 2 * n_each, else the n_each highest-gain and the
    n_each lowest-gain heads (NaN gains last), in (layer, q_head) order."""
    import pandas as pd

    heads = summary[["layer", "q_head", "gain"]].copy()
    if len(heads) > 2 * n_each:
        ok = heads.dropna(subset=["gain"]).sort_values(["gain", "layer", "q_head"])
        keep = pd.concat([ok.head(n_each), ok.tail(n_each)])
        if len(keep) < 2 * n_each:
            keep = pd.concat([keep, heads.drop(keep.index).head(2 * n_each - len(keep))])
        heads = keep.drop_duplicates()
    return sorted((int(a), int(b)) for a, b in zip(heads["layer"], heads["q_head"]))


def scale_sweep_data(
    warehouse: str | os.PathLike,
    model: str,
    run_id: str | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    timeout_s: float = 60.0,
) -> tuple[str, pd.DataFrame]:
    """(run id, long frame: layer, q_head, k_head, head, gain, scale, metric, value), one row per
    (head, scale, metric), ordered by head, metric, scale."""
    import pandas as pd

    unknown = [m for m in metrics if m not in SCALE_METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SCALE_METRICS)}")
    cols = ", ".join(f"s.{SCALE_METRICS[m]}" for m in dict.fromkeys(metrics))
    query = (
        f"SELECT s.layer, s.q_head, s.k_head, h.gain, {ESTIMABLE_SQL} AS estimable, s.scale, {cols} "
        "FROM query_scale_sweep s LEFT JOIN head_attention_summary h "
        "ON h.model = s.model AND h.run_id = s.run_id AND h.layer = s.layer AND h.q_head = s.q_head "
        "WHERE s.model = $m AND s.run_id = $r ORDER BY s.layer, s.q_head, s.scale"
    )
    run_id, wide = _run_and_frame(warehouse, model, run_id, query, timeout_s)
    if wide.empty:
        raise LookupError(f"run {run_id} of model {model!r} has no query-scale sweep (table query_scale_sweep); "
                          "was it analysed with `attention: false`?")
    out_of_reach = sorted({(int(a), int(b)) for a, b, e in zip(wide["layer"], wide["q_head"], wide["estimable"])
                           if not e})
    wide = wide[wide["estimable"].astype(bool)].drop(columns="estimable")
    if heads is None and wide.empty:
        raise LookupError(f"no head of run {run_id} of model {model!r} is estimable from this capture "
                          "(too few query rows see every key; see `plasticity validate`)")
    if heads is not None:
        bad = [f"{a}:{b}" for a, b in heads if (int(a), int(b)) in out_of_reach]
        if bad:
            raise LookupError(f"head(s) {', '.join(bad)} of run {run_id} are not estimable from this capture")
    available = sorted({(int(a), int(b)) for a, b in zip(wide["layer"], wide["q_head"])})
    if heads is None:
        summary = wide.drop_duplicates(["layer", "q_head"])[["layer", "q_head", "gain"]]
        heads = default_heads(summary)
    heads = [(int(a), int(b)) for a, b in heads]
    missing = [h for h in heads if h not in available]
    if missing:
        raise LookupError(f"no sweep for head(s) {', '.join(f'{a}:{b}' for a, b in missing)} "
                          f"(heads: {', '.join(f'{a}:{b}' for a, b in available)})")
    keep = pd.MultiIndex.from_frame(wide[["layer", "q_head"]].astype(int)).isin(heads)
    wide = wide[keep]
    long = wide.melt(id_vars=["layer", "q_head", "k_head", "gain", "scale"],
                     value_vars=[SCALE_METRICS[m] for m in dict.fromkeys(metrics)],
                     var_name="metric", value_name="value")
    long["metric"] = long["metric"].map({v: k for k, v in SCALE_METRICS.items()})
    long["head"] = [_head_label(a, b) for a, b in zip(long["layer"], long["q_head"])]
    order = {m: i for i, m in enumerate(dict.fromkeys(metrics))}
    long = long.assign(_m=long["metric"].map(order)).sort_values(["layer", "q_head", "_m", "scale"])
    long = long.drop(columns="_m").reset_index(drop=True)
    cols_out = ["layer", "q_head", "k_head", "head", "gain", "scale", "metric", "value"]
    return run_id, long[cols_out]


def class_counts_data(warehouse: str | os.PathLike, model: str, run_id: str | None = None,
                      timeout_s: float = 60.0) -> tuple[str, pd.DataFrame]:
    """(run id, frame: layer, sharp, medium, uniform[, unknown][, not estimable], heads): heads per
    class and layer; heads whose attention is not estimable from the capture have their own column."""
    import pandas as pd

    query = (f"SELECT layer, q_head, attn_class, {ESTIMABLE_SQL} AS estimable FROM head_attention_summary h "
             "WHERE model = $m AND run_id = $r ORDER BY layer, q_head")
    run_id, df = _run_and_frame(warehouse, model, run_id, query, timeout_s)
    if df.empty:
        raise LookupError(f"run {run_id} of model {model!r} has no attention summaries (table "
                          "head_attention_summary); was it analysed with `attention: false`?")
    cls = df["attn_class"].where(df["attn_class"].isin(CLASSES), "unknown")
    cls = cls.where(df["estimable"].astype(bool), NOT_ESTIMABLE)
    counts = pd.crosstab(df["layer"].astype(int), cls).reindex(columns=list(CLASSES), fill_value=0)
    for optional in ("unknown", NOT_ESTIMABLE):
        if counts[optional].sum() == 0:
            counts = counts.drop(columns=optional)
    counts = counts.astype(int)
    counts["heads"] = counts.sum(axis=1)
    counts.columns.name = None
    return run_id, counts.reset_index().rename(columns={"index": "layer"})


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write the figure atomically, in the format of the path's extension (PNG, PDF or SVG)."""
    from warehouse.present.figure_parts import save_figure

    return save_figure(fig, path, dpi)


def coinciding_heads(data: pd.DataFrame, rel_tol: float = COINCIDE_REL_TOL) -> dict[str, list[str]]:
    """For every head of a `scale_sweep_data` frame, the other heads whose curves coincide with
    its own: heads a and b coincide when, in every metric, ``max_scale |a - b| <= rel_tol * range``
    (``range`` = max - min of that metric over all heads and scales, or 1 when it is 0), i.e. they
    would be drawn on top of each other. Groups are closed transitively (a ~ b and b ~ c put a,
    b, c together). Heads in (layer, q_head) order."""
    import numpy as np

    heads = list(dict.fromkeys(data.sort_values(["layer", "q_head"])["head"]))
    wide = data.pivot_table(index="head", columns=["metric", "scale"], values="value", aggfunc="first").loc[heads]
    values = wide.to_numpy(dtype=np.float64)
    metric_of = wide.columns.get_level_values("metric").to_numpy()
    span = np.ones(values.shape[1])
    for m in set(metric_of):
        cols = metric_of == m
        finite = values[:, cols][np.isfinite(values[:, cols])]
        rng = float(finite.max() - finite.min()) if finite.size else 0.0
        span[cols] = rng if rng > 0 else 1.0
    diff = np.abs(values[:, None, :] - values[None, :, :]) / span
    both_nan = np.isnan(values[:, None, :]) & np.isnan(values[None, :, :])
    close = np.all(np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf)) <= rel_tol, axis=2)
    group = list(range(len(heads)))  # union-find over the "close" relation

    def root(i):
        while group[i] != i:
            i = group[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        group[root(int(j))] = root(int(i))
    return {h: [o for j, o in enumerate(heads) if j != i and root(j) == root(i)] for i, h in enumerate(heads)}


def plot_scale_sweep(
    warehouse: str | os.PathLike,
    model: str,
    run_id: str | None,
    out_path: str | os.PathLike,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    dpi: int = 110,
    timeout_s: float = 60.0,
) -> AttentionPlot:
    """`draw_scale_sweep` of the run's sweep (`scale_sweep_data`), written to ``out_path``."""
    run_id, data = scale_sweep_data(warehouse, model, run_id, heads, metrics, timeout_s)
    fig = draw_scale_sweep(data, list(dict.fromkeys(metrics)), f"{model}: attention vs query scale (run {run_id})")
    return AttentionPlot(_save_png(fig, out_path, dpi), data, run_id, "scale")


def draw_scale_sweep(data: pd.DataFrame, metrics: Sequence[str], title: str):
    """One panel per metric: the per-head mean against the query scale (log axis), one line per
    head with its own colour, marker and dash, labelled with its gain (slope of mean max_attn vs
    log scale). Heads whose curves coincide (`coinciding_heads`) are named together in the legend,
    and their open markers of different shapes and sizes stay visible on top of each other."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.lines import Line2D

    gains = dict(data.drop_duplicates("head")[["head", "gain"]].itertuples(index=False))
    order = list(dict.fromkeys(data.sort_values(["layer", "q_head"])["head"]))
    same = coinciding_heads(data)
    palette = HEAD_COLORS if len(order) <= len(HEAD_COLORS) else sns.color_palette("husl", len(order))
    style = {h: {"color": palette[i], "marker": HEAD_MARKERS[i % len(HEAD_MARKERS)],
                 "linestyle": HEAD_DASHES[i % len(HEAD_DASHES)], "markersize": 9.0 - 4.0 * i / max(1, len(order) - 1),
                 "markerfacecolor": "none", "markeredgewidth": 1.4, "linewidth": 1.5}
             for i, h in enumerate(order)}
    scales = sorted(data["scale"].unique())
    fig = _figure(4.2 * len(metrics) + 2.8, 4.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        sub = data[data["metric"] == metric]
        for h in order:
            g = sub[sub["head"] == h].sort_values("scale")
            ax.plot(g["scale"], g["value"], label=h, **style[h])
        ax.set_xscale("log")
        ax.set_xticks(scales)
        ax.set_xticklabels([f"{s:g}" for s in scales])
        ax.minorticks_off()
        ax.set_xlabel("query scale s (q -> s q)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(True, alpha=0.3)

    def label(h):
        gain = f"gain {gains[h]:.3f}" if pd.notna(gains[h]) else "gain n/a"
        others = same[h]
        if not others:
            return f"{h} ({gain})"
        names = ", ".join(others) if len(others) <= 3 else f"{len(others)} other heads"
        return f"{h} ({gain}) = {names}"

    handles = [Line2D([], [], label=label(h), **style[h]) for h in order]
    n_shared = sum(1 for h in order if same[h])
    legend_title = "head (gain)" + (f"\n'= ...': coinciding curves ({n_shared} of {len(order)} heads)"
                                    if n_shared else "")
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                    fontsize="small", title=legend_title, title_fontsize="small")
    fig.suptitle(title)
    return fig


def plot_attention_classes(
    warehouse: str | os.PathLike,
    model: str,
    run_id: str | None,
    out_path: str | os.PathLike,
    *,
    dpi: int = 110,
    timeout_s: float = 60.0,
) -> AttentionPlot:
    """Stacked bars per layer: how many heads are sharp / medium / uniform (entropy_ratio classes),
    and how many are not estimable from the capture."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    run_id, counts = class_counts_data(warehouse, model, run_id, timeout_s)
    classes = [c for c in CLASSES if c in counts.columns]
    long = counts.melt(id_vars="layer", value_vars=classes, var_name="attn_class", value_name="n_heads")
    layers = counts["layer"].tolist()
    fig = _figure(max(6.5, 0.45 * len(layers) + 3.5), 4.5)
    ax = fig.subplots()
    sns.histplot(data=long, x="layer", weights="n_heads", hue="attn_class", hue_order=classes,
                 multiple="stack", discrete=True, shrink=0.8, palette=CLASS_COLORS, ax=ax, alpha=1.0)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("heads")
    ax.set_ylim(0, max(1, int(counts["heads"].max())) * 1.08)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    leg = ax.get_legend()
    if leg is not None:
        leg.set_title("class (H / H_max)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    totals = {c: int(counts[c].sum()) for c in classes}
    fig.suptitle(f"{model}: attention classes per layer (run {run_id})\n"
                 + ", ".join(f"{totals[c]} {c}" for c in classes) + f" of {int(counts['heads'].sum())} heads")
    path = _save_png(fig, out_path, dpi)
    return AttentionPlot(path, counts, run_id, "classes")


# --------------------------------------------------------------------------- command line


def _heads_arg(values: Iterable[str] | None):
    if not values:
        return None
    from warehouse.present.validation import parse_head

    return [parse_head(v) for v in values]


@dataclass
class AttentionPlotOptions:
    """Options of `plasticity attention-plot` (declared once: `warehouse.settings.options`)."""

    kind: str = option(None, positional=True, choices=("scale", "classes"), metavar="{scale,classes}",
                       help="scale: metrics against the query scale; classes: head classes per layer")
    model: str = option(None, required=True, help="model in the warehouse")
    run_id: str | None = option(None, help="run of the model", default_text="its latest run")
    warehouse: str | None = warehouse_option()
    heads: list[str] | None = option(None, metavar="L:Q", help="scale: heads to draw, LAYER:QHEAD",
                                     default_text="the 3 highest- and 3 lowest-gain heads")
    metrics: list[str] = option(default_factory=lambda: list(DEFAULT_METRICS), choices=tuple(SCALE_METRICS),
                                help="scale: metrics, one panel each")
    output: str | None = option(None, metavar="FILE", accepts="a .png, .pdf or .svg file",
                                help="output file; its extension sets the format",
                                default_text=f"{DEFAULT_OUTPUT_DIR}/<model>-attention-<kind>.png")
    dpi: int = option(110, ge=1, le=2400, help="dots per inch of raster output (PNG)")


def add_attention_plot_parser(sub) -> argparse.ArgumentParser:
    """`plasticity attention-plot {scale,classes} --model M [--run-id R] [--heads L:Q ...] [--output PNG]`."""
    p = sub.add_parser(
        "attention-plot", help="plot attention metrics vs query scale, or attention classes per layer (docs/method.md#attention-patterns)",
        description="scale: mean entropy / max_attn / k_eff against the query scale for chosen heads (default: "
                    "the 3 highest- and 3 lowest-gain heads). classes: per layer, how many heads are sharp, "
                    "medium or uniform. Reads the warehouse (the model's latest run unless --run-id).",
    )
    add_arguments(p, AttentionPlotOptions)
    p.set_defaults(func=cmd_attention_plot)
    return p


def cmd_attention_plot(args: argparse.Namespace) -> int:
    from warehouse.present.figure_parts import figure_format
    from warehouse.store.db import reading_warehouse

    out = args.output or DEFAULT_OUTPUT_DIR / f"{safe_path_component(args.model, '--model')}-attention-{args.kind}.png"
    figure_format(out)  # a wrong extension stops before anything is read
    warehouse = reading_warehouse(args.warehouse, args.model)
    if args.kind == "scale":
        res = plot_scale_sweep(warehouse, args.model, args.run_id, out, heads=_heads_arg(args.heads),
                               metrics=args.metrics, dpi=args.dpi)
        shown = sorted(set(res.data["head"]), key=lambda h: tuple(int(x[1:]) for x in h.split()))
        print(f"run {res.run_id}: {len(shown)} head(s): {', '.join(shown)}")
    else:
        res = plot_attention_classes(warehouse, args.model, args.run_id, out, dpi=args.dpi)
        print(f"run {res.run_id}:")
        print(res.data.to_string(index=False))
    print(f"wrote {res.path}")
    return 0
