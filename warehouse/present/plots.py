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
Data is read through `warehouse.store.db.reader` (read-only connections). No Dagster.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from warehouse.store import db
from warehouse.settings.config import read_settings
from warehouse.sources.names import name_problem, safe_path_component
from warehouse.settings.options import check_all, option

KINDS = ("curves", "heatmap", "components", "compare", "trajectory")
BUCKET_TYPES = ("uniform", "log")
AGGREGATIONS = ("mean", "median")
# configs/plots/<model>-<suffix>.yaml, as in the upstream toolkit (…-plasticity.yaml, …-heatmap.yaml, …)
CONFIG_SUFFIX = {"curves": "plasticity", "heatmap": "heatmap", "components": "components", "compare": "comparison",
                 "trajectory": "trajectory"}
STEP_AXES = ("log", "linear")
#: AP_j changes of at most this much (AP is in [0, 1]) are noise to `trend_class`, not a trend.
TREND_TOL = 0.02
# colour-blind-safe (Okabe-Ito) colours of the curve shapes, in legend order
TREND_COLORS = {"rising": "#D55E00", "falling": "#0072B2", "flat": "#999999", "dip": "#CC79A7",
                "peak": "#009E73", "mixed": "#E69F00", "one bucket": "#56B4E9"}
#: Up to this many layers get one legend entry each; more get a discrete colour bar.
LAYER_LEGEND_MAX = 12
#: Component-weight error bars: percentile bootstrap of the mean over heads.
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Opacity of the AP interval bands (per head, or of the mean).
BAND_ALPHA = 0.16
#: What the AP bands are, for captions and legends (see docs/metrics.md, "Intervals in the plots").
HEAD_BAND_TEXT = "95% interval of each head's AP (stored example-jackknife interval)"
MEAN_BAND_TEXT = ("conservative 95% interval of the mean over heads\n(mean ± t · average of the heads' "
                  "jackknife SEs: valid for any correlation between heads)")


@dataclass
class PlotOptions:
    """Every option of every plot kind (upstream names). Unused ones are ignored by a kind.

    Each is declared once (`warehouse.settings.options.option`): `plasticity plot --help`, the YAML checks and
    the errors all come from here."""

    # data source: a CSV (upstream) or the warehouse
    bucket_csv: str | None = option(None, help="head_bucket_plasticity.csv to plot instead of the warehouse "
                                               "(curves, heatmap)", accepts="a file")
    component_csv: str | None = option(None, help="head_component_weights.csv instead of the warehouse (components)",
                                       accepts="a file")
    head_metrics_csv: str | None = option(None, help="head_metrics.csv instead of the warehouse (compare)",
                                          accepts="a file")
    warehouse: str | None = option(None, help="DuckDB warehouse", accepts="a file",
                                   default_text="$PLASTICITY_WAREHOUSE, else data/warehouse.duckdb")
    model: str | None = option(None, help="model in the warehouse", default_text="none (required for the warehouse)")
    run_id: str | None = option(None, help="run of the model", default_text="its latest run")
    models: list[str] | None = option(None, help="compare: models to show", default_text="every model")
    family: str | None = option(None, help="trajectory: the family of checkpoints", check=name_problem,
                                default_text="none (required for trajectory)")
    stages: list[str] | None = option(None, help="trajectory: only checkpoints of these stages",
                                      default_text="every stage")
    # presentation
    model_name: str | None = option(None, help="label in the title", default_text="the model")
    title: str | None = option(None, help="figure title", default_text="one naming the model and the plot")
    bucket_type: str = option("uniform", choices=BUCKET_TYPES, help="position buckets of the capture")
    bucket_min_size: float = option(1.0, gt=0, help="bucket width (uniform) or multiplier (log)")
    color_by_layer: bool = option(False, help="curves: colour heads by layer")
    color_trend: bool = option(False, help="curves: colour heads by the shape of their curve (rising, falling, flat, dip, peak, mixed)")
    agg: str = option("mean", choices=AGGREGATIONS, help="heatmap: how heads are aggregated")
    cmap: str = option("viridis", help="heatmap colour map (a matplotlib name)")
    vmin: float | None = option(0.0, help="heatmap: lower end of the colour scale", default_text="0")
    vmax: float | None = option(1.0, help="heatmap: upper end of the colour scale", default_text="1")
    max_components: int | None = option(None, ge=1, help="components: show the first N only",
                                        default_text="all")
    metric: str = option("ap_overall", help="compare: the head_metrics column plotted; trajectory: a metric of "
                                            "family_head_metrics_long (head_metrics or attention summary column)")
    step_axis: str = option("log", choices=STEP_AXES,
                            help="trajectory: training-step axis (log: symmetric-log below the first "
                                 "positive step when a checkpoint has step 0)")
    normalize_depth: bool = option(False, help="compare: x = layer / last layer")
    ci: bool = option(True, help="curves, compare, trajectory: draw the stored confidence intervals of AP "
                                 "(each head's, or the conservative interval of the mean)")
    ci_max_heads: int = option(12, ge=1, help="curves, compare, trajectory: up to this many heads, each head's "
                                              "interval is drawn; more, the interval of the mean over heads")
    output: str | None = option(None, help="output PNG", accepts="a file",
                                default_text="results/plots/<model>-<kind>.png", metavar="PNG")
    dpi: int = option(110, ge=1, le=2400, help="resolution of the PNG")
    kind: str | None = option(None, choices=KINDS, cli=False, help="plot kind; must match the command when given",
                              default_text="the command's")

    def validate(self, kind: str) -> "PlotOptions":
        if kind not in KINDS:
            raise ValueError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")
        check_all(self)
        if self.kind is not None and self.kind != kind:
            raise ValueError(f"this config is for a {self.kind!r} plot, not {kind!r}")
        if self.color_by_layer and self.color_trend:
            raise ValueError("choose color_by_layer or color_trend, not both")
        if self.vmin is not None and self.vmax is not None and self.vmin >= self.vmax:
            raise ValueError(f"vmin ({self.vmin}) must be below vmax ({self.vmax})")
        return self


def load_plot_options(kind: str, config: str | os.PathLike | None = None, defaults: dict[str, Any] | None = None,
                      **overrides: Any) -> PlotOptions:
    """defaults < YAML plot config (optional) < overrides (None = not given) -> validated PlotOptions.

    `defaults` fill what the YAML leaves out (e.g. the bucket size from the dataset
    card). Unknown keys are an error naming them, like the run configs.
    """
    settings = read_settings(PlotOptions, config, overrides, defaults=defaults, overrides_from="command line",
                             mapping_of="plot options", unknown="unknown plot option(s)")
    return PlotOptions(**settings).validate(kind)


def config_path_for(configs_dir: str | os.PathLike, kind: str, model: str | None) -> Path:
    """configs/plots/<model>-plasticity.yaml etc.; the comparison is configs/plots/model-comparison.yaml."""
    if kind == "compare":
        return Path(configs_dir) / "model-comparison.yaml"
    what = "family name" if kind == "trajectory" else "model name"
    return Path(configs_dir) / f"{safe_path_component(model, what)}-{CONFIG_SUFFIX[kind]}.yaml"


# --------------------------------------------------------------------------- data


def _latest_run_id(con, model: str) -> str:
    from warehouse.store.export import latest_run_id

    return latest_run_id(con, model)


def load_run_table(warehouse: str | os.PathLike, table: str, model: str, run_id: str | None = None,
                   timeout_s: float = 60.0) -> tuple[pd.DataFrame, str]:
    """Rows of one result table for a model's run (default: its latest run), without model/run_id."""
    if table not in ("head_metrics", "head_bucket_plasticity", "head_component_weights"):
        raise ValueError(f"not a plottable result table: {table}")
    with db.reader(warehouse, timeout_s) as con:
        run_id = run_id or _latest_run_id(con, model)
        df = con.execute(
            f"SELECT * EXCLUDE (model, run_id) FROM {table} WHERE model = $m AND run_id = $r ORDER BY ALL",
            {"m": model, "r": run_id},
        ).df()
    return df, run_id


def load_bucket_intervals(warehouse: str | os.PathLike, model: str, run_id: str,
                          timeout_s: float = 60.0) -> pd.DataFrame:
    """The stored 95% intervals of AP_j of a run (`sql/bucket_intervals.sql`): layer, q_head, k_head,
    q_bucket, ap, ap_se, ap_ci_low, ap_ci_high, ap_se_df; empty for a run made before they existed."""
    import sql

    with db.reader(warehouse, timeout_s) as con:
        return con.execute(sql.load("bucket_intervals"), {"m": model, "r": run_id}).df()


#: Stored interval columns of head_metrics that the comparison of ap_overall carries.
AP_INTERVAL_COLUMNS = {"ap_overall_ci_low": "ci_low", "ap_overall_ci_high": "ci_high", "ap_overall_se": "se",
                       "ap_se_df": "se_df"}


def load_comparison(warehouse: str | os.PathLike, models: list[str] | None = None, metric: str = "ap_overall",
                    timeout_s: float = 60.0) -> pd.DataFrame:
    """(model, run_id, layer, q_head, value) of the latest run of each model; for ap_overall also its
    stored interval (ci_low, ci_high, se, se_df; NULL for runs made before they existed)."""
    with db.reader(warehouse, timeout_s) as con:
        cols = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'head_metrics'").fetchall()}
        if metric not in cols or metric in ("model", "run_id", "estimator"):
            raise ValueError(f"unknown head_metrics column {metric!r}")
        interval = "".join(f", {c} AS {a}" for c, a in AP_INTERVAL_COLUMNS.items()) if metric == "ap_overall" else ""
        query = f'SELECT model, run_id, layer, q_head, "{metric}" AS value{interval} FROM latest_head_metrics'
        params: dict = {}
        if models:
            query += " WHERE list_contains($models, model)"
            params["models"] = list(models)
        df = con.execute(query + " ORDER BY model, layer, q_head", params).df()
    if models:
        missing = sorted(set(models) - set(df["model"]))
        if missing:
            raise LookupError(f"no run of model(s) {', '.join(missing)} in the warehouse")
    return df


def read_csv(path: str | os.PathLike, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV export (NaN written as `NaN`), checking it has the columns a plot needs."""
    df = pd.read_csv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    return df


BUCKET_COLUMNS = ("layer", "q_head", "k_head", "q_bucket", "k_bucket", "plasticity")
COMPONENT_COLUMNS = ("layer", "q_head", "k_head", "component", "weight")


# --------------------------------------------------------------------------- pure transforms


def bucket_start(bucket, bucket_type: str = "uniform", bucket_min_size: float = 1.0):
    """Position where a bucket starts: uniform b * size, log 2**b * size."""
    b = np.asarray(bucket, dtype=np.float64)
    if bucket_type == "uniform":
        return b * bucket_min_size
    if bucket_type == "log":
        return np.power(2.0, b) * bucket_min_size
    raise ValueError(f"bucket_type must be one of {BUCKET_TYPES}, got {bucket_type!r}")


def bucket_curves(cells: pd.DataFrame) -> pd.DataFrame:
    """AP_j per head and query bucket: the mean of its non-NaN cells (SPEC 2.8); NaN when none."""
    df = cells.loc[:, ["layer", "q_head", "k_head", "q_bucket", "plasticity"]]
    out = (df.groupby(["layer", "q_head", "k_head", "q_bucket"], sort=True)["plasticity"]
           .mean()  # pandas skips NaN
           .reset_index())
    return out


def rise_and_fall(y: np.ndarray) -> tuple[float, float]:
    """Largest increase ``max_{i<j} (y_j - y_i)`` and largest decrease ``max_{i<j} (y_i - y_j)`` of
    a sequence, each at least 0 (0, 0 for fewer than 2 values)."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] < 2:
        return 0.0, 0.0
    rise = float(np.max(y[1:] - np.minimum.accumulate(y)[:-1]))
    fall = float(np.max(np.maximum.accumulate(y)[:-1] - y[1:]))
    return max(rise, 0.0), max(fall, 0.0)


def trend_class(y: np.ndarray, tol: float = TREND_TOL) -> str:
    """Shape of one head's curve ``y`` (AP_j in bucket order, NaN dropped); a change of at most
    ``tol`` is noise. With ``rise``/``fall`` the largest increase/decrease between an earlier and
    a later point (`rise_and_fall`), checked in this order:

    * ``one bucket``: a single value, no shape;
    * ``flat``: rise <= tol and fall <= tol;
    * ``rising``: fall <= tol (the curve never drops by more than tol);
    * ``falling``: rise <= tol;
    * ``dip``: at the first minimum, no rise > tol before it and no fall > tol after it (down, then up);
    * ``peak``: at the first maximum, no fall > tol before it and no rise > tol after it (up, then down);
    * ``mixed``: anything else (it turns more than once).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] == 1:
        return "one bucket"
    rise, fall = rise_and_fall(y)
    if rise <= tol and fall <= tol:
        return "flat"
    if fall <= tol:
        return "rising"
    if rise <= tol:
        return "falling"
    k = int(np.argmin(y))
    if rise_and_fall(y[: k + 1])[0] <= tol and rise_and_fall(y[k:])[1] <= tol:
        return "dip"
    k = int(np.argmax(y))
    if rise_and_fall(y[: k + 1])[1] <= tol and rise_and_fall(y[k:])[0] <= tol:
        return "peak"
    return "mixed"


def head_trends(curves: pd.DataFrame, tol: float = TREND_TOL) -> pd.Series:
    """`trend_class` of every head's AP_j curve (by ascending q_bucket, NaN buckets left out);
    heads without any value are not listed."""
    labels = {}
    for key, g in curves.dropna(subset=["plasticity"]).groupby(["layer", "q_head", "k_head"], sort=True):
        labels[key] = trend_class(g.sort_values("q_bucket")["plasticity"].to_numpy(), tol)
    idx = pd.MultiIndex.from_tuples(list(labels), names=["layer", "q_head", "k_head"]) if labels else None
    return pd.Series(list(labels.values()), index=idx, dtype=object, name="trend")


def heatmap_matrix(cells: pd.DataFrame, agg: str = "mean") -> pd.DataFrame:
    """Plasticity per (q_bucket, k_bucket) over all heads: rows q_bucket, columns k_bucket."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    grouped = cells.groupby(["q_bucket", "k_bucket"], sort=True)["plasticity"]
    values = grouped.mean() if agg == "mean" else grouped.median()
    return values.unstack("k_bucket").sort_index().sort_index(axis=1)


def normalized_component_weights(weights: pd.DataFrame) -> pd.DataFrame:
    """Each head's weights rescaled to sum to 1 (1/d each when they sum to 0); adds `weight_norm`."""
    df = weights.loc[:, ["layer", "q_head", "k_head", "component", "weight"]].copy()
    w = df["weight"].clip(lower=0).fillna(0.0)
    keys = [df["layer"], df["q_head"], df["k_head"]]
    total = w.groupby(keys).transform("sum")
    count = w.groupby(keys).transform("count")
    df["weight_norm"] = np.where(total > 0, w / total.where(total > 0, 1.0), 1.0 / count)
    return df


def bootstrap_mean_interval(values: np.ndarray, level: float = CI_LEVEL, n_resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the column means of ``values`` (n rows, k columns).

    Each of ``n_resamples`` resamples draws n rows with replacement (the same rows for every
    column), as counts ``C ~ Multinomial(n, 1/n)`` from ``numpy.random.default_rng(seed)``; its
    means are ``C @ values / n``. The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles (numpy's linear rule) of those means, per column. Resampled means are averages of
    the observed values, so the interval lies within each column's [min, max]. Returns (low, high).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("bootstrap needs at least one row")
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    means = counts.astype(np.float64) @ values / n
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    return low, high


def component_means(weights: pd.DataFrame) -> pd.DataFrame:
    """Per component: mean over heads of the normalised weight, the 95% bootstrap interval of
    that mean (`bootstrap_mean_interval`, heads resampled), and the number of heads."""
    norm = normalized_component_weights(weights)
    table = norm.set_index(["layer", "q_head", "k_head", "component"])["weight_norm"].unstack("component")
    if table.isna().to_numpy().any():
        raise ValueError("heads have different numbers of components; plot one model (one head dimension) at a time")
    values = table.to_numpy(dtype=np.float64)
    low, high = bootstrap_mean_interval(values)
    return pd.DataFrame({"component": table.columns.to_numpy(), "mean_weight": values.mean(axis=0),
                         "ci_low": low, "ci_high": high, "n_heads": values.shape[0]})


def layer_means(values: pd.DataFrame) -> pd.DataFrame:
    """Mean / median / count of the metric per (model, layer), with the relative depth of the layer."""
    g = values.groupby(["model", "layer"], sort=True)["value"]
    out = g.agg(["mean", "median", "count"]).reset_index().rename(columns={"count": "n_heads"})
    depth = values.groupby("model")["layer"].max()
    out["depth"] = out.apply(lambda r: r["layer"] / depth[r["model"]] if depth[r["model"]] else 0.0, axis=1)
    return out


# --------------------------------------------------------------------------- figures


@dataclass
class PlotResult:
    figure: Any  # matplotlib.figure.Figure
    summary: pd.DataFrame  # what the plot shows, as a table (for previews)
    n_rows: int  # input rows plotted
    n_heads: int
    extra: dict = field(default_factory=dict)


def _figure(width: float = 8.0, height: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(opts: PlotOptions) -> str:
    return opts.model_name or opts.model or ""


def _position_label(opts: PlotOptions, what: str) -> str:
    kind = "log2 buckets" if opts.bucket_type == "log" else "uniform buckets"
    return f"{what} position (bucket start, {kind} of {opts.bucket_min_size:g})"


def _fmt_pos(x: float) -> str:
    if not np.isfinite(x):
        return ""
    return f"{int(x):d}" if float(x).is_integer() else f"{x:g}"


def layer_colors(layers) -> dict[int, tuple]:
    """One viridis colour per layer, evenly spaced in layer order (the yellow end left out, for contrast)."""
    from matplotlib import colormaps

    layers = sorted(int(x) for x in layers)
    spots = np.linspace(0.0, 0.9, len(layers)) if len(layers) > 1 else np.array([0.45])
    return {layer: colormaps["viridis"](float(x)) for layer, x in zip(layers, spots)}


def _legend_outside(ax, handles=None, title: str | None = None):
    """Legend to the right of the axes, never over the data."""
    kwargs = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small", "frameon": False,
              "title": title, "title_fontsize": "small"}
    return ax.legend(handles=handles, **kwargs) if handles is not None else ax.legend(**kwargs)


def _layer_key(fig, ax, colors: dict[int, tuple], heads_per_layer: dict[int, int], *extra_handles) -> None:
    """A discrete key of the layer colours: legend entries up to LAYER_LEGEND_MAX layers, else a
    colour bar with one block per layer and integer ticks; `extra_handles` (e.g. the mean) go in a legend."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    layers = sorted(colors)
    if len(layers) <= LAYER_LEGEND_MAX:
        handles = [Line2D([], [], color=colors[la], linewidth=2, label=f"layer {la} ({heads_per_layer[la]})")
                   for la in layers]
        _legend_outside(ax, handles + list(extra_handles), title="layer (heads)")
        return
    bounds = np.r_[np.asarray(layers, dtype=float) - 0.5, layers[-1] + 0.5]
    sm = ScalarMappable(norm=BoundaryNorm(bounds, len(layers)), cmap=ListedColormap([colors[la] for la in layers]))
    bar = fig.colorbar(sm, ax=ax, label="layer", spacing="proportional")
    bar.set_ticks(MaxNLocator(integer=True, nbins=12).tick_values(layers[0], layers[-1]))
    bar.ax.set_ylim(bounds[0], bounds[-1])
    fig.legend(handles=list(extra_handles), loc="outside lower right", fontsize="small", frameon=False)


def head_label(layer, q_head) -> str:
    """Legend name of a head: ``L{layer} H{q_head}``."""
    return f"L{int(layer)} H{int(q_head)}"


def head_colors(keys) -> dict:
    """One colour per head, for plots that draw a few heads one by one: seaborn's colour-blind palette
    (10 colours), husl beyond."""
    import seaborn as sns

    keys = list(keys)
    return dict(zip(keys, sns.color_palette("colorblind" if len(keys) <= 10 else "husl", len(keys))))


def draw_band(ax, x, low, high, color, gid: str) -> bool:
    """Shade [low, high] over x where both ends are finite (gaps elsewhere); draws nothing and returns
    False when they are nowhere finite."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return False
    ax.fill_between(np.asarray(x, dtype=np.float64), low, high, where=finite, color=color, alpha=BAND_ALPHA,
                    linewidth=0, gid=gid)
    return True


def band_caption(mode: str | None, n_without: int = 0, reason: str | None = None) -> str:
    """Second title line saying what the bands are: `mode` "heads" or "mean", or none drawn (`reason`);
    `n_without` heads (or points) that have no interval."""
    if mode is None:
        return f"no intervals: {reason}" if reason else ""
    text = "band: " + (HEAD_BAND_TEXT if mode == "heads" else MEAN_BAND_TEXT)
    if n_without:
        text += f"\n{n_without} {'head(s)' if mode == 'heads' else 'point(s)'} without a finite standard error: no band"
    return text


def band_handle(mode: str):
    """Legend entry of the AP band."""
    from matplotlib.patches import Patch

    return Patch(facecolor="0.5", alpha=0.35, linewidth=0,
                 label="95% interval, each head" if mode == "heads" else "95% interval of the mean\n(conservative)")


#: Why a plot has no stored intervals to draw.
NO_INTERVALS_CSV = "a CSV export holds no stored intervals"
NO_INTERVALS_RUN = "no standard errors stored for this run (analysed before they existed)"


def bucket_interval_table(curves: pd.DataFrame, intervals: pd.DataFrame | None) -> pd.DataFrame:
    """`curves` (one row per head and bucket with a finite AP_j) with the stored interval of that AP_j
    (ap_se, ap_ci_low, ap_ci_high, ap_se_df; NaN where none is stored), matched on head and bucket."""
    keys = ["layer", "q_head", "k_head", "q_bucket"]
    cols = ["ap_se", "ap_ci_low", "ap_ci_high", "ap_se_df"]
    if intervals is None or intervals.empty:
        return curves.assign(**{c: np.nan for c in cols})
    stored = intervals.loc[:, keys + cols].astype({c: "float64" for c in cols})
    return curves.merge(stored, on=keys, how="left", validate="one_to_one")


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
    own_colors = head_colors(k for k, _ in heads) if per_head and colors is None and trends is None else None
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
    title = opts.title or f"{_label(opts)} per-bucket attention plasticity ({n_heads} heads)".strip()
    reason = None if band_mode or not opts.ci else (
        NO_INTERVALS_CSV if intervals is None else
        NO_INTERVALS_RUN if intervals.empty else "no finite standard error (too few examples)")
    caption = band_caption(band_mode, n_without, reason)
    ax.set_title(f"{title}\n{caption}" if caption else title, fontsize="medium")
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
    return PlotResult(fig, mean, int(len(cells)), n_heads, extra)


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
    ax.set_title(opts.title or f"{_label(opts)} bucket plasticity, {opts.agg} of {n_heads} heads".strip())
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
    title = opts.title or f"{_label(opts)} component weights, mean of {n_heads} heads".strip()
    ax.set_title(f"{title}\nerror bars: {CI_LEVEL:.0%} bootstrap interval of the mean over heads "
                 f"({BOOTSTRAP_RESAMPLES} resamples)", fontsize="medium")
    sns.despine(ax=ax)
    return PlotResult(fig, means, int(len(weights)), n_heads)


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
    palette = dict(zip(models, sns.color_palette(n_colors=len(models))))
    fig = _figure(8.5, 5.0)
    ax = fig.add_subplot()
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
            drawn = ax.errorbar(g["x_drawn"], y, yerr=np.vstack([y - g["low"], g["high"] - y]),
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
    ax.set_xlabel("relative depth (layer / last layer)" if opts.normalize_depth else "layer")
    if not opts.normalize_depth:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{opts.metric} (mean over heads, band = interquartile range)")
    if opts.metric.startswith("ap_"):
        ax.set_ylim(-0.02, 1.02)
    n_models = len(models)
    title = opts.title or f"{opts.metric} by layer across {n_models} model(s)"
    ax.set_title(f"{title}\n{caption}" if caption else title, fontsize="medium")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    sns.despine(ax=ax)
    summary = layer_means(values)
    n_heads = int(values.groupby(["model", "layer", "q_head"]).ngroups)
    return PlotResult(fig, summary, int(len(values)), n_heads, {"models": models, "bands": bar_mode,
                                                                "intervals": bars})


def head_interval_bars(data: pd.DataFrame) -> pd.DataFrame:
    """Each head's stored interval (model, layer, q_head, y, low, high), placed side by side around its
    layer's x: the heads sharing an x spread over 0.6 of the smallest distance between x values."""
    out = data.sort_values(["x", "model", "q_head"]).reset_index(drop=True)
    xs = np.unique(out["x"].to_numpy(dtype=np.float64))
    spacing = float(np.diff(xs).min()) if xs.size > 1 else 1.0
    rank = out.groupby("x").cumcount().to_numpy()
    size = out.groupby("x")["x"].transform("size").to_numpy()
    width = 0.6 * spacing / max(int(size.max()), 1)
    out["x_drawn"] = out["x"].to_numpy(dtype=np.float64) + (rank - (size - 1) / 2.0) * width
    return out.assign(y=out["value"], low=out["ci_low"], high=out["ci_high"]).loc[
        :, ["model", "layer", "q_head", "x", "x_drawn", "y", "low", "high"]]


def group_mean_intervals(data: pd.DataFrame, keys: list[str], value: str = "value", se: str = "se",
                         df: str = "se_df") -> pd.DataFrame:
    """The conservative interval of each group's mean over its heads (`mean_interval_bound` of the
    heads' `value`, `se`, `df`; one row per group and ``q_head``): the `keys`, mean, se_bound, low, high."""
    from plasticity.mean_interval import mean_interval_bound

    by_head = data.set_index(list(keys) + ["q_head"])
    wide = {c: by_head[c].astype("float64").unstack("q_head") for c in (value, se, df)}
    mean, se_bound, low, high = mean_interval_bound(wide[value], wide[se], wide[df])
    return wide[value].index.to_frame(index=False).assign(mean=mean, se_bound=se_bound, low=low, high=high)


def layer_mean_interval_bars(data: pd.DataFrame) -> pd.DataFrame:
    """The conservative interval of each (model, layer) mean of the heads' values (`group_mean_intervals`):
    model, layer, x, x_drawn, y (the mean), se_bound, low, high."""
    out = group_mean_intervals(data, ["model", "layer", "x"])
    return out.assign(x_drawn=out["x"].astype(np.float64), y=out["mean"]).loc[
        :, ["model", "layer", "x", "x_drawn", "y", "se_bound", "low", "high"]]


# --------------------------------------------------------------------------- one call per kind


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


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file through a temp file and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write the figure atomically (temp file + rename), so readers never see half a PNG."""
    return write_atomically(path, png_bytes(fig, dpi))
