"""Seaborn plots of the warehouse results (the upstream toolkit's "Plotting Plasticity").

Four figures, each from a plain DataFrame so that the same code serves the
`plasticity plot` command (CSV or warehouse input) and the Dagster plot assets:

* ``curves``     per-bucket plasticity ``AP_j`` of every head (faint) and their mean (bold),
                 optionally coloured by layer (``color_by_layer``, a discrete legend) or by the
                 shape of the curve (``color_trend``: rising, falling, flat, dip, peak, mixed;
                 see `trend_class`); with ``ci``, the stored 95% intervals as bands (each head's up
                 to ``ci_max_heads`` heads, else the conservative interval of the mean,
                 `plasticity.mean_interval`), as in ``compare`` (error bars) and ``trajectory``;
* ``heatmap``    query bucket x key bucket plasticity, aggregated over heads (``agg`` mean|median);
* ``components`` mean share of "linear positional information" per query dimension (the
                 head's own basis), after normalising each head's weights to sum to 1, with a
                 95% bootstrap interval of the mean over heads (`bootstrap_mean_interval`);
* ``compare``    ``ap_overall`` by layer, one line per model (the latest run of each);
* ``trajectory`` a family of checkpoints: a metric (default ``ap_overall``) against the training step,
                 one line per layer (or head) with its 95% interval band, beside a layer x checkpoint heatmap
                 (`warehouse.present.trajectory_plots`).

Bucket positions follow the upstream convention: the START of each bucket,
``bucket * bucket_min_size`` for uniform buckets and ``2**bucket * bucket_min_size``
for log buckets.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot, so nothing here touches a GUI backend or global figure state.
The options, the data and the transforms are in `warehouse.present.plot_data`; the parts every figure
shares in `warehouse.present.figure_parts`. No Dagster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from warehouse.present.figure_parts import (MEAN_BAND_TEXT, TREND_COLORS, PlotResult, _figure, _fmt_pos, _label,
                                            _layer_key, _legend_outside, _position_label, band_caption, band_handle,
                                            categorical_colors, draw_band, head_colors, head_label, layer_colors,
                                            title_and_caption)
from warehouse.present.plot_data import (BOOTSTRAP_RESAMPLES, BUCKET_COLUMNS, CI_LEVEL, COMPONENT_COLUMNS,
                                         NO_INTERVALS_CSV, NO_INTERVALS_RUN, TREND_TOL, PlotOptions, bucket_curves,
                                         bucket_interval_table, bucket_start, component_means, head_interval_bars,
                                         head_trends, heatmap_matrix, layer_mean_interval_bars, layer_means,
                                         load_bucket_intervals, load_comparison, load_run_table, read_csv)


def plot_plasticity_curves(cells: pd.DataFrame, opts: PlotOptions,
                           intervals: pd.DataFrame | None = None) -> PlotResult:
    """Every head's AP_j (faint) and the mean over heads (bold) against the query bucket start; with
    `opts.ci`, the stored 95% interval of each head's AP_j (`intervals`: `load_bucket_intervals`) when
    at most `ci_max_heads` heads are drawn, else the conservative interval of the mean
    (`plasticity.mean_interval.mean_interval_bound`). `intervals` None: a CSV source, no bands."""
    import seaborn as sns
    from matplotlib.lines import Line2D

    from plasticity.mean_interval import mean_interval_bound

    opts.validate("curves")
    curves = bucket_curves(cells)
    if curves.empty:
        raise ValueError("no bucket plasticity rows to plot")
    curves["position"] = bucket_start(curves["q_bucket"], opts.bucket_type, opts.bucket_min_size)
    heads = curves.groupby(["layer", "q_head", "k_head"], sort=True)
    n_heads = heads.ngroups
    drawn = bucket_interval_table(curves.dropna(subset=["plasticity"]), intervals)
    per_head = opts.ci and n_heads <= opts.ci_max_heads
    fig = _figure(9.0, 5.0)
    ax = fig.add_subplot()
    trends = head_trends(curves) if opts.color_trend else None
    colors = layer_colors(curves["layer"].unique()) if opts.color_by_layer else None
    own_colors = head_colors((k for k, _ in heads), opts.palette) if per_head and colors is None and trends is None else None
    with_band = 0
    for key, g in drawn.groupby(["layer", "q_head", "k_head"], sort=True):
        if colors is not None:
            color, alpha = colors[int(key[0])], 0.75
        elif trends is not None:
            color, alpha = TREND_COLORS[trends[key]], 0.75
        elif own_colors is not None:
            color, alpha = own_colors[key], 0.9
        else:
            color, alpha = "0.45", 0.25
        ax.plot(g["position"], g["plasticity"], color=color, alpha=alpha, linewidth=0.9,
                label=head_label(key[0], key[1]))
        if per_head:
            with_band += draw_band(ax, g["position"], g["ap_ci_low"], g["ap_ci_high"], color,
                                   f"ci {head_label(key[0], key[1])}")
    mean = (curves.groupby("q_bucket", sort=True)
            .agg(position=("position", "first"), mean_plasticity=("plasticity", "mean"),
                 median_plasticity=("plasticity", "median"), n_heads=("plasticity", "count"))
            .reset_index())
    band_mode, n_without = None, 0
    if per_head and with_band:
        band_mode, n_without = "heads", drawn.groupby(["layer", "q_head", "k_head"]).ngroups - with_band
    elif opts.ci and not per_head:
        wide = {c: drawn.pivot(index="q_bucket", columns=["layer", "q_head", "k_head"], values=c)
                .reindex(mean["q_bucket"]) for c in ("plasticity", "ap_se", "ap_se_df")}
        _, se_bound, low, high = mean_interval_bound(wide["plasticity"], wide["ap_se"], wide["ap_se_df"])
        mean = mean.assign(mean_se_bound=se_bound, mean_ci_low=low, mean_ci_high=high)
        if draw_band(ax, mean["position"], low, high, "black", "ci mean"):
            band_mode, n_without = "mean", int((~np.isfinite(low)).sum())
    sns.lineplot(data=mean, x="position", y="mean_plasticity", ax=ax, color="black", linewidth=2.6,
                 marker="o", markersize=4, errorbar=None, legend=False)
    mean_handle = Line2D([], [], color="black", linewidth=2.6, marker="o", markersize=4, label="mean over heads")
    extra_handles = [mean_handle] + ([band_handle(band_mode)] if band_mode else [])
    if opts.bucket_type == "log":
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(_position_label(opts, "query"))
    ax.set_ylabel("attention plasticity $AP_j$")
    title = f"{_label(opts)} per-bucket attention plasticity ({n_heads} heads)".strip()
    reason = None if band_mode or not opts.ci else (
        NO_INTERVALS_CSV if intervals is None else
        NO_INTERVALS_RUN if intervals.empty else "no finite standard error (too few examples)")
    caption = title_and_caption(ax, opts, title, band_caption(band_mode, n_without, reason))
    if colors is not None:
        per_layer = {int(la): int(n) for la, n in
                     curves.drop_duplicates(["layer", "q_head", "k_head"]).groupby("layer").size().items()}
        _layer_key(fig, ax, colors, per_layer, *extra_handles)
    elif trends is not None:
        counts = trends.value_counts()
        handles = [Line2D([], [], color=c, linewidth=2, label=f"{t} ({int(counts[t])})")
                   for t, c in TREND_COLORS.items() if t in counts.index]
        _legend_outside(ax, handles + extra_handles, title=f"curve shape (heads)\nchanges <= {TREND_TOL:g} ignored")
    elif own_colors is not None:
        handles = [Line2D([], [], color=c, linewidth=2, label=head_label(k[0], k[1])) for k, c in own_colors.items()]
        _legend_outside(ax, handles + extra_handles, title="head")
    else:
        _legend_outside(ax, extra_handles)
    sns.despine(ax=ax)
    extra = {"trends": trends.value_counts().to_dict()} if trends is not None else {}
    extra["bands"] = band_mode
    return PlotResult(fig, mean, int(len(cells)), n_heads, extra, caption)


def plot_bucket_heatmap(cells: pd.DataFrame, opts: PlotOptions) -> PlotResult:
    """q bucket x k bucket plasticity, aggregated over heads with `agg`."""
    import seaborn as sns

    opts.validate("heatmap")
    matrix = heatmap_matrix(cells, opts.agg)
    if matrix.empty:
        raise ValueError("no bucket plasticity rows to plot")
    q_pos = bucket_start(matrix.index.to_numpy(), opts.bucket_type, opts.bucket_min_size)
    k_pos = bucket_start(matrix.columns.to_numpy(), opts.bucket_type, opts.bucket_min_size)
    labelled = matrix.copy()
    labelled.index = [_fmt_pos(x) for x in q_pos]
    labelled.columns = [_fmt_pos(x) for x in k_pos]
    n = max(matrix.shape)
    size = min(12.0, max(5.0, 0.35 * n + 3.0))
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    sns.heatmap(labelled, ax=ax, cmap=opts.cmap, vmin=opts.vmin, vmax=opts.vmax, mask=labelled.isna(),
                square=True, linewidths=0.0, cbar_kws={"label": f"attention plasticity ({opts.agg} over heads)"},
                annot=n <= 12, fmt=".2f", annot_kws={"fontsize": 7})
    ax.set_xlabel(_position_label(opts, "key"))
    ax.set_ylabel(_position_label(opts, "query"))
    n_heads = int(cells.groupby(["layer", "q_head", "k_head"]).ngroups)
    title_and_caption(ax, opts, f"{_label(opts)} bucket plasticity, {opts.agg} of {n_heads} heads".strip())
    summary = matrix.copy()
    summary.index.name = "q_bucket \\ k_bucket"
    return PlotResult(fig, summary.reset_index(), int(len(cells)), n_heads,
                      {"n_cells": int(matrix.notna().to_numpy().sum())})


def plot_component_weights(weights: pd.DataFrame, opts: PlotOptions) -> PlotResult:
    """Bars of the mean normalised weight of every query dimension, with the 95% bootstrap
    interval of the mean over heads as error bars (always within [0, 1])."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    opts.validate("components")
    if weights.empty:
        raise ValueError("no component weight rows to plot")
    means = component_means(weights)
    if opts.max_components is not None:
        means = means[means["component"] < opts.max_components]
        if means.empty:
            raise ValueError(f"no component below max_components={opts.max_components}")
    d = len(means)
    fig = _figure(min(16.0, max(6.0, 0.12 * d + 4.0)), 4.8)
    ax = fig.add_subplot()
    x = means["component"].to_numpy()
    mean = means["mean_weight"].to_numpy()
    ax.bar(x, mean, width=0.8, color="#4c72b0")
    ax.errorbar(x, mean, yerr=np.vstack([mean - means["ci_low"].to_numpy(), means["ci_high"].to_numpy() - mean]),
                fmt="none", ecolor="0.2", elinewidth=0.8, capsize=2.0 if d <= 32 else 0.0)
    ax.set_xlim(x.min() - 0.6, x.max() + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(d + 1, 32)))
    ax.set_ylim(0.0, None)
    ax.set_xlabel("query dimension (the head's own basis)")
    ax.set_ylabel("share of linear positional information")
    n_heads = int(means["n_heads"].iloc[0])
    caption = title_and_caption(ax, opts, f"{_label(opts)} component weights, mean of {n_heads} heads".strip(),
                                f"error bars: {CI_LEVEL:.0%} bootstrap interval of the mean over heads "
                                f"({BOOTSTRAP_RESAMPLES} resamples)")
    sns.despine(ax=ax)
    return PlotResult(fig, means, int(len(weights)), n_heads, caption=caption)


#: `compare` draws up to this many models on one axes (layout auto); more get one panel each.
OVERLAY_MAX_MODELS = 4
PANEL_COLUMNS = 4


def plot_model_comparison(values: pd.DataFrame, opts: PlotOptions) -> PlotResult:
    """The metric (default ap_overall) by layer, one line per model, interquartile band over heads.

    For ap_overall with `opts.ci` and stored intervals (columns ci_low, ci_high, se, se_df of
    `load_comparison`): error bars of each head's stored 95% interval (heads side by side around their
    layer) when at most `ci_max_heads` heads are drawn, else of the conservative interval of each layer
    mean (`plasticity.mean_interval.mean_interval_bound`). Other metrics have no standard error: no bars."""
    import seaborn as sns

    opts.validate("compare")
    if values.empty:
        raise ValueError("no head metrics to compare")
    data = values.dropna(subset=["value"]).copy()
    depth = data.groupby("model")["layer"].transform("max").replace(0, 1)
    data["x"] = data["layer"] / depth if opts.normalize_depth else data["layer"]
    models = sorted(data["model"].unique())
    # one colour per model for every figure of the warehouse: from the list of all its models, so a model
    # keeps its colour whichever others a figure shows
    everyone = sorted(set(values.attrs.get("all_models", [])) | set(models))
    palette = {m: c for m, c in categorical_colors(everyone, opts.palette).items() if m in models}
    panels = opts.layout == "panels" or (opts.layout == "auto" and len(models) > OVERLAY_MAX_MODELS)
    if panels:  # small multiples: one panel per model, the others faint behind it, shared axes
        ncols = min(PANEL_COLUMNS, len(models))
        nrows = -(-len(models) // ncols)
        fig = _figure(2.7 * ncols + 0.8, 2.4 * nrows + 1.0)
        grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        axes_of = dict(zip(models, grid.flat))
        for extra_ax in list(grid.flat)[len(models):]:
            extra_ax.remove()
        means = data.groupby(["model", "x"], sort=True)["value"].mean().reset_index()
        for model, ax in axes_of.items():
            for other, g in means[means["model"] != model].groupby("model", sort=True):
                ax.plot(g["x"], g["value"], color="0.75", linewidth=0.8, gid=f"context {other}")
            sns.lineplot(data=data[data["model"] == model], x="x", y="value", ax=ax, color=palette[model],
                         marker="o", markersize=4, errorbar=("pi", 50), estimator="mean", legend=False)
            ax.set_title(model.replace("$", r"\$"), color=palette[model], fontsize="small")
            ax.set_xlabel("")
            ax.set_ylabel("")
        ax = grid.flat[0]
    else:
        fig = _figure(8.5, 5.0)
        ax = fig.add_subplot()
        axes_of = dict.fromkeys(models, ax)
        sns.lineplot(data=data, x="x", y="value", hue="model", style="model", ax=ax, markers=True, dashes=False,
                     errorbar=("pi", 50), estimator="mean", palette=palette, hue_order=models, style_order=models)
    caption, bar_mode, bars = "", None, pd.DataFrame(columns=["model", "x_drawn", "y", "low", "high"])
    has_intervals = opts.metric == "ap_overall" and {"ci_low", "ci_high", "se", "se_df"} <= set(data.columns)
    if opts.ci and opts.metric == "ap_overall":
        n_heads_drawn = int(data.groupby(["model", "layer", "q_head"]).ngroups)
        bar_mode = "heads" if n_heads_drawn <= opts.ci_max_heads else "mean"
        if has_intervals:
            bars = (head_interval_bars(data) if bar_mode == "heads" else layer_mean_interval_bars(data))
            bars = bars[np.isfinite(bars["low"]) & np.isfinite(bars["high"])]
        for model, g in bars.groupby("model", sort=True):
            y = g["y"].to_numpy()
            drawn = axes_of[model].errorbar(g["x_drawn"], y, yerr=np.vstack([y - g["low"], g["high"] - y]),
                                fmt="o" if bar_mode == "heads" else "none", markersize=2.5, color=palette[model],
                                ecolor=palette[model], elinewidth=1.0, capsize=2.5)
            drawn.lines[2][0].set_gid(f"ci {model}")
        missing = sorted(set(models) - set(bars["model"]))
        what = ("each head's stored 95% interval of ap_overall (heads side by side around their layer)"
                if bar_mode == "heads" else MEAN_BAND_TEXT.replace("over heads", "over the layer's heads"))
        caption = f"error bars: {what}" if not bars.empty else ""
        if missing:
            caption += ("\n" if caption else "") + f"no error bars for {', '.join(missing)}: " + (
                "no finite stored interval" if has_intervals else "no stored intervals")
        bar_mode = bar_mode if not bars.empty else None
    xlabel = "relative depth (layer / last layer)" if opts.normalize_depth else "layer"
    ylabel = f"{opts.metric} (mean over heads, band = interquartile range)"
    if panels:
        fig.supxlabel(xlabel, fontsize="medium")
        fig.supylabel(ylabel, fontsize="medium")
    else:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if not opts.normalize_depth:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if opts.metric.startswith("ap_"):
        ax.set_ylim(-0.02, 1.02)
    n_models = len(models)
    caption = title_and_caption(fig if panels else ax, opts, f"{opts.metric} by layer across {n_models} model(s)",
                                caption)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    for drawn_ax in set(axes_of.values()):
        sns.despine(ax=drawn_ax)
    summary = layer_means(values)
    n_heads = int(values.groupby(["model", "layer", "q_head"]).ngroups)
    return PlotResult(fig, summary, int(len(values)), n_heads, {"models": models, "bands": bar_mode,
                                                                "intervals": bars, "panels": panels,
                                                                "colors": palette}, caption)


def make_plot(kind: str, opts: PlotOptions, timeout_s: float = 60.0) -> tuple[PlotResult, dict]:
    """Load the data a plot needs (CSV if given, else the warehouse) and draw it.

    Returns the result and a dict describing the source (model, run_id, csv).
    """
    opts.validate(kind)
    source: dict = {}
    if kind == "compare":
        if opts.head_metrics_csv:
            df = read_csv(opts.head_metrics_csv, ("layer", "q_head", opts.metric))
            df = df.rename(columns={opts.metric: "value"})
            if "model" not in df.columns:
                df["model"] = opts.model_name or opts.model or Path(opts.head_metrics_csv).parent.name
            source["csv"] = opts.head_metrics_csv
        else:
            df = load_comparison(_need_warehouse(opts), opts.models, opts.metric, timeout_s)
            source["runs"] = df.groupby("model")["run_id"].first().to_dict() if not df.empty else {}
        return plot_model_comparison(df, opts), source
    if kind == "trajectory":
        from warehouse.store.db import expand_warehouse_paths
        from warehouse.store.families import load_trajectory
        from warehouse.present.trajectory_plots import plot_trajectory

        if not opts.family:
            raise ValueError("give family (the family of checkpoints to plot)")
        paths = expand_warehouse_paths([_need_warehouse(opts)])
        traj = load_trajectory(paths, opts.family, opts.metric, opts.stages, timeout_s)
        source.update(family=opts.family, runs=dict(zip(traj.checkpoints["model"], traj.checkpoints["run_id"])))
        return plot_trajectory(traj, opts), source
    csv = opts.component_csv if kind == "components" else opts.bucket_csv
    intervals = None  # stored AP_j intervals of the curves (a CSV has none)
    if csv:
        df = read_csv(csv, COMPONENT_COLUMNS if kind == "components" else BUCKET_COLUMNS)
        source["csv"] = csv
    else:
        if not opts.model:
            raise ValueError(f"give {'component_csv' if kind == 'components' else 'bucket_csv'} or model (+ warehouse)")
        table = "head_component_weights" if kind == "components" else "head_bucket_plasticity"
        df, run_id = load_run_table(_need_warehouse(opts), table, opts.model, opts.run_id, timeout_s)
        source.update(model=opts.model, run_id=run_id)
        if kind == "curves" and opts.ci:
            intervals = load_bucket_intervals(opts.warehouse, opts.model, run_id, timeout_s)
    if kind == "curves":
        return plot_plasticity_curves(df, opts, intervals), source
    draw = {"heatmap": plot_bucket_heatmap, "components": plot_component_weights}
    return draw[kind](df, opts), source


def _need_warehouse(opts: PlotOptions) -> str:
    if not opts.warehouse:
        raise ValueError("no warehouse given (set warehouse, or a CSV input)")
    return opts.warehouse
