"""Every analysis option, given a non-default value on the `plasticity analyze` command line,
changes what it should and nothing else: a table of options x expected effect, each row one real
run against the same small dataset, compared with a run on the defaults. Then plot options, each
drawn from that warehouse and checked on the matplotlib objects against the stored rows.

An option that never reaches the computation passes every test that uses default values; here
each row checks its own effect, chosen so that a constant in its place would show (e.g. a KS
threshold so small that no p-value lies below it)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from plasticity.synthetic import SyntheticSpec
from warehouse.store import db
from warehouse.sources.demo_data import write_synthetic_dataset

DATA = SyntheticSpec(model="opts", num_layers=2, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=4,
                     seq_len=128, bucket_size=32, sliding_windows={1: 48}, seed=5)
HEADS = {(layer, h) for layer in range(DATA.num_layers) for h in range(DATA.num_q_heads)}
ROWS = DATA.num_examples * DATA.seq_len  # rows of every shard (dense capture)

NOISE = ("q_noise_med_abs_skew", "q_noise_med_abs_kurt", "q_noise_med_ks_p", "q_noise_frac_ks_p_lt_alpha")
POSITION = ("q_R2_pos", "q_beta_norm", "q_R2_scalar", "q_mae_baseline", "q_mae_proj", "q_mae_ratio",
            "q_resid0_skew", "q_resid0_kurt", "q_resid0_ks_p")
AP = ("ap_overall", "ap_overall_se")
#: every number of head_metrics compared below
METRICS = ("k_head", "n_q_tokens", "n_k_tokens", "d_model", *POSITION, *NOISE, *AP, "estimator")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("opts") / DATA.model, DATA, with_truth=False)


class Run:
    """One `plasticity analyze` of the dataset and what it stored."""

    def __init__(self, dataset: Path, tmp: Path, flags: list[str]):
        self.warehouse = str(tmp / "wh.duckdb")
        self.output_dir = tmp / "results"
        argv = ["analyze", "--dataset_local_root", str(dataset), "--warehouse", self.warehouse,
                "--output_dir", str(self.output_dir), "--max_workers", "1", "--quiet"]
        if "--attention" not in flags:
            argv += ["--attention", "false"]
        assert main(argv + flags) == 0
        with db.reader(self.warehouse) as con:
            self.model, self.run_id = con.execute("SELECT model, run_id FROM runs").fetchone()
            self.metrics = self._rows(con, "head_metrics")
            self.max_pairs = con.execute("SELECT max(n_pairs) FROM head_bucket_plasticity").fetchone()[0]
            self.attention = self._rows(con, "head_attention_summary")
            self.scales = sorted({r[0] for r in con.execute("SELECT DISTINCT scale FROM query_scale_sweep").fetchall()})

    @staticmethod
    def _rows(con, table: str) -> dict:
        cur = con.execute(f"SELECT * FROM {table}")
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        return {(r["layer"], r["q_head"]): r for r in rows}


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def unchanged(base: Run, got: Run, columns, heads=None) -> None:
    for head in heads or base.metrics:
        for col in columns:
            assert same(got.metrics[head][col], base.metrics[head][col]), (head, col)


def changed_somewhere(base: Run, got: Run, column: str) -> None:
    assert any(not same(got.metrics[h][column], base.metrics[h][column]) for h in got.metrics), column


def others(*columns) -> tuple:
    return tuple(c for c in METRICS if c not in columns)


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> Run:
    run = Run(dataset, tmp_path_factory.mktemp("base"), [])
    assert set(run.metrics) == HEADS
    fracs = [r["q_noise_frac_ks_p_lt_alpha"] for r in run.metrics.values()]
    assert max(fracs) < 1.0  # precondition: a threshold near 1 changes every head
    meds = [r["q_noise_med_ks_p"] for r in run.metrics.values()]
    assert min(meds) < 0.75 < max(meds)  # precondition: a threshold of 3/4 splits the heads
    assert run.max_pairs > 3  # precondition: 3 pairs per cell is fewer than the default draws
    return run


# ----------------------------------------------------------------------------- the effects

def p_alpha_mid(base, got):
    # 7 components tested: at least 4 of them below 3/4 exactly when their median is below 3/4
    for r in got.metrics.values():
        frac, med = r["q_noise_frac_ks_p_lt_alpha"], r["q_noise_med_ks_p"]
        assert frac * 7 == pytest.approx(round(frac * 7)) and (frac >= 4 / 7) == (med < 0.75), r
    unchanged(base, got, others("q_noise_frac_ks_p_lt_alpha"))


def p_alpha_large(base, got):
    assert all(r["q_noise_frac_ks_p_lt_alpha"] == 1.0 for r in got.metrics.values())
    unchanged(base, got, others("q_noise_frac_ks_p_lt_alpha"))


def normality_max_dims(base, got):
    # 3 of the 7 semantic components tested: the share below p_alpha is a multiple of 1/3
    for r in got.metrics.values():
        assert r["q_noise_frac_ks_p_lt_alpha"] * 3 == pytest.approx(round(r["q_noise_frac_ks_p_lt_alpha"] * 3))
    changed_somewhere(base, got, "q_noise_med_ks_p")
    unchanged(base, got, others(*NOISE))


def max_tokens(base, got):
    assert all(r["n_q_tokens"] == r["n_k_tokens"] == 200 for r in got.metrics.values())
    assert all(r["n_q_tokens"] == ROWS for r in base.metrics.values())
    changed_somewhere(base, got, "q_R2_pos")
    changed_somewhere(base, got, "ap_overall")


def seed(base, got):
    # every row is used: the seed only draws the key pairs
    changed_somewhere(base, got, "ap_overall")
    unchanged(base, got, others(*AP))


def num_pairs(base, got):
    assert got.max_pairs == 3
    changed_somewhere(base, got, "ap_overall")
    unchanged(base, got, others(*AP))


def estimator(base, got):
    assert {r["estimator"] for r in got.metrics.values()} == {"linear_diag"}
    assert {r["estimator"] for r in base.metrics.values()} == {"bucket_full_cov"}
    changed_somewhere(base, got, "ap_overall")
    unchanged(base, got, others(*AP, "estimator"))


def layers(base, got):
    assert set(got.metrics) == {h for h in HEADS if h[0] == 1}
    unchanged(base, got, METRICS, heads=got.metrics)


def one_key_head(base, got):
    # the configured layout applies where the card is silent: all four query heads share key head 0
    assert {r["k_head"] for r in got.metrics.values()} == {0}
    assert {r["k_head"] for r in base.metrics.values()} == {0, 1}
    unchanged(base, got, METRICS, heads=[h for h in HEADS if h[1] < 2])
    for layer in range(DATA.num_layers):
        assert got.metrics[(layer, 2)]["ap_overall"] != base.metrics[(layer, 2)]["ap_overall"]
    for head in HEADS:  # another key head orients the queries otherwise: the fit is the same up to rounding
        assert got.metrics[head]["q_R2_pos"] == pytest.approx(base.metrics[head]["q_R2_pos"], rel=1e-12)


def names(base, got):
    assert got.model == "renamed" and base.model == DATA.model
    unchanged(base, got, METRICS)
    folder = got.output_dir / got.model / got.run_id
    assert sorted(p.name for p in folder.iterdir()) == ["b.csv", "c.csv", "head_errors.csv", "m.csv"]
    assert sorted(p.name for p in (base.output_dir / base.model / base.run_id).iterdir()) == [
        "head_bucket_plasticity.csv", "head_component_weights.csv", "head_errors.csv", "head_metrics.csv"]
    assert (folder / "m.csv").read_text().splitlines()[0].startswith("layer,q_head,k_head,n_q_tokens")


OPTIONS = [
    (["--p_alpha", "0.75"], p_alpha_mid),
    (["--p_alpha", "0.999999"], p_alpha_large),
    (["--normality_max_dims", "3"], normality_max_dims),
    (["--max_tokens_per_head", "200"], max_tokens),
    (["--seed", "7"], seed),
    (["--num_pairs_per_bucket", "3"], num_pairs),
    (["--estimator", "linear_diag"], estimator),
    (["--layers", "1"], layers),
    (["--model", "renamed", "--output_csv", "m.csv", "--bucket_csv", "b.csv", "--component_csv", "c.csv"], names),
]


@pytest.mark.parametrize("flags, effect", OPTIONS, ids=[" ".join(f[::2]).replace("--", "") + f"={f[1]}"
                                                        for f, _ in OPTIONS])
def test_an_option_changes_what_it_should(dataset, base, tmp_path, flags, effect):
    effect(base, Run(dataset, tmp_path, flags))


def test_configured_head_counts_pair_heads_where_the_card_is_silent(dataset, base, tmp_path):
    """The config's head counts reach the pairing. The dataset's card is removed first: a card that
    gives other counts is a contradiction, refused before any work (tested in test_bad_input)."""
    copy = tmp_path / DATA.model
    shutil.copytree(dataset, copy)
    (copy / "README.md").unlink()
    one_key_head(base, Run(copy, tmp_path, ["--num_q_heads", "4", "--num_k_heads", "1"]))


# ----------------------------------------------------------------------------- attention options

@pytest.fixture(scope="module")
def attention_base(dataset, tmp_path_factory) -> Run:
    run = Run(dataset, tmp_path_factory.mktemp("abase"), ["--attention", "true", "--layers", "0"])
    assert {r["status"] for r in run.attention.values()} == {"exact"}
    assert {r["n_exact_rows"] for r in run.attention.values()} == {ROWS}
    assert run.scales == [0.5, 0.75, 1.0, 1.25, 1.5]
    return run


def attention_off(base, got):
    assert got.attention == {} and got.scales == []
    unchanged(base, got, METRICS)


def scales(base, got):
    assert got.scales == [2.0]
    assert got.attention[(0, 0)]["gain"] is None or math.isnan(got.attention[(0, 0)]["gain"])  # one scale: no slope
    unchanged(base, got, METRICS)


def min_rows_at_limit(base, got):
    assert {r["status"] for r in got.attention.values()} == {"exact"}
    assert {r["min_exact_rows"] for r in got.attention.values()} == {ROWS}
    for head, row in got.attention.items():
        assert same(row["mean_entropy"], base.attention[head]["mean_entropy"])


def min_rows_past_limit(base, got):
    assert {r["status"] for r in got.attention.values()} == {"not_estimable"}
    assert all(r["mean_entropy"] is None or math.isnan(r["mean_entropy"]) for r in got.attention.values())
    unchanged(base, got, METRICS)


ATTENTION_OPTIONS = [
    (["--attention", "false"], attention_off),
    (["--attention_scales", "2.0"], scales),
    (["--attention_min_exact_rows", str(ROWS)], min_rows_at_limit),
    (["--attention_min_exact_rows", str(ROWS + 1)], min_rows_past_limit),
]


@pytest.mark.parametrize("flags, effect", ATTENTION_OPTIONS,
                         ids=[f"{f[0][2:]}={f[1]}" for f, _ in ATTENTION_OPTIONS])
def test_an_attention_option_changes_what_it_should(dataset, attention_base, tmp_path, flags, effect):
    attention = [] if "--attention" in flags else ["--attention", "true"]
    effect(attention_base, Run(dataset, tmp_path, flags + attention + ["--layers", "0"]))


# ----------------------------------------------------------------------------- plot options

def draw(base: Run, kind: str, **kw):
    from warehouse.present import plot_data, plots

    where = {"warehouse": base.warehouse} if kind == "compare" else {"warehouse": base.warehouse, "model": base.model}
    return plots.make_plot(kind, plot_data.load_plot_options(kind, None, **where, **kw))[0]


def mean_line(res):
    """x and y of the curves plot's mean over heads (its widest line)."""
    line = max(res.figure.axes[0].get_lines(), key=lambda ln: ln.get_linewidth())
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def heatmap_values(res) -> np.ndarray:
    mesh = res.figure.axes[0].collections[0]
    values = np.ma.filled(mesh.get_array().astype(float), np.nan).ravel()
    return np.sort(values[np.isfinite(values)])


def cell_aggregate(base: Run, agg: str) -> np.ndarray:
    with db.reader(base.warehouse) as con:
        cells = con.execute("SELECT q_bucket, k_bucket, plasticity FROM head_bucket_plasticity").df()
    values = cells.groupby(["q_bucket", "k_bucket"])["plasticity"].agg(agg).to_numpy()
    return np.sort(values[np.isfinite(values)])


def bucket_size(base, res):
    x_default, y_default = mean_line(draw(base, "curves"))
    x, y = mean_line(res)
    assert x_default.max() > 0 and np.array_equal(x, x_default * 32) and np.array_equal(y, y_default)


def median_over_heads(base, res):
    np.testing.assert_allclose(heatmap_values(res), cell_aggregate(base, "median"), rtol=1e-12)
    assert not np.allclose(cell_aggregate(base, "median"), cell_aggregate(base, "mean"))  # precondition


def colour_range(base, res):
    assert res.figure.axes[0].collections[0].get_clim() == (0.2, 0.4)


def first_components(base, res):
    assert len(res.figure.axes[0].patches) == 3
    assert len(draw(base, "components").figure.axes[0].patches) == DATA.head_dim


def layer_lines(res):
    return [ln for ln in res.figure.axes[0].get_lines() if len(ln.get_xdata()) > 1]


def compared_metric(base, res):
    (line,) = layer_lines(res)
    want = [np.mean([r["q_R2_pos"] for h, r in base.metrics.items() if h[0] == layer]) for layer in (0, 1)]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


def titled(base, res):
    assert res.figure.axes[0].get_title().splitlines()[0] == "T"


def head_lines(res) -> dict:
    """The curves plot's head lines by legend label (``L1 H2``)."""
    return {ln.get_label(): ln for ln in res.figure.axes[0].get_lines() if ln.get_label().startswith("L")}


def stored_curves(base: Run) -> dict:
    """AP_j of every head by label: the mean of its non-NaN cells per query bucket, from the stored rows."""
    with db.reader(base.warehouse) as con:
        rows = con.execute("SELECT layer, q_head, q_bucket, avg(plasticity) FILTER (WHERE NOT isnan(plasticity)) "
                           "FROM head_bucket_plasticity GROUP BY ALL ORDER BY ALL").fetchall()
    out: dict = {}
    for layer, q_head, q_bucket, ap in rows:
        out.setdefault(f"L{layer} H{q_head}", []).append((q_bucket, ap))
    return out


def bucket_starts(base, res, start):
    lines = head_lines(res)
    curves = stored_curves(base)
    assert lines.keys() == curves.keys() and len(lines) == len(HEADS)
    for label, ln in lines.items():
        buckets, aps = zip(*[(b, ap) for b, ap in curves[label] if ap is not None])
        np.testing.assert_array_equal(ln.get_xdata(), start(np.asarray(buckets, float)))
        np.testing.assert_allclose(ln.get_ydata(), aps, rtol=1e-12)


def log_buckets(base, res):
    bucket_starts(base, res, lambda b: 2.0**b * 4.0)
    assert res.figure.axes[0].get_xscale() == "log"


def named(base, res):
    assert res.figure.axes[0].get_title().splitlines()[0] == f"Named per-bucket attention plasticity ({len(HEADS)} heads)"
    assert draw(base, "curves").figure.axes[0].get_title().startswith(f"{DATA.model} per-bucket")


def colour_map(base, res):
    mesh = res.figure.axes[0].collections[0]
    assert mesh.get_cmap().name == "magma" and draw(base, "heatmap").figure.axes[0].collections[0].get_cmap().name == "viridis"
    np.testing.assert_allclose(heatmap_values(res), cell_aggregate(base, "mean"), rtol=1e-12)


def by_layer(base, res):
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    want = {0: colormaps["viridis"](0.0), 1: colormaps["viridis"](0.9)}  # evenly spaced, the yellow end left out
    lines = head_lines(res)
    assert len(lines) == len(HEADS)
    for label, ln in lines.items():
        assert to_rgba(ln.get_color()) == want[int(label.split()[0][1:])], label
    bucket_starts(base, res, lambda b: b)


def palette(base, res):
    import seaborn as sns
    from matplotlib.colors import to_rgb

    lines = head_lines(res)
    order = [f"L{layer} H{h}" for layer, h in sorted(HEADS)]
    assert [to_rgb(lines[label].get_color()) for label in order] == [tuple(c) for c in sns.color_palette("deep", len(HEADS))]
    default = head_lines(draw(base, "curves"))
    assert to_rgb(default[order[0]].get_color()) != to_rgb(lines[order[0]].get_color())


def bands(res) -> list:
    return [c for c in res.figure.axes[0].collections if (c.get_gid() or "").startswith("ci")]


def no_intervals(base, res):
    from warehouse.present import plot_data, plots

    assert bands(res) == [] and len(bands(draw(base, "curves"))) == len(HEADS)  # 8 heads <= 12: a band each
    bucket_starts(base, res, lambda b: b)
    # the drawing itself leaves the intervals out when they are given (make_plot also skips reading them)
    cells, run_id = plot_data.load_run_table(base.warehouse, "head_bucket_plasticity", base.model)
    intervals = plot_data.load_bucket_intervals(base.warehouse, base.model, run_id)
    assert len(intervals) > 0
    assert bands(plots.plot_plasticity_curves(cells, plot_data.load_plot_options("curves", None, ci=False), intervals)) == []


def export(base: Run, name: str) -> str:
    return str(base.output_dir / base.model / base.run_id / name)


def curves_from_csv(base, res):
    x, y = mean_line(res)
    x_wh, y_wh = mean_line(draw(base, "curves"))
    assert np.array_equal(x, x_wh) and np.allclose(y, y_wh, rtol=1e-12, atol=0)
    bucket_starts(base, res, lambda b: b)


def components_from_csv(base, res):
    heights = [p.get_height() for p in res.figure.axes[0].patches]
    assert len(heights) == DATA.head_dim
    np.testing.assert_allclose(heights, [p.get_height() for p in draw(base, "components").figure.axes[0].patches],
                               rtol=1e-12)


def compare_from_csv(base, res):
    (line,) = layer_lines(res)
    want = [np.mean([r["ap_overall"] for h, r in base.metrics.items() if h[0] == layer]) for layer in (0, 1)]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


CSV_OPTIONS = [
    ("curves", "bucket_csv", "head_bucket_plasticity.csv", curves_from_csv),
    ("components", "component_csv", "head_component_weights.csv", components_from_csv),
    ("compare", "head_metrics_csv", "head_metrics.csv", compare_from_csv),
]


@pytest.mark.parametrize("kind, option, name, effect", CSV_OPTIONS, ids=[o for _, o, _, _ in CSV_OPTIONS])
def test_a_plot_from_the_exported_csv_draws_what_the_warehouse_draws(base, kind, option, name, effect):
    from warehouse.present import plot_data, plots

    effect(base, plots.make_plot(kind, plot_data.load_plot_options(kind, None, **{option: export(base, name)}))[0])


PLOT_OPTIONS = [
    ("curves", {"bucket_min_size": 32.0}, bucket_size),
    ("curves", {"bucket_type": "log", "bucket_min_size": 4.0}, log_buckets),
    ("curves", {"model_name": "Named"}, named),
    ("curves", {"color_by_layer": True}, by_layer),
    ("curves", {"palette": "deep"}, palette),
    ("curves", {"ci": False}, no_intervals),
    ("heatmap", {"cmap": "magma"}, colour_map),
    ("heatmap", {"agg": "median"}, median_over_heads),
    ("heatmap", {"vmin": 0.2, "vmax": 0.4}, colour_range),
    ("components", {"max_components": 3}, first_components),
    ("compare", {"metric": "q_R2_pos"}, compared_metric),
    ("curves", {"title": "T"}, titled),
]


@pytest.mark.parametrize("kind, options, effect", PLOT_OPTIONS,
                         ids=[f"{k}-{'-'.join(o)}" for k, o, _ in PLOT_OPTIONS])
def test_a_plot_option_changes_what_it_should(base, kind, options, effect):
    effect(base, draw(base, kind, **options))


def test_a_plot_of_an_earlier_run_by_its_run_id(dataset, base, tmp_path):
    """`run_id` picks a run other than the latest: a second run (another seed: other key pairs, other AP)
    is added to a copy of the warehouse; without run_id the plot shows it, with the first run's id the
    first run, line for line."""
    from warehouse.present import plot_data, plots

    wh = tmp_path / "two-runs.duckdb"
    shutil.copy(base.warehouse, wh)
    assert main(["analyze", "--dataset_local_root", str(dataset), "--warehouse", str(wh), "--output_dir",
                 str(tmp_path / "results"), "--max_workers", "1", "--quiet", "--attention", "false",
                 "--seed", "7"]) == 0
    with db.reader(wh) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)

    def curves(**kw):
        opts = plot_data.load_plot_options("curves", None, warehouse=str(wh), model=DATA.model, **kw)
        return {label: ln.get_ydata().tolist() for label, ln in head_lines(plots.make_plot("curves", opts)[0]).items()}

    first = {label: ln.get_ydata().tolist() for label, ln in head_lines(draw(base, "curves")).items()}
    assert curves(run_id=base.run_id) == first
    assert curves() != first  # the latest run, drawn by default
