"""warehouse.present.plots and `plasticity plot`: the numbers drawn, checked on hand-made tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cli.main import main
from warehouse.present import plots
from warehouse.present import figure_parts
from warehouse.present import plot_data

PLOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "plots"
NAN = float("nan")


def cells() -> pd.DataFrame:
    """Bucket cells of three heads (two layers); head (1,0) has a NaN cell and an all-NaN bucket."""
    rows = []
    for layer, q_head, values in (
        (0, 0, {(1, 0): 0.2, (2, 0): 0.3, (2, 1): 0.5, (3, 0): 0.4, (3, 1): 0.6, (3, 2): 0.8}),  # rising
        (0, 1, {(1, 0): 0.9, (2, 0): 0.7, (2, 1): 0.7, (3, 0): 0.2, (3, 1): 0.4, (3, 2): 0.3}),  # falling
        (1, 0, {(1, 0): NAN, (2, 0): 0.5, (2, 1): NAN, (3, 0): 0.1, (3, 1): 0.9, (3, 2): 0.5}),
    ):
        for (qb, kb), v in values.items():
            rows.append({"layer": layer, "q_head": q_head, "k_head": 0, "q_bucket": qb, "k_bucket": kb,
                         "plasticity": v, "n_pairs": 0 if math.isnan(v) else 16})
    return pd.DataFrame(rows)


def weights() -> pd.DataFrame:
    rows = []
    for (layer, q_head), w in {(0, 0): [0.5, 0.25, 0.25], (0, 1): [2.0, 1.0, 1.0], (1, 0): [0.0, 0.0, 0.0]}.items():
        for c, v in enumerate(w):
            rows.append({"layer": layer, "q_head": q_head, "k_head": 0, "component": c, "component_r2": v,
                         "weight": v})
    return pd.DataFrame(rows)


def test_bucket_start_positions():
    assert plot_data.bucket_start([0, 1, 3], "uniform", 64).tolist() == [0, 64, 192]
    assert plot_data.bucket_start([0, 1, 3], "log", 2).tolist() == [2, 4, 16]
    with pytest.raises(ValueError, match="bucket_type"):
        plot_data.bucket_start([1], "geometric", 1)


def test_bucket_curves_average_non_nan_cells():
    c = plot_data.bucket_curves(cells()).set_index(["layer", "q_head", "q_bucket"])["plasticity"]
    assert c[(0, 0, 2)] == pytest.approx(0.4)
    assert c[(0, 0, 3)] == pytest.approx(0.6)
    assert math.isnan(c[(1, 0, 1)])  # only a NaN cell
    assert c[(1, 0, 2)] == pytest.approx(0.5)  # the NaN cell is skipped, not counted as 0
    trends = plot_data.head_trends(plot_data.bucket_curves(cells()))
    assert trends[(0, 0, 0)] == "rising" and trends[(0, 1, 0)] == "falling"
    assert trends[(1, 0, 0)] == "flat"  # 0.5 then 0.5: the NaN-only bucket 1 is left out


def brute_rise_fall(y):
    pairs = [(y[j] - y[i]) for i in range(len(y)) for j in range(i + 1, len(y))]
    return max([0.0] + pairs), max([0.0] + [-p for p in pairs])


TREND_CASES = {
    "rising": [0.1, 0.3, 0.29, 0.5],            # a 0.01 wobble is noise
    "falling": [0.9, 0.7, 0.71, 0.2],
    "flat": [0.50, 0.51, 0.495, 0.505],
    "dip": [0.8, 0.4, 0.2, 0.21, 0.5, 0.9],     # down, a noisy bottom, up
    "peak": [0.2, 0.6, 0.9, 0.6, 0.3],
    "mixed": [0.2, 0.8, 0.2, 0.8],              # turns twice
    "one bucket": [0.4],
}


@pytest.mark.parametrize("expected", sorted(TREND_CASES))
def test_trend_classes_on_constructed_curves(expected):
    y = TREND_CASES[expected]
    assert plot_data.trend_class(np.array(y)) == expected
    assert plot_data.rise_and_fall(np.array(y)) == pytest.approx(brute_rise_fall(y), abs=1e-15)


def test_trend_tolerance_edges():
    tol = 0.125  # binary fractions, so "exactly tol" is exact
    assert plot_data.trend_class(np.array([0.25, 0.5, 0.375, 0.75]), tol) == "rising"  # a drop of exactly tol is noise
    assert plot_data.trend_class(np.array([0.25, 0.5, 0.25, 0.75]), tol) == "mixed"  # up, down, up
    assert plot_data.trend_class(np.array([0.5, 0.625]), tol) == "flat"
    assert plot_data.trend_class(np.array([0.5, 0.75]), tol) == "rising"
    # a monotone-looking curve that ends in a dip deeper than tol is not "falling"
    assert plot_data.trend_class(np.array([0.9, 0.6, 0.3, 0.5])) == "dip"
    assert plot_data.trend_class(np.array([0.9, 0.6, 0.3, 0.5]), tol=0.3) == "falling"
    rng = np.random.default_rng(5)
    for _ in range(200):  # rise/fall against the O(n^2) definition
        y = rng.random(int(rng.integers(1, 9)))
        assert plot_data.rise_and_fall(y) == pytest.approx(brute_rise_fall(list(y)), abs=1e-15)


def test_heatmap_matrix_mean_and_median():
    mean = plot_data.heatmap_matrix(cells(), "mean")
    median = plot_data.heatmap_matrix(cells(), "median")
    assert mean.loc[3, 1] == pytest.approx((0.6 + 0.4 + 0.9) / 3)
    assert median.loc[3, 1] == pytest.approx(0.6)
    assert mean.loc[2, 1] == pytest.approx(0.6)  # NaN of head (1,0) skipped
    assert math.isnan(mean.loc[1, 1])  # key bucket 1 is not before query bucket 1
    assert list(mean.index) == [1, 2, 3] and list(mean.columns) == [0, 1, 2]


def test_component_weights_are_normalised_per_head_before_averaging():
    norm = plot_data.normalized_component_weights(weights())
    sums = norm.groupby(["layer", "q_head"])["weight_norm"].sum()
    assert np.allclose(sums, 1.0)
    means = plot_data.component_means(weights()).set_index("component")["mean_weight"]
    # heads (0,0) and (0,1) normalise to [.5,.25,.25]; the all-zero head counts as 1/3 each
    assert means.tolist() == pytest.approx([(0.5 + 0.5 + 1 / 3) / 3, (0.25 + 0.25 + 1 / 3) / 3, (0.25 + 0.25 + 1 / 3) / 3])


def _outside(fig, ax, legend) -> bool:
    """The legend's box lies right of the axes' box (drawn, in display coordinates)."""
    fig.canvas.draw()
    return legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_curves_figure_draws_every_head_and_the_mean():
    opts = plot_data.load_plot_options("curves", bucket_min_size=64, color_by_layer=True, model_name="toy")
    res = plots.plot_plasticity_curves(cells(), opts)
    ax = res.figure.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 + 1  # three heads + the mean
    mean_line = max(lines, key=lambda ln: ln.get_linewidth())
    assert mean_line.get_xdata().tolist() == [64, 128, 192]
    want = plot_data.bucket_curves(cells()).groupby("q_bucket")["plasticity"].mean().tolist()
    assert mean_line.get_ydata().tolist() == pytest.approx(want)
    assert res.summary["mean_plasticity"].tolist() == pytest.approx(want)
    colors = figure_parts.layer_colors([0, 1])
    assert [tuple(ln.get_color()) for ln in lines if ln is not mean_line] == [colors[0], colors[0], colors[1]]
    # a discrete key: one legend entry per layer with its head count, no continuous colour bar
    assert len(res.figure.axes) == 1
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["layer 0 (2)", "layer 1 (1)", "mean over heads"]
    assert [tuple(h.get_color()) for h in legend.legend_handles[:2]] == [colors[0], colors[1]]
    assert _outside(res.figure, ax, legend)
    assert res.n_heads == 3 and res.n_rows == len(cells()) and "toy" in ax.get_title()


def test_many_layers_get_a_discrete_colour_bar():
    n_layers = figure_parts.LAYER_LEGEND_MAX + 3
    many = pd.concat([cells().assign(layer=layer) for layer in range(n_layers)], ignore_index=True)
    res = plots.plot_plasticity_curves(many, plot_data.load_plot_options("curves", color_by_layer=True))
    fig = res.figure
    assert len(fig.axes) == 2
    bar_ax = fig.axes[1]
    ticks = bar_ax.get_yticks()
    assert len(ticks) >= 2 and np.all(ticks == np.round(ticks))  # integer layers only, no 0.5 ticks
    solids = next(c for c in bar_ax.collections if type(c).__name__ == "QuadMesh")  # the colour bar's blocks
    assert list(solids.norm.boundaries) == [x - 0.5 for x in range(n_layers + 1)]  # one block per layer
    assert solids.cmap.N == n_layers
    colors = figure_parts.layer_colors(range(n_layers))
    assert [tuple(solids.cmap(i)) for i in range(n_layers)] == [colors[la] for la in range(n_layers)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["mean over heads"]


def test_color_trend_legend_is_outside_and_counts_shapes():
    res = plots.plot_plasticity_curves(cells(), plot_data.load_plot_options("curves", color_trend=True))
    ax = res.figure.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["rising (1)", "falling (1)", "flat (1)", "mean over heads"]
    assert _outside(res.figure, ax, legend)
    from matplotlib.colors import to_rgba

    colors = [to_rgba(ln.get_color()) for ln in ax.get_lines()][:3]  # heads in (layer, q_head) order
    assert colors == [to_rgba(figure_parts.TREND_COLORS[t]) for t in ("rising", "falling", "flat")]
    assert res.extra["trends"] == {"rising": 1, "falling": 1, "flat": 1}


def test_heatmap_figure_values_and_axes():
    opts = plot_data.load_plot_options("heatmap", bucket_type="log", bucket_min_size=2, agg="median", vmin=0.1,
                                   vmax=0.9, cmap="magma", title="T")
    res = plots.plot_bucket_heatmap(cells(), opts)
    ax = res.figure.axes[0]
    mesh = ax.collections[0]
    values = np.ma.filled(mesh.get_array().astype(float), np.nan).reshape(3, 3)
    expected = plot_data.heatmap_matrix(cells(), "median").to_numpy()
    assert np.allclose(values, expected, equal_nan=True)
    assert mesh.get_clim() == (0.1, 0.9) and mesh.get_cmap().name == "magma"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "8", "16"]  # 2**b * 2 for b = 1, 2, 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    assert ax.get_title() == "T"


def test_component_bars_heights_and_interval_bars():
    res = plots.plot_component_weights(weights(), plot_data.load_plot_options("components"))
    ax = res.figure.axes[0]
    means = plot_data.component_means(weights())
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx(means["mean_weight"].tolist())
    segments = [np.asarray(seg) for seg in ax.collections[0].get_segments()]
    drawn = np.array([(s[0, 0], s[0, 1], s[1, 1]) for s in segments])
    np.testing.assert_allclose(drawn, means[["component", "ci_low", "ci_high"]].to_numpy(dtype=float), rtol=1e-12)
    assert all(0.0 <= s[:, 1].min() and s[:, 1].max() <= 1.0 for s in segments)
    assert "95% bootstrap interval of the mean" in ax.get_title()
    assert ax.get_xlabel() == "query dimension (the head's own basis)"


def test_bootstrap_mean_interval():
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.full(6, 0.3), size=40)  # 40 heads, skewed weights summing to 1
    low, high = plot_data.bootstrap_mean_interval(w)
    again = plot_data.bootstrap_mean_interval(w)
    assert np.array_equal(low, again[0]) and np.array_equal(high, again[1])  # same seed, same bits
    assert np.all(w.min(axis=0) <= low) and np.all(high <= w.max(axis=0)) and np.all(low <= high)
    assert np.all((low <= w.mean(axis=0)) & (w.mean(axis=0) <= high))
    # the percentile bootstrap of scipy, with many more resamples, agrees within Monte Carlo error
    ref = stats.bootstrap((w,), np.mean, axis=0, method="percentile", n_resamples=20000, rng=np.random.default_rng(2))
    assert np.abs(low - ref.confidence_interval.low).max() < 0.01
    assert np.abs(high - ref.confidence_interval.high).max() < 0.01
    # closed forms: identical heads give a zero-width interval; one head its own values
    same = np.tile([0.7, 0.2, 0.1], (5, 1))
    assert np.array_equal(plot_data.bootstrap_mean_interval(same)[0], same[0])
    assert np.array_equal(plot_data.bootstrap_mean_interval(same[:1])[1], same[0])
    # two heads 0 and 1: resample means k/2, k ~ Binomial(2, 1/2): 2.5% and 97.5% quantiles 0 and 1
    lo2, hi2 = plot_data.bootstrap_mean_interval(np.array([[0.0], [1.0]]))
    assert (lo2[0], hi2[0]) == (0.0, 1.0)


def test_component_means_refuse_heads_of_different_width():
    w = weights()
    w = w[~((w["layer"] == 1) & (w["component"] == 2))]
    with pytest.raises(ValueError, match="different numbers of components"):
        plot_data.component_means(w)


def test_model_comparison_lines_per_model():
    values = pd.DataFrame({
        "model": ["a"] * 4 + ["b"] * 6,
        "run_id": ["r"] * 10,
        "layer": [0, 0, 1, 1, 0, 0, 1, 1, 2, 2],
        "q_head": [0, 1] * 5,
        "value": [0.1, 0.3, 0.5, 0.7, 0.2, 0.2, 0.4, 0.4, 0.9, 0.7],
    })
    res = plots.plot_model_comparison(values, plot_data.load_plot_options("compare", normalize_depth=True))
    lines = [ln for ln in res.figure.axes[0].get_lines() if len(ln.get_xdata()) > 1]
    ys = sorted(ln.get_ydata().tolist() for ln in lines)
    assert ys == [pytest.approx([0.2, 0.4, 0.8]), pytest.approx([0.2, 0.6])]
    xs = sorted(ln.get_xdata().tolist() for ln in lines)
    assert xs == [[0.0, 0.5, 1.0], [0.0, 1.0]]  # relative depth
    summary = res.summary.set_index(["model", "layer"])
    assert summary.loc[("b", 2), "mean"] == pytest.approx(0.8) and summary.loc[("b", 2), "n_heads"] == 2


def test_options_from_yaml_with_overrides_and_errors(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("bucket_type: log\nbucket_min_size: 16\nagg: median\nkind: heatmap\n")
    opts = plot_data.load_plot_options("heatmap", cfg, defaults={"bucket_min_size": 999, "cmap": "rocket"}, agg="mean")
    assert (opts.bucket_type, opts.bucket_min_size, opts.agg, opts.cmap) == ("log", 16.0, "mean", "rocket")
    with pytest.raises(ValueError, match="not 'curves'"):
        plot_data.load_plot_options("curves", cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("bucket_csvv: x.csv\n")
    with pytest.raises(ValueError, match="unknown plot option.*bucket_csvv"):
        plot_data.load_plot_options("curves", bad)
    with pytest.raises(ValueError, match="not both"):
        plot_data.load_plot_options("curves", color_by_layer=True, color_trend=True)
    with pytest.raises(ValueError, match="agg"):
        plot_data.load_plot_options("heatmap", agg="max")


def test_shipped_plot_configs_load():
    kinds = {"plasticity": "curves", "heatmap": "heatmap", "components": "components", "comparison": "compare"}
    files = sorted(PLOT_CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"synthetic-demo-plasticity.yaml", "synthetic-demo-heatmap.yaml",
                                       "synthetic-demo-components.yaml", "model-comparison.yaml"}
    for f in files:
        kind = kinds[f.stem.rsplit("-", 1)[1]]
        opts = plot_data.load_plot_options(kind, f)
        assert opts.output and opts.output.endswith(".png")
        assert plot_data.config_path_for(PLOT_CONFIGS, kind, opts.model) == f


def test_plot_command_from_csv(tmp_path, capsys):
    csv = tmp_path / "head_bucket_plasticity.csv"
    cells().to_csv(csv, index=False, na_rep="NaN")
    out = tmp_path / "heat.png"
    code = main(["plot", "heatmap", "--bucket_csv", str(csv), "--agg", "median", "--bucket-min-size", "32",
                 "--output", str(out)])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}: 18 row(s), 3 head(s) from {csv}" in capsys.readouterr().out
    cfg = tmp_path / "curves.yaml"
    cfg.write_text(f"bucket_csv: {csv}\ncolor_trend: true\noutput: {tmp_path / 'curves.png'}\n")
    assert main(["plot", "curves", "--config", str(cfg)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_plot_command_errors_are_clear(tmp_path, capsys):
    csv = tmp_path / "broken.csv"
    csv.write_text("layer,q_head\n0,0\n")
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--output", str(tmp_path / "x.png")]) == 2
    assert "missing column(s) k_head" in capsys.readouterr().err
    assert main(["plot", "curves", "--warehouse", str(tmp_path / "none.duckdb"), "--model", "m"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def sweep_frame(curves: dict[tuple[int, int], dict[str, list[float]]], gains: dict) -> pd.DataFrame:
    """A `scale_sweep_data`-shaped frame from {(layer, q_head): {metric: values at 5 scales}}."""
    rows = []
    for (layer, q_head), per_metric in curves.items():
        for metric, values in per_metric.items():
            for scale, v in zip((0.5, 0.75, 1.0, 1.25, 1.5), values):
                rows.append({"layer": layer, "q_head": q_head, "k_head": 0, "head": f"L{layer} H{q_head}",
                             "gain": gains[(layer, q_head)], "scale": scale, "metric": metric, "value": v})
    return pd.DataFrame(rows)


FLAT = {"entropy": [5.0, 4.9, 4.8, 4.7, 4.6], "max_attn": [0.02, 0.03, 0.04, 0.05, 0.06]}
SHARP = {"entropy": [3.0, 2.0, 1.5, 1.0, 0.8], "max_attn": [0.3, 0.5, 0.6, 0.7, 0.8]}


def test_coinciding_heads_groups_curves_drawn_on_top_of_each_other():
    from warehouse.present.attention_plots import COINCIDE_REL_TOL, coinciding_heads

    nudge = {"entropy": [v + COINCIDE_REL_TOL * 4.2 * 0.9 for v in FLAT["entropy"]], "max_attn": FLAT["max_attn"]}
    apart = {"entropy": [v + COINCIDE_REL_TOL * 4.2 * 3 for v in FLAT["entropy"]], "max_attn": FLAT["max_attn"]}
    data = sweep_frame({(0, 0): FLAT, (0, 1): FLAT, (1, 0): SHARP, (1, 1): nudge, (2, 0): apart},
                       {(0, 0): 0.02, (0, 1): 0.02, (1, 0): 0.4, (1, 1): 0.02, (2, 0): 0.02})
    # entropy range over all heads: 5.126 - 0.8 = 4.326, so 1% is 0.0433: 0.0378 apart coincides, 0.126 not
    same = coinciding_heads(data)
    assert same["L0 H0"] == ["L0 H1", "L1 H1"] and same["L0 H1"] == ["L0 H0", "L1 H1"]
    assert same["L1 H0"] == [] and same["L2 H0"] == []
    # groups close transitively: a ~ b and b ~ c put a and c together even when a and c are 1.8% apart
    step = {"entropy": [v + COINCIDE_REL_TOL * 4.2 * 0.9 for v in nudge["entropy"]], "max_attn": FLAT["max_attn"]}
    chain = coinciding_heads(sweep_frame({(0, 0): FLAT, (0, 1): nudge, (0, 2): step, (1, 0): SHARP},
                                         {(0, 0): 0.0, (0, 1): 0.0, (0, 2): 0.0, (1, 0): 0.0}))
    assert chain["L0 H0"] == ["L0 H1", "L0 H2"]
    # equal in one metric but not the other: drawn apart in that panel, so not coinciding
    half = sweep_frame({(0, 0): FLAT, (0, 1): {"entropy": FLAT["entropy"], "max_attn": SHARP["max_attn"]}},
                       {(0, 0): 0.0, (0, 1): 0.0})
    assert coinciding_heads(half) == {"L0 H0": [], "L0 H1": []}


def test_scale_drawing_keeps_identical_heads_distinguishable():
    from warehouse.present.attention_plots import draw_scale_sweep

    data = sweep_frame({(0, 0): FLAT, (0, 1): FLAT, (0, 2): FLAT, (1, 0): SHARP},
                       {(0, 0): 0.024, (0, 1): 0.024, (0, 2): 0.024, (1, 0): 0.4})
    fig = draw_scale_sweep(data, ["entropy", "max_attn"], "toy")
    for ax, metric in zip(fig.axes, ["entropy", "max_attn"]):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["L0 H0", "L0 H1", "L0 H2", "L1 H0"]
        assert len({ln.get_marker() for ln in lines}) == 4 and len({str(ln.get_linestyle()) for ln in lines}) == 4
        assert all(ln.get_markerfacecolor() == "none" for ln in lines)  # open markers show through
        sizes = [ln.get_markersize() for ln in lines]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # nested, not hidden
        for ln, head in zip(lines, ["L0 H0", "L0 H1", "L0 H2", "L1 H0"]):
            want = data[(data["head"] == head) & (data["metric"] == metric)].sort_values("scale")
            assert ln.get_xdata().tolist() == want["scale"].tolist()
            assert ln.get_ydata().tolist() == want["value"].tolist()
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "L0 H0 (gain 0.024) = L0 H1, L0 H2", "L0 H1 (gain 0.024) = L0 H0, L0 H2",
        "L0 H2 (gain 0.024) = L0 H0, L0 H1", "L1 H0 (gain 0.400)"]
    assert "coinciding curves (3 of 4 heads)" in legend.get_title().get_text()
    assert _outside(fig, fig.axes[-1], legend)

def test_plot_command_takes_bucket_scheme_from_the_warehouse(small_dataset, tmp_path, monkeypatch, capsys):
    """`plot curves --model` places buckets by the dataset card's scheme, as the catalog recorded it
    (table `models`), unless the options say otherwise."""
    from warehouse.settings.config import load_config
    from warehouse.store.models import plot_bucket_options
    from warehouse.run.pipeline import analyze_dataset

    wh = tmp_path / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "m"})
    analyze_dataset(cfg, small_dataset, progress=False)
    drawn = []
    real = figure_parts.save_figure
    monkeypatch.setattr(figure_parts, "save_figure", lambda fig, path, dpi=110: drawn.append(fig) or real(fig, path, dpi))
    assert main(["plot", "curves", "--warehouse", str(wh), "--model", "m", "--output", str(tmp_path / "c.png")]) == 0
    ax = drawn[-1].axes[0]
    mean_line = max(ax.get_lines(), key=lambda ln: ln.get_linewidth())
    assert mean_line.get_xdata().tolist() == [32 * b for b in range(1, 8)]  # the card's uniform buckets of 32
    assert "uniform buckets of 32" in ax.get_xlabel()
    assert main(["plot", "curves", "--warehouse", str(wh), "--model", "m", "--bucket_min_size", "2",
                 "--output", str(tmp_path / "d.png")]) == 0
    assert max(drawn[-1].axes[0].get_lines(), key=lambda ln: ln.get_linewidth()).get_xdata().tolist()[:2] == [2, 4]
    # log buckets (qk-sniffer: bucket b starts at 2**b - 1) are drawn at 2**b; unknown schemes keep the defaults
    assert plot_bucket_options({"bucket_scheme": "log", "bucket_size": 128}) == {"bucket_type": "log", "bucket_min_size": 1.0}
    assert plot_bucket_options({"bucket_scheme": None, "bucket_size": None}) == {} == plot_bucket_options(None)
