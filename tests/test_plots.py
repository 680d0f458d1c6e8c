"""warehouse.plots and `plasticity plot`: the numbers drawn, checked on hand-made tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dagster_project.cli import main
from warehouse import plots

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
    assert plots.bucket_start([0, 1, 3], "uniform", 64).tolist() == [0, 64, 192]
    assert plots.bucket_start([0, 1, 3], "log", 2).tolist() == [2, 4, 16]
    with pytest.raises(ValueError, match="bucket_type"):
        plots.bucket_start([1], "geometric", 1)


def test_bucket_curves_average_non_nan_cells():
    c = plots.bucket_curves(cells()).set_index(["layer", "q_head", "q_bucket"])["plasticity"]
    assert c[(0, 0, 2)] == pytest.approx(0.4)
    assert c[(0, 0, 3)] == pytest.approx(0.6)
    assert math.isnan(c[(1, 0, 1)])  # only a NaN cell
    assert c[(1, 0, 2)] == pytest.approx(0.5)  # the NaN cell is skipped, not counted as 0
    trends = plots.head_trends(plots.bucket_curves(cells()))
    assert trends[(0, 0, 0)] == "rising" and trends[(0, 1, 0)] == "falling"
    assert trends[(1, 0, 0)] == "mixed"  # two non-NaN buckets only


def test_heatmap_matrix_mean_and_median():
    mean = plots.heatmap_matrix(cells(), "mean")
    median = plots.heatmap_matrix(cells(), "median")
    assert mean.loc[3, 1] == pytest.approx((0.6 + 0.4 + 0.9) / 3)
    assert median.loc[3, 1] == pytest.approx(0.6)
    assert mean.loc[2, 1] == pytest.approx(0.6)  # NaN of head (1,0) skipped
    assert math.isnan(mean.loc[1, 1])  # key bucket 1 is not before query bucket 1
    assert list(mean.index) == [1, 2, 3] and list(mean.columns) == [0, 1, 2]


def test_component_weights_are_normalised_per_head_before_averaging():
    norm = plots.normalized_component_weights(weights())
    sums = norm.groupby(["layer", "q_head"])["weight_norm"].sum()
    assert np.allclose(sums, 1.0)
    means = plots.component_means(weights()).set_index("component")["mean_weight"]
    # heads (0,0) and (0,1) normalise to [.5,.25,.25]; the all-zero head counts as 1/3 each
    assert means.tolist() == pytest.approx([(0.5 + 0.5 + 1 / 3) / 3, (0.25 + 0.25 + 1 / 3) / 3, (0.25 + 0.25 + 1 / 3) / 3])


def test_curves_figure_draws_every_head_and_the_mean():
    opts = plots.load_plot_options("curves", bucket_min_size=64, color_by_layer=True, model_name="toy")
    res = plots.plot_plasticity_curves(cells(), opts)
    ax = res.figure.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 + 1  # three heads + the mean
    mean_line = max(lines, key=lambda ln: ln.get_linewidth())
    assert mean_line.get_xdata().tolist() == [64, 128, 192]
    want = plots.bucket_curves(cells()).groupby("q_bucket")["plasticity"].mean().tolist()
    assert mean_line.get_ydata().tolist() == pytest.approx(want)
    assert res.summary["mean_plasticity"].tolist() == pytest.approx(want)
    colors = {tuple(ln.get_color()) for ln in lines if ln is not mean_line}
    assert len(colors) == 2  # one colour per layer
    assert len(res.figure.axes) == 2  # the layer colour bar
    assert res.n_heads == 3 and res.n_rows == len(cells()) and "toy" in ax.get_title()


def test_heatmap_figure_values_and_axes():
    opts = plots.load_plot_options("heatmap", bucket_type="log", bucket_min_size=2, agg="median", vmin=0.1,
                                   vmax=0.9, cmap="magma", title="T")
    res = plots.plot_bucket_heatmap(cells(), opts)
    ax = res.figure.axes[0]
    mesh = ax.collections[0]
    values = np.ma.filled(mesh.get_array().astype(float), np.nan).reshape(3, 3)
    expected = plots.heatmap_matrix(cells(), "median").to_numpy()
    assert np.allclose(values, expected, equal_nan=True)
    assert mesh.get_clim() == (0.1, 0.9) and mesh.get_cmap().name == "magma"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "8", "16"]  # 2**b * 2 for b = 1, 2, 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    assert ax.get_title() == "T"


def test_component_bars_heights():
    res = plots.plot_component_weights(weights(), plots.load_plot_options("components"))
    heights = [p.get_height() for p in res.figure.axes[0].patches]
    assert heights == pytest.approx(plots.component_means(weights())["mean_weight"].tolist())


def test_model_comparison_lines_per_model():
    values = pd.DataFrame({
        "model": ["a"] * 4 + ["b"] * 6,
        "run_id": ["r"] * 10,
        "layer": [0, 0, 1, 1, 0, 0, 1, 1, 2, 2],
        "q_head": [0, 1] * 5,
        "value": [0.1, 0.3, 0.5, 0.7, 0.2, 0.2, 0.4, 0.4, 0.9, 0.7],
    })
    res = plots.plot_model_comparison(values, plots.load_plot_options("compare", normalize_depth=True))
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
    opts = plots.load_plot_options("heatmap", cfg, defaults={"bucket_min_size": 999, "cmap": "rocket"}, agg="mean")
    assert (opts.bucket_type, opts.bucket_min_size, opts.agg, opts.cmap) == ("log", 16.0, "mean", "rocket")
    with pytest.raises(ValueError, match="not 'curves'"):
        plots.load_plot_options("curves", cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("bucket_csvv: x.csv\n")
    with pytest.raises(ValueError, match="unknown plot option.*bucket_csvv"):
        plots.load_plot_options("curves", bad)
    with pytest.raises(ValueError, match="not both"):
        plots.load_plot_options("curves", color_by_layer=True, color_trend=True)
    with pytest.raises(ValueError, match="agg"):
        plots.load_plot_options("heatmap", agg="max")


def test_shipped_plot_configs_load():
    kinds = {"plasticity": "curves", "heatmap": "heatmap", "components": "components", "comparison": "compare"}
    files = sorted(PLOT_CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"synthetic-demo-plasticity.yaml", "synthetic-demo-heatmap.yaml",
                                       "synthetic-demo-components.yaml", "model-comparison.yaml"}
    for f in files:
        kind = kinds[f.stem.rsplit("-", 1)[1]]
        opts = plots.load_plot_options(kind, f)
        assert opts.output and opts.output.endswith(".png")
        assert plots.config_path_for(PLOT_CONFIGS, kind, opts.model) == f


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


def test_plot_command_takes_bucket_scheme_from_the_warehouse(small_dataset, tmp_path, monkeypatch, capsys):
    """`plot curves --model` places buckets by the dataset card's scheme, as the catalog recorded it
    (table `models`), unless the options say otherwise."""
    from warehouse.config import load_config
    from warehouse.models import plot_bucket_options
    from warehouse.pipeline import analyze_dataset

    wh = tmp_path / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "m"})
    analyze_dataset(cfg, small_dataset, progress=False)
    drawn = []
    real = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path, dpi=110: drawn.append(fig) or real(fig, path, dpi))
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
