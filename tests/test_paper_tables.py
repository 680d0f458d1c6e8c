"""Tables for a paper, on one analysed warehouse: `head_metrics.csv` (upstream columns first, then model,
run and the AP interval), the `latest_layer_plasticity` view, and the tables the command line prints."""

from __future__ import annotations

import csv

import pytest

from cli.main import main
from warehouse.settings.config import load_config
from warehouse.store import db

UPSTREAM_HEAD_COLUMNS = (
    "layer,q_head,k_head,n_q_tokens,n_k_tokens,d_model,q_R2_pos,q_beta_norm,q_R2_scalar,q_mae_baseline,"
    "q_mae_proj,q_mae_ratio,q_resid0_skew,q_resid0_kurt,q_resid0_ks_p,q_noise_med_abs_skew,"
    "q_noise_med_abs_kurt,q_noise_med_ks_p,q_noise_frac_ks_p_lt_alpha,ap_overall,ap_overall_se,estimator"
).split(",")
APPENDED = ["model", "run_id", "ap_overall_ci_low", "ap_overall_ci_high", "ap_se_df", "n_examples", "ap_ci_calibrated"]


@pytest.fixture(scope="module")
def warehouse(small_dataset, tmp_path_factory):
    """The small dataset analysed twice (two runs of model `small`, other seed) into one warehouse."""
    from warehouse.run.pipeline import analyze_dataset

    wh = tmp_path_factory.mktemp("paper") / "wh.duckdb"
    runs = []
    for seed in (0, 1):
        cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "small",
                                 "seed": seed})
        runs.append(analyze_dataset(cfg, small_dataset, progress=False).run_id)
    return {"wh": wh, "runs": runs}


def query(wh, sql, params=None):
    with db.reader(wh) as con:
        return con.execute(sql, params or {}).fetchall()


def test_head_metrics_csv_keeps_upstream_columns_first_and_appends_model_run_and_interval(warehouse, tmp_path):
    out = tmp_path / "csv"
    assert main(["export", "--model", "small", "--warehouse", str(warehouse["wh"]), "--out", str(out)]) == 0
    with open(out / "head_metrics.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == UPSTREAM_HEAD_COLUMNS + APPENDED
    latest = warehouse["runs"][-1]
    want = query(warehouse["wh"], f"SELECT layer, q_head, {', '.join(APPENDED)} FROM head_metrics "
                                  "WHERE run_id = $r ORDER BY layer, q_head", {"r": latest})
    got = [tuple(r[header.index(c)] for c in ["layer", "q_head"] + APPENDED) for r in rows]
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        assert (int(g[0]), int(g[1]), g[2], g[3]) == (w[0], w[1], "small", latest)
        assert float(g[4]) == w[4] and float(g[5]) == w[5]  # the interval, to the last digit
        assert int(g[6]) == w[6] and int(g[7]) == w[7]
    assert all(float(r[header.index("ap_overall_ci_low")]) <= float(r[header.index("ap_overall")])
               <= float(r[header.index("ap_overall_ci_high")]) for r in rows)
    assert {int(r[header.index("n_examples")]) for r in rows} == {8}  # the small dataset's 8 sequences


def drawn_figures(monkeypatch) -> list:
    from warehouse.present import figure_parts

    figures, real = [], figure_parts.save_figure
    monkeypatch.setattr(figure_parts, "save_figure",
                        lambda fig, path, dpi=110: figures.append(fig) or real(fig, path, dpi))
    return figures


def test_latest_layer_plasticity_is_the_latest_run_ordered_and_its_interval_is_the_drawn_one(
        warehouse, tmp_path, monkeypatch):
    rows = query(warehouse["wh"], "SELECT model, run_id, layer, n_heads, mean_ap, mean_ci_low, mean_ci_high "
                                  "FROM latest_layer_plasticity")
    assert [(r[0], r[1], r[2]) for r in rows] == [("small", warehouse["runs"][-1], layer) for layer in (0, 1)]
    assert all(r[3] == 4 and r[5] < r[4] < r[6] for r in rows)
    figures = drawn_figures(monkeypatch)
    assert main(["plot", "compare", "--warehouse", str(warehouse["wh"]), "--ci_max_heads", "1",
                 "--output", str(tmp_path / "layers.svg")]) == 0
    (bars,) = [c for c in figures[-1].axes[0].collections if c.get_gid() == "ci small"]
    drawn = sorted((float(seg[0][0]), float(seg[0][1]), float(seg[1][1])) for seg in bars.get_segments())
    want = [(float(r[2]), r[5], r[6]) for r in rows]
    assert [v for row in drawn for v in row] == pytest.approx([v for row in want for v in row], rel=1e-12, abs=1e-15)


def test_cli_tables_show_ap_with_its_stored_interval(warehouse, capsys):
    from cli.tables import format_table

    sql = "SELECT layer, q_head, ap_overall, ap_overall_ci_low, ap_overall_ci_high FROM latest_head_metrics ORDER BY ALL"
    want = query(warehouse["wh"], sql)
    capsys.readouterr()
    assert main(["sql", sql, "--warehouse", str(warehouse["wh"])]) == 0
    header, rule, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["layer", "q_head", "ap_overall"]  # the interval's own columns merged into it
    assert [line.split(None, 2)[2] for line in lines] == [f"{ap:.4f} [{low:.4f}, {high:.4f}]" for _, _, ap, low, high in want]
    # CSV keeps every column as stored
    assert main(["sql", sql, "--warehouse", str(warehouse["wh"]), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "layer,q_head,ap_overall,ap_overall_ci_low,ap_overall_ci_high"
    # no stored interval (a run before standard errors): the value alone; a layer mean prefers the SE interval
    text = format_table(["model", "ap_overall", "ap_overall_ci_low", "ap_overall_ci_high"],
                        [("old\x1b[31m", 0.5, None, None), ("new", 0.99721, 0.99712, 0.99738)])
    assert [line.split() for line in text.splitlines()[2:]] == [["old\\x1b[31m", "0.5000"],
                                                                 ["new", "0.9972", "[0.9971,", "0.9974]"]]
    text = format_table(["mean_ap", "ci_low", "ci_high", "mean_ci_low", "mean_ci_high"], [(0.5, 0.1, 0.9, 0.4, 0.6)])
    assert text.splitlines()[2].split() == ["0.5000", "[0.4000,", "0.6000]", "0.1000", "0.9000"]


def test_sql_fits_the_terminal_and_writes_other_formats(warehouse, tmp_path, monkeypatch, capsys):
    import json

    import pyarrow.parquet as pq

    wh = str(warehouse["wh"])
    every = "SELECT * FROM latest_layer_plasticity"
    names = [r[0] for r in query(warehouse["wh"], "DESCRIBE latest_layer_plasticity")]
    want = query(warehouse["wh"], every)
    monkeypatch.setenv("COLUMNS", "70")  # the terminal's width, as shutil reads it
    capsys.readouterr()
    assert main(["sql", every, "--warehouse", wh]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines[:-1]) <= 70 and lines[0].split()[:3] == ["model", "run_id", "layer"]
    shown = len(lines[0].split())
    assert lines[-1].startswith(f"... {len(names) - shown - 2} more column(s) beyond 70 characters")  # 2 merged in
    assert main(["sql", every, "--warehouse", wh, "--max-width", "0"]) == 0
    full = capsys.readouterr().out.splitlines()
    assert len(full[0]) > 70 and full[0].split()[-1] == "se_df" and len(full) == 2 + len(want)
    # every column, in the other formats
    assert main(["sql", every, "--warehouse", wh, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [list(r) for r in got] == [names] * len(want)
    assert [[r[n] for n in names] for r in got] == [list(r) for r in want]
    assert main(["sql", every, "--warehouse", wh, "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| model | run_id | layer |") and md[1].startswith("|---|") and len(md) == 2 + len(want)
    out = tmp_path / "layers.parquet"
    assert main(["sql", every, "--warehouse", wh, "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: {len(want)} row(s), {len(names)} column(s) (parquet)"
    table = pq.read_table(out)
    assert table.column_names == names and str(table.schema.field("layer").type) == "int32"
    assert [tuple(r.values()) for r in table.to_pylist()] == want
    assert main(["sql", every, "--warehouse", wh, "--output", str(tmp_path / "layers.xlsx")]) == 2
    assert "extension must be one of .txt, .csv, .json, .md, .parquet" in capsys.readouterr().err


def many_models(warehouse, tmp_path, n: int):
    """A copy of the warehouse with n models: `small`'s latest run copied as m1..m{n-1}, AP scaled per model."""
    import shutil

    wh = tmp_path / "many.duckdb"
    shutil.copy(warehouse["wh"], wh)
    latest = warehouse["runs"][-1]
    with db.writer(wh) as con:
        for i in range(1, n):
            for table, scaled in (("runs", ""), ("head_metrics", f", ap_overall * {1 - 0.1 * i} AS ap_overall")):
                con.execute(f"INSERT INTO {table} SELECT * REPLACE ('m{i}' AS model{scaled}) FROM {table} "
                            "WHERE model = 'small' AND run_id = $r", {"r": latest})
    return wh


def test_compare_uses_small_multiples_past_four_models_and_one_colour_per_model(warehouse, tmp_path, monkeypatch):
    import seaborn as sns
    from matplotlib.colors import to_rgb

    wh = many_models(warehouse, tmp_path, 6)
    means = {(m, layer): ap for m, layer, ap in
             query(wh, "SELECT model, layer, mean_ap FROM latest_layer_plasticity")}
    models = ["m1", "m2", "m3", "m4", "m5", "small"]
    colours = dict(zip(models, (tuple(c) for c in sns.color_palette("colorblind", 6))))
    figures = drawn_figures(monkeypatch)
    # default (auto): 6 models > 4, one panel per model, its own line in its colour, the others grey
    assert main(["plot", "compare", "--warehouse", str(wh), "--output", str(tmp_path / "all.png")]) == 0
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == models
    for model, ax in zip(models, panels):
        (own,) = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and len(ln.get_xdata()) == 2]
        assert to_rgb(own.get_color()) == colours[model] == to_rgb(ax.title.get_color())
        assert list(own.get_ydata()) == pytest.approx([means[(model, 0)], means[(model, 1)]], rel=1e-12)
        assert sorted(ln.get_gid() for ln in ax.get_lines() if (ln.get_gid() or "").startswith("context")) == \
            sorted(f"context {m}" for m in models if m != model)
    # a figure of two of them: one axes (overlay), and each model keeps its colour
    assert main(["plot", "compare", "--warehouse", str(wh), "--models", "m3", "small",
                 "--output", str(tmp_path / "two.png")]) == 0
    (ax,) = figures[-1].axes
    legend = {t.get_text(): to_rgb(h.get_color()) for t, h in zip(ax.get_legend().get_texts(),
                                                                  ax.get_legend().legend_handles)}
    assert legend == {"m3": colours["m3"], "small": colours["small"]}
    # --layout overlay keeps 6 models on one axes
    assert main(["plot", "compare", "--warehouse", str(wh), "--layout", "overlay",
                 "--output", str(tmp_path / "one.png")]) == 0
    assert len(figures[-1].axes) == 1
