"""The data behind the plots: the options of every plot kind (`PlotOptions`, read from a YAML file and
flags), the tables read from a warehouse or a CSV export, and the pure transforms drawn by
`warehouse.present.plots` and `warehouse.present.trajectory_plots` (bucket curves and their shape,
the heatmap matrix, component-weight means with bootstrap intervals, interval tables).

Data is read through `warehouse.store.db.reader` (read-only connections). No figure is made here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
#: Component-weight error bars: percentile bootstrap of the mean over heads.
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


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
    no_title: bool = option(False, help="draw no title")
    no_caption: bool = option(False, help="draw no caption under the title (what the bands and bars are); the "
                                          "command line writes it to <output>.caption.txt instead")
    figsize: list[float] | None = option(None, metavar="W H", help="figure width and height in inches",
                                         default_text="each plot's own size")
    layout: str = option("auto", choices=("auto", "overlay", "panels"),
                         help="compare: overlay draws every model on one axes, panels one small panel per model "
                              "(the others faint behind it); auto: overlay up to 4 models, panels beyond")
    palette: str = option("colorblind", help="colours of models and heads: a seaborn palette name (the default "
                                             "is safe for colour-blind readers)")
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
    output: str | None = option(None, help="output file; its extension sets the format (PNG, PDF or SVG)",
                                accepts="a .png, .pdf or .svg file",
                                default_text="results/plots/<model>-<kind>.png", metavar="FILE")
    dpi: int = option(110, ge=1, le=2400, help="dots per inch of raster output (PNG; images inside a PDF or SVG)")
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
        if self.figsize is not None and (len(self.figsize) != 2 or min(self.figsize) <= 0):
            raise ValueError(f"figsize {self.figsize}: give width and height in inches, both above 0")
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
        # every model of the warehouse, so each keeps one colour whichever a figure shows
        df.attrs["all_models"] = [r[0] for r in con.execute("SELECT DISTINCT model FROM latest_runs ORDER BY 1")
                                  .fetchall()]
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
    """AP_j per head and query bucket: the mean of its non-NaN cells (docs/method.md#attention-plasticity); NaN when none."""
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
