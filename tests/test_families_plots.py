"""The trajectory plot: what it draws (checked on the matplotlib objects) and the `plot trajectory` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection, QuadMesh

from cli.main import main
from warehouse.store import db
from warehouse.store.families import FamilyError, Trajectory, check_distinct_steps
from warehouse.present.plot_data import load_plot_options
from warehouse.present.trajectory_plots import layer_by_checkpoint, plot_trajectory


def trajectory(steps=(10, 100, 1000, 10000), stages=("s1", "s1", "s2", "s2"), n_layers=3, metric="ap_overall",
               n_heads=4) -> Trajectory:
    """Layer means mean = 0.1 + 0.2 * layer + 0.01 * i (i = checkpoint index), intervals of +-0.08 (sd 0.05)."""
    rows, heads = [], []
    for i, (step, stage) in enumerate(zip(steps, stages)):
        for layer in range(n_layers):
            mean = 0.1 + 0.2 * (layer % 4) + 0.01 * i
            rows.append({"family": "f", "stage": stage, "step": step, "model": f"m{step}", "run_id": f"r{i}",
                         "layer": layer, "metric": metric, "n_heads": n_heads, "n_not_finite": 0, "mean_value": mean,
                         "sd_value": 0.05, "ci_low": mean - 0.08, "ci_high": mean + 0.08, "median_value": mean,
                         "q1_value": mean, "q3_value": mean, "min_value": mean, "max_value": mean})
            heads += [{"model": f"m{step}", "layer": layer, "q_head": h, "value": mean} for h in range(n_heads)]
    layers = pd.DataFrame(rows)
    ckpts = layers[["family", "stage", "step", "model", "run_id"]].drop_duplicates().assign(status="succeeded")
    return Trajectory("f", metric, layers, pd.DataFrame(heads), ckpts.reset_index(drop=True))


def opts(**kw):
    return load_plot_options("trajectory", None, family="f", **kw)


def data_lines(ax, what: str = "mean layer"):
    """The layer means' lines ("mean layer N"), or the heads' ("head LN HM")."""
    return [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith(what)]


def test_layer_by_checkpoint_matrix_in_step_order():
    t = trajectory(steps=(1000, 10, 100), stages=("b", "a", None))
    t.layers.loc[(t.layers["model"] == "m100") & (t.layers["layer"] == 1), "mean_value"] = np.nan
    matrix = layer_by_checkpoint(t.layers)
    assert list(matrix.index) == [0, 1, 2] and list(matrix.columns) == ["10\na", "100", "1000\nb"]
    assert matrix.loc[0, "10\na"] == pytest.approx(0.11) and np.isnan(matrix.loc[1, "100"])
    assert matrix.loc[2, "1000\nb"] == pytest.approx(0.5)


def test_trajectory_plot_draws_one_line_and_band_per_layer_on_a_log_step_axis():
    """A metric without a standard error (q_R2_pos) gets the heads' t-interval of each layer mean as its band."""
    t = trajectory(metric="q_R2_pos")
    res = plot_trajectory(t, opts(metric="q_R2_pos"))
    ax, hm = res.figure.axes[0], res.figure.axes[1]
    assert ax.get_xscale() == "log" and ax.get_ylim() == (-0.02, 1.02)
    lines = data_lines(ax)
    assert len(lines) == 3
    for layer, line in enumerate(lines):
        np.testing.assert_allclose(line.get_xdata(), [10, 100, 1000, 10000])
        np.testing.assert_allclose(line.get_ydata(), 0.1 + 0.2 * layer + 0.01 * np.arange(4))
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3
    for layer, band in enumerate(bands):
        ys = band.get_paths()[0].vertices[:, 1]
        mean = 0.1 + 0.2 * layer + 0.01 * np.arange(4)
        assert ys.min() == pytest.approx(mean.min() - 0.08) and ys.max() == pytest.approx(mean.max() + 0.08)
    (mesh,) = [c for c in hm.collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(3, 4), layer_by_checkpoint(t.layers).to_numpy())
    assert mesh.get_clim() == (0.0, 1.0)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[:3] == ["layer 0 (4)", "layer 1 (4)", "layer 2 (4)"]
    assert "stage s1" in labels and "stage s2" in labels and "95% t-interval over heads" in labels
    assert list(res.summary.columns[:4]) == ["stage", "step", "model", "layer"] and len(res.summary) == 12
    assert res.extra["checkpoints"] == 4 and "f: q_R2_pos through 4 checkpoint(s)" in res.figure._suptitle.get_text()
    assert "t-interval of the mean over the layer's heads" in res.figure._suptitle.get_text()
    assert not [c for c in plot_trajectory(t, opts(metric="q_R2_pos", ci=False)).figure.axes[0].collections
                if isinstance(c, PolyCollection)]  # ci: false draws no band


@pytest.mark.parametrize("metric", ["ap_overall", "q_R2_pos"])
def test_every_metric_has_one_design_heads_faint_layer_means_bold_coloured_by_layer(metric):
    """ap_overall and q_R2_pos alike: each head a faint line in its layer's colour (viridis, by layer), each
    layer's mean a bold one; the legend names the stages once ("stage1", not "stage stage1")."""
    from matplotlib.colors import to_rgba

    from warehouse.present.figure_parts import layer_colors

    t = trajectory(metric=metric, stages=("stage1", "stage1", "stage2", "s3"))
    t.heads["value"] += 0.01 * t.heads["q_head"]  # heads of a layer apart
    ax = plot_trajectory(t, opts(metric=metric)).figure.axes[0]
    colors = layer_colors(range(3))
    means, heads = data_lines(ax), data_lines(ax, "head")
    assert [ln.get_gid() for ln in means] == ["mean layer 0", "mean layer 1", "mean layer 2"]
    assert len(heads) == 12
    for line in means:
        layer = int(line.get_gid().split()[-1])
        assert line.get_linewidth() == 2.4 and line.get_alpha() is None and to_rgba(line.get_color()) == colors[layer]
    steps = [10, 100, 1000, 10000]
    for line in heads:
        layer, q_head = (int(x[1:]) for x in line.get_gid().split()[1:])
        assert line.get_linewidth() == 0.8 and line.get_alpha() == 0.3
        assert to_rgba(line.get_color()) == colors[layer]
        want = t.heads[(t.heads["layer"] == layer) & (t.heads["q_head"] == q_head)]["value"].to_numpy()
        np.testing.assert_allclose(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), want)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"each head", "layer mean", "stage1", "stage2", "stage s3"} <= set(labels)
    assert not any(label.startswith("stage stage") for label in labels)


def test_step_zero_gets_a_symmetric_log_axis_and_linear_is_linear():
    t = trajectory(steps=(0, 50, 500), stages=(None, None, None))
    ax = plot_trajectory(t, opts()).figure.axes[0]
    assert ax.get_xscale() == "symlog" and ax.xaxis.get_transform().linthresh == 50
    assert "linear below 50" in ax.get_xlabel()
    lin = plot_trajectory(trajectory(), opts(step_axis="linear")).figure.axes[0]
    assert lin.get_xscale() == "linear"
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert not any(x.startswith("stage") for x in legend)  # no stages, no stage key


def test_many_layers_get_a_discrete_colour_bar_and_other_metrics_free_scales():
    t = trajectory(n_layers=20, metric="q_beta_norm")
    fig = plot_trajectory(t, opts(metric="q_beta_norm")).figure
    assert len(fig.axes) == 4  # lines, heatmap, its colour bar, the layer colour bar
    ax = fig.axes[0]
    assert ax.get_legend() is None and ax.get_ylim() != (-0.02, 1.02)
    (mesh,) = [c for c in fig.axes[1].collections if isinstance(c, QuadMesh)]
    assert mesh.get_clim() == pytest.approx((0.1, 0.73))


def test_checkpoints_sharing_a_step_are_refused():
    t = trajectory(steps=(4000, 4000, 20000, 20000), stages=("lc-4k", "lc-32k", "lc-4k", "lc-32k"))
    with pytest.raises(FamilyError, match=r"m4000 \(stage lc-4k\), m4000 \(stage lc-32k\) share step 4000"):
        check_distinct_steps(t.checkpoints.assign(model=["a", "b", "c", "d"]).replace({"a": "m4000", "b": "m4000"}),
                             "f")


def write_family_warehouses(folder: Path) -> None:
    """One file per checkpoint: f at steps 4000 (two stages) and 20000, model g-1 of another family."""
    specs = [("a-4000", "f", "lc-4k", 4000, 0.2), ("b-4000", "f", "lc-32k", 4000, 0.4),
             ("a-20000", "f", "lc-4k", 20000, 0.3), ("g-1", "g", None, 1, 0.9)]
    for model, family, stage, step, ap in specs:
        wh = folder / f"{model}.duckdb"
        db.ensure_schema(wh)
        with db.writer(wh) as con:
            con.execute("INSERT INTO runs (run_id, model, started_at, status) VALUES ('r', $m, now(), 'succeeded')",
                        {"m": model})
            con.execute("INSERT INTO models (model, family, stage, step) VALUES ($m, $f, $s, $st)",
                        {"m": model, "f": family, "s": stage, "st": step})
            con.execute("INSERT INTO head_metrics (model, run_id, layer, q_head, k_head, ap_overall, q_R2_pos) "
                        "SELECT $m, 'r', i // 2, i % 2, 0, $ap + 0.01 * i, 0.5 FROM range(4) t(i)",
                        {"m": model, "ap": ap})


def test_plot_command_reads_one_file_per_model(tmp_path, capsys):
    folder = tmp_path / "wh"
    folder.mkdir()
    write_family_warehouses(folder)
    template = str(folder / "{model}.duckdb")
    out = tmp_path / "f.png"
    code = main(["plot", "trajectory", "--family", "f", "--warehouse", template, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "share step 4000" in err and not out.exists()
    code = main(["plot", "trajectory", "--family", "f", "--stages", "lc-4k", "--warehouse", template,
                 "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 row(s), 4 head(s) from family f: models a-4000 (run r), a-20000 (run r)" in printed
    code = main(["plot", "trajectory", "--family", "nope", "--warehouse", template, "--output", str(out)])
    assert code == 2 and "families there: f, g" in capsys.readouterr().err
    code = main(["plot", "trajectory", "--family", "g", "--metric", "gain", "--warehouse", template,
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no values of 'gain'" in err and "ap_overall" in err and "q_R2_pos" in err
    code = main(["plot", "trajectory", "--family", "../x", "--warehouse", template])
    assert code == 2 and "family = ../x" in capsys.readouterr().err
