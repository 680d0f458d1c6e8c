"""The ``trajectory`` plot: how a metric of every layer moves through the checkpoints of a family.

Left panel, one design for every metric: the metric (default ``ap_overall``) against the training step,
each head a faint line in its layer's colour (viridis, a sequential palette in layer order) and each
layer's mean a bold line; the step axis is logarithmic by default. Bands (option ``ci``): for ``ap_overall``, from the
stored standard errors (``family_head_trajectory``): each head's 95% interval when at most
``ci_max_heads`` heads are drawn, else the conservative interval of each layer mean
(`plasticity.mean_interval.mean_interval_bound`), as the curves plot does; for other metrics (no
standard error) the 95% t-interval of the layer mean over its heads (``family_layer_metric_trajectory``:
the heads' spread). Checkpoints of
different stages get different markers. Right panel: the same means as a layer x checkpoint heatmap,
checkpoints in step order. Same conventions as `warehouse.present.plots` (`warehouse.present.figure_parts`): legends outside the axes, a discrete
layer key, Okabe-Ito / viridis colours, an Agg figure (no pyplot).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from warehouse.store.families import Trajectory
from warehouse.present.plot_data import NO_INTERVALS_RUN, PlotOptions, group_mean_intervals
from warehouse.present.figure_parts import (PlotResult, _figure, _layer_key, band_caption, band_handle,
                                            title_and_caption,
                                            draw_band, head_label, layer_colors)

#: Marker of each stage, in order of first appearance along the step axis.
STAGE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Metrics in [0, 1]: the heatmap colour scale is fixed to [0, 1] for them.
UNIT_INTERVAL_METRICS = ("ap_overall", "q_R2_pos", "q_R2_scalar", "mean_entropy_ratio", "mean_max_attn",
                         "mean_key_coverage", "q_noise_frac_ks_p_lt_alpha")


def checkpoint_label(step: int, stage: str | None) -> str:
    """Column label of a checkpoint: its step, and its stage below when it has one."""
    return f"{int(step)}" if stage is None or pd.isna(stage) else f"{int(step)}\n{stage}"


def layer_by_checkpoint(layers: pd.DataFrame) -> pd.DataFrame:
    """Layer means as a matrix: one row per layer (ascending), one column per checkpoint in step order
    (labelled by `checkpoint_label`); NaN where a layer has no finite value at a checkpoint."""
    ordered = layers.sort_values(["step", "model", "layer"])
    labels = {m: checkpoint_label(st, sg) for m, st, sg in
              ordered[["model", "step", "stage"]].drop_duplicates().itertuples(index=False)}
    matrix = ordered.pivot_table(index="layer", columns="model", values="mean_value", sort=False, dropna=False)
    matrix = matrix.reindex(columns=list(labels)).sort_index()
    matrix.columns = [labels[m] for m in matrix.columns]
    return matrix


#: The heads' lines are faint and thin, the layer means bold: the mean reads first, the spread behind it.
HEAD_ALPHA, HEAD_WIDTH, MEAN_WIDTH = 0.3, 0.8, 2.4


def stage_label(stage: str) -> str:
    """Legend text of a stage: its name, with "stage" in front unless the name already says it
    (a stage named "stage1" reads "stage1", not "stage stage1")."""
    if not stage:
        return "stage (none)"
    return stage if stage.lower().startswith("stage") else f"stage {stage}"


def _head_values(traj: Trajectory) -> pd.DataFrame:
    """Every head's value at every checkpoint shown, by step: layer, q_head, step, value."""
    heads = traj.heads.drop(columns=[c for c in ("step", "stage") if c in traj.heads.columns])
    heads = heads.merge(traj.checkpoints[["model", "step"]], on="model")
    return heads.sort_values(["layer", "q_head", "step"])


#: Caption of the other metrics' band (they have no standard error).
SPREAD_BAND_TEXT = "band: 95% t-interval of the mean over the layer's heads (their spread, not estimation error)"


def layer_mean_intervals(head_intervals: pd.DataFrame) -> pd.DataFrame:
    """The conservative interval of every (checkpoint, layer) mean of ap_overall over its heads with a
    finite value (`group_mean_intervals` of their stored SEs): model, layer, mean, se_bound, low, high."""
    return group_mean_intervals(head_intervals, ["model", "layer"], "ap_overall", "ap_overall_se", "ap_se_df")


def _step_axis(ax, steps: np.ndarray, axis: str) -> str:
    """Scale the x axis; returns the axis label's note."""
    if axis == "linear":
        return "training step"
    positive = steps[steps > 0]
    if positive.size == 0:
        return "training step"  # only step 0: nothing to put on a log scale
    if (steps == 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=1.0)
        return f"training step (log; linear below {int(positive.min())})"
    ax.set_xscale("log")
    return "training step (log)"


def plot_trajectory(traj: Trajectory, opts: PlotOptions) -> PlotResult:
    """The family's metric per layer against the training step (lines + interval bands), and the
    layer x checkpoint heatmap of the same means."""
    import seaborn as sns
    from matplotlib.lines import Line2D

    opts.validate("trajectory")
    layers = traj.layers.sort_values(["layer", "step", "model"])
    if layers.empty:
        raise ValueError(f"family {traj.family!r}: no values of {traj.metric} to plot")
    checkpoints = traj.checkpoints
    stages = list(dict.fromkeys("" if pd.isna(s) else s for s in checkpoints["stage"]))
    markers = {s: STAGE_MARKERS[i % len(STAGE_MARKERS)] for i, s in enumerate(stages)}
    colors = layer_colors(layers["layer"].unique())
    matrix = layer_by_checkpoint(traj.layers)

    n_ckpt, n_layers = len(checkpoints), len(colors)
    fig = _figure(min(20.0, 9.0 + 0.45 * n_ckpt), max(5.0, min(12.0, 2.5 + 0.28 * n_layers)))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.35, max(1.0, 0.12 * n_ckpt + 0.6)])
    ax, hm = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])

    is_ap = traj.metric == "ap_overall" and traj.head_intervals is not None
    n_heads_drawn = int(traj.heads.groupby(["layer", "q_head"]).ngroups)
    per_head = opts.ci and is_ap and n_heads_drawn <= opts.ci_max_heads
    caption, band_mode, n_without = "", None, 0
    # One design for every metric: each head a faint line in its layer's colour, the layer's mean bold
    heads = _head_values(traj)
    for (layer, q_head), g in heads.groupby(["layer", "q_head"], sort=True):
        ax.plot(g["step"].to_numpy(dtype=np.float64), g["value"].to_numpy(dtype=np.float64),
                color=colors[int(layer)], alpha=HEAD_ALPHA, linewidth=HEAD_WIDTH, gid=f"head {head_label(layer, q_head)}")
    if per_head:  # a few heads of ap_overall: each head's stored interval, in its layer's colour
        hi = traj.head_intervals.sort_values(["layer", "q_head", "step", "model"])
        drawn = 0
        for (layer, q_head), g in hi.groupby(["layer", "q_head"], sort=True):
            drawn += draw_band(ax, g["step"], g["ap_overall_ci_low"].astype("float64"),
                               g["ap_overall_ci_high"].astype("float64"), colors[int(layer)],
                               f"ci {head_label(layer, q_head)}")
        band_mode, n_without = ("heads", n_heads_drawn - drawn) if drawn else (None, 0)
    means = None
    if opts.ci and is_ap and not per_head:
        means = layers.merge(layer_mean_intervals(traj.head_intervals), on=["model", "layer"], how="left")
    for layer, g in (means if means is not None else layers).groupby("layer", sort=True):
        color = colors[int(layer)]
        if means is not None:
            if draw_band(ax, g["step"], g["low"], g["high"], color, f"ci layer {int(layer)}"):
                band_mode = "mean"
            n_without += int((~np.isfinite(g["low"].to_numpy(dtype=np.float64))).sum())
        elif opts.ci and not is_ap:
            draw_band(ax, g["step"], g["ci_low"], g["ci_high"], color, f"spread layer {int(layer)}")
        _trajectory_line(ax, g, "mean_value", color, markers, gid=f"mean layer {int(layer)}")
    if opts.ci and not is_ap:
        caption = SPREAD_BAND_TEXT
    if not per_head:
        n_without = n_without if band_mode else 0
    if opts.ci and is_ap:
        caption = band_caption(band_mode, n_without, NO_INTERVALS_RUN.replace("this run", "these runs"))
        if band_mode == "mean":
            caption = caption.replace("over heads", "over the layer's heads")
    ax.set_xlabel(_step_axis(ax, checkpoints["step"].to_numpy(dtype=np.float64), opts.step_axis))
    ax.set_ylabel(f"{traj.metric}: each head (faint), layer mean (bold)")
    unit = traj.metric in UNIT_INTERVAL_METRICS
    if unit:
        ax.set_ylim(-0.02, 1.02)
    extra = [Line2D([], [], color="0.3", alpha=HEAD_ALPHA, linewidth=HEAD_WIDTH, label="each head"),
             Line2D([], [], color="0.3", linewidth=MEAN_WIDTH, label="layer mean")]
    if stages != [""]:
        extra += [Line2D([], [], color="0.3", linestyle="none", marker=markers[s], label=stage_label(s))
                  for s in stages]
    if band_mode:
        extra.append(band_handle(band_mode))
    elif opts.ci and not is_ap:
        extra.append(Line2D([], [], color="0.6", linewidth=6, alpha=0.35, label="95% t-interval over heads"))
    most_heads = {int(la): int(n) for la, n in layers.groupby("layer")["n_heads"].max().items()}
    _layer_key(fig, ax, colors, most_heads, *extra)
    sns.despine(ax=ax)

    sns.heatmap(matrix, ax=hm, cmap=opts.cmap, vmin=0.0 if unit else None, vmax=1.0 if unit else None,
                mask=matrix.isna(), annot=matrix.size <= 120, fmt=".2f", annot_kws={"fontsize": 7},
                cbar_kws={"label": f"{traj.metric} (mean over heads)"}, linewidths=0.0)
    hm.set_xlabel("checkpoint (step, stage)")
    hm.set_ylabel("layer")
    hm.tick_params(axis="x", labelrotation=0, labelsize="small")
    hm.tick_params(axis="y", labelrotation=0)

    caption = title_and_caption(fig, opts, f"{traj.family}: {traj.metric} through {n_ckpt} checkpoint(s), "
                                           f"{n_layers} layer(s)", caption)
    summary = layers.loc[:, ["stage", "step", "model", "layer", "n_heads", "mean_value", "ci_low", "ci_high",
                             "median_value"]].sort_values(["step", "model", "layer"]).reset_index(drop=True)
    n_heads = int(traj.heads.groupby(["layer", "q_head"]).ngroups)  # heads of the model, rows = one per checkpoint
    return PlotResult(fig, summary, int(len(traj.heads)), n_heads,
                      {"checkpoints": n_ckpt, "layers": n_layers, "matrix": matrix, "bands": band_mode}, caption)


def _trajectory_line(ax, g: pd.DataFrame, column: str, color, markers: dict, gid: str | None = None) -> None:
    """One layer's mean trajectory (rows by step) as a bold line, with each stage's marker."""
    ax.plot(g["step"].to_numpy(dtype=np.float64), g[column], color=color, linewidth=MEAN_WIDTH, gid=gid)
    for stage, point in g.groupby(g["stage"].fillna(""), sort=False):
        ax.plot(point["step"], point[column], linestyle="none", marker=markers[stage], markersize=5,
                color=color, markeredgecolor="white", markeredgewidth=0.5)
