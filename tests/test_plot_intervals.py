"""AP intervals in the plots: the bands and error bars drawn are the warehouse's stored
intervals, or the documented conservative interval of a mean, checked on the matplotlib objects of
plots drawn from a warehouse built by the real pipeline (two checkpoints of a family f)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from scipy import stats

from plasticity.mean_interval import mean_interval_bound
from warehouse.store import db
from warehouse.present import plots
from warehouse.present import plot_data

STEPS = {"c-1": 1, "c-2": 2}


@pytest.fixture(scope="module")
def warehouse(small_dataset, tmp_path_factory):
    from warehouse.settings.config import load_config
    from warehouse.run.pipeline import analyze_dataset

    wh = tmp_path_factory.mktemp("plot_intervals") / "wh.duckdb"
    for model, step in STEPS.items():
        cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": model,
                                 "family": "f", "step": step, "seed": step})
        analyze_dataset(cfg, small_dataset, progress=False)
    return wh


@pytest.fixture()
def old_runs(warehouse, tmp_path):
    """A copy where c-2 looks like a run made before standard errors were stored (NULL intervals, no
    head_bucket_summary rows) and c-1's head L0 H1 has a NaN standard error (too few examples)."""
    wh = tmp_path / "old.duckdb"
    shutil.copy(warehouse, wh)
    with db.writer(wh) as con:
        con.execute("UPDATE head_metrics SET ap_overall_se = NULL, ap_overall_ci_low = NULL, "
                    "ap_overall_ci_high = NULL, ap_se_df = NULL WHERE model = 'c-2'")
        con.execute("DELETE FROM head_bucket_summary WHERE model = 'c-2'")
        con.execute("UPDATE head_metrics SET ap_overall_se = 'nan', ap_overall_ci_low = 'nan', "
                    "ap_overall_ci_high = 'nan' WHERE model = 'c-1' AND layer = 0 AND q_head = 1")
        con.execute("UPDATE head_bucket_summary SET ap_se = 'nan', ap_ci_low = 'nan', ap_ci_high = 'nan' "
                    "WHERE model = 'c-1' AND layer = 0 AND q_head = 1")
    return wh


def query(wh, sql, params=None):
    with db.reader(wh) as con:
        return con.execute(sql, params or {}).df()


def draw(kind, wh, **kw):
    opts = plot_data.load_plot_options(kind, None, warehouse=str(wh), **kw)
    return plots.make_plot(kind, opts)[0]


def ci_artists(ax, kind=PolyCollection):
    return {c.get_gid(): c for c in ax.collections if isinstance(c, kind) and (c.get_gid() or "").startswith("ci")}


def band_edges(poly) -> dict[float, tuple[float, float]]:
    """x -> (lowest, highest) vertex of a fill_between band; every vertex at x is one of the two."""
    out: dict[float, set] = {}
    for path in poly.get_paths():
        for x, y in path.vertices:
            out.setdefault(round(float(x), 9), set()).add(float(y))
    assert all(len(ys) <= 2 for ys in out.values())  # a band's edge is its low and high, nothing between
    return {x: (min(ys), max(ys)) for x, ys in out.items()}


def bar_ends(lines: LineCollection) -> list[tuple[float, float, float]]:
    """(x, low, high) of every vertical error bar."""
    out = []
    for seg in lines.get_segments():
        seg = np.asarray(seg)
        assert seg[0, 0] == seg[1, 0]
        out.append((float(seg[0, 0]), float(seg[:, 1].min()), float(seg[:, 1].max())))
    return sorted(out)


def t975(df):
    return stats.t.ppf(0.975, np.asarray(df, dtype=float))


# --------------------------------------------------------------------------- the bound itself


def test_mean_interval_bound_closed_form_and_unknowns():
    x = np.array([[0.2, 0.4], [0.5, np.nan], [0.3, 0.6], [0.98, 0.99]])
    se = np.array([[0.01, 0.03], [0.05, np.nan], [0.1, np.nan], [0.02, 0.04]])
    df = np.array([[15, 9], [15, 9], [15, 9], [3, 0]])
    mean, bound, low, high = mean_interval_bound(x, se, df)
    np.testing.assert_allclose(mean, [0.3, 0.5, 0.45, 0.985])
    # row 0: mean of the SEs, the smaller df's t; row 1: the absent head does not count
    assert bound[0] == pytest.approx(0.02) and low[0] == pytest.approx(0.3 - t975(9) * 0.02)
    assert high[0] == pytest.approx(0.3 + t975(9) * 0.02)
    assert bound[1] == pytest.approx(0.05) and low[1] == pytest.approx(0.5 - t975(15) * 0.05)
    # row 2: a present head without an SE, row 3: a head with df 0: no interval (unknown, not guessed)
    assert np.isnan([bound[2], low[2], high[2], bound[3], low[3], high[3]]).all()
    _, _, low, high = mean_interval_bound([[0.99, 0.97]], [[0.05, 0.05]], [[15, 15]])
    assert high[0] == 1.0 and low[0] == pytest.approx(0.98 - t975(15) * 0.05)  # clipped to [0, 1]


def test_mean_interval_bound_holds_for_any_correlation():
    """Simulated errors: the bound equals the SD of the mean when errors are perfectly correlated and
    exceeds it otherwise (independent: sqrt(sum s^2) / k)."""
    rng = np.random.default_rng(0)
    s = np.array([0.01, 0.02, 0.05, 0.03])
    _, bound, _, _ = mean_interval_bound([[0.5] * 4], [s], [[1000] * 4])
    z = rng.standard_normal((200_000, 1))
    assert np.std((z * s).mean(axis=1)) == pytest.approx(bound[0], rel=0.01)  # perfectly correlated
    independent = (rng.standard_normal((200_000, 4)) * s).mean(axis=1)
    assert np.std(independent) == pytest.approx(np.sqrt((s ** 2).sum()) / 4, rel=0.01)
    assert np.sqrt((s ** 2).sum()) / 4 < bound[0]


# --------------------------------------------------------------------------- curves


def test_curves_draw_each_heads_stored_interval(warehouse):
    res = draw("curves", warehouse, model="c-1")
    ax = res.figure.axes[0]
    want = query(warehouse, "SELECT layer, q_head, q_bucket, ap_ci_low, ap_ci_high FROM latest_head_bucket_summary "
                            "WHERE model = 'c-1' ORDER BY ALL")
    assert len(want) > 0 and np.isfinite(want[["ap_ci_low", "ap_ci_high"]].to_numpy()).all()
    bands = ci_artists(ax)
    heads = want.groupby(["layer", "q_head"])
    assert set(bands) == {f"ci L{la} H{h}" for la, h in heads.groups} and res.n_heads == 8 <= 12
    size = 1.0  # bucket_min_size: make_plot draws bucket b at b * 1 unless told
    for (layer, q_head), g in heads:
        edges = band_edges(bands[f"ci L{layer} H{q_head}"])
        assert sorted(edges) == pytest.approx((g["q_bucket"] * size).tolist())  # the right buckets
        got = np.array([edges[round(b * size, 9)] for b in g["q_bucket"]])
        np.testing.assert_allclose(got, g[["ap_ci_low", "ap_ci_high"]].to_numpy(), rtol=1e-12, atol=1e-15)
    assert "95% interval of each head's AP" in ax.get_title() and res.extra["bands"] == "heads"


def test_curves_of_many_heads_draw_the_conservative_interval_of_the_mean(warehouse):
    res = draw("curves", warehouse, model="c-1", ci_max_heads=3)
    ax = res.figure.axes[0]
    assert set(ci_artists(ax)) == {"ci mean"}
    want = query(warehouse, """
        SELECT s.q_bucket, avg(s.ap) AS mean, avg(s.ap_se) AS se, min(h.ap_se_df) AS df
        FROM latest_head_bucket_summary AS s JOIN head_metrics AS h USING (model, run_id, layer, q_head)
        WHERE s.model = 'c-1' GROUP BY s.q_bucket ORDER BY s.q_bucket""")
    half = t975(want["df"]) * want["se"]
    size = 1.0  # bucket_min_size: make_plot draws bucket b at b * 1 unless told
    edges = band_edges(ci_artists(ax)["ci mean"])
    got = np.array([edges[round(b * size, 9)] for b in want["q_bucket"]])
    expect = np.c_[np.clip(want["mean"] - half, 0, 1), np.clip(want["mean"] + half, 0, 1)]
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-15)
    assert "conservative 95% interval of the mean" in ax.get_title() and res.extra["bands"] == "mean"


def test_curves_without_stored_intervals_or_with_ci_off_draw_no_band(old_runs, warehouse):
    ax = draw("curves", old_runs, model="c-2").figure.axes[0]
    assert not ci_artists(ax) and "no standard errors stored for this run" in ax.get_title()
    res = draw("curves", old_runs, model="c-1")  # head L0 H1 has a NaN SE: no band; the others keep theirs
    bands = ci_artists(res.figure.axes[0])
    assert "ci L0 H1" not in bands and len(bands) == 7
    assert "1 head(s) without a finite standard error" in res.figure.axes[0].get_title()
    cells, run_id = plot_data.load_run_table(warehouse, "head_bucket_plasticity", "c-1")
    stored = plot_data.load_bucket_intervals(warehouse, "c-1", run_id)
    assert len(stored) > 0
    for max_heads in (12, 1):  # intervals at hand, but ci: false
        opts = plot_data.load_plot_options("curves", None, ci=False, ci_max_heads=max_heads)
        ax = plots.plot_plasticity_curves(cells, opts, stored).figure.axes[0]
        assert not ci_artists(ax) and "interval" not in ax.get_title()
        assert not ci_artists(draw("curves", warehouse, model="c-1", ci=False, ci_max_heads=max_heads).figure.axes[0])


# --------------------------------------------------------------------------- comparison


def test_comparison_error_bars_are_each_heads_stored_interval(warehouse):
    res = draw("compare", warehouse, models=["c-1"])
    ax = res.figure.axes[0]
    want = query(warehouse, "SELECT layer, q_head, ap_overall_ci_low AS low, ap_overall_ci_high AS high "
                            "FROM latest_head_metrics WHERE model = 'c-1' ORDER BY layer, q_head")
    (bars,) = ci_artists(ax, LineCollection).values()
    got = bar_ends(bars)
    assert len(got) == len(want) == 8
    for layer, g in want.groupby("layer"):
        at_layer = sorted((lo, hi) for x, lo, hi in got if abs(x - layer) < 0.5)  # heads side by side
        np.testing.assert_allclose(at_layer, sorted(zip(g["low"], g["high"])), rtol=1e-12)
    assert "each head's stored 95% interval" in ax.get_title()


def test_comparison_error_bars_of_layer_means_follow_the_documented_bound(warehouse):
    res = draw("compare", warehouse)  # 16 heads > ci_max_heads: the layer means' intervals
    ax = res.figure.axes[0]
    want = query(warehouse, """
        SELECT model, layer, avg(ap_overall) AS mean, avg(ap_overall_se) AS se, min(ap_se_df) AS df
        FROM latest_head_metrics GROUP BY ALL ORDER BY ALL""")
    bars = ci_artists(ax, LineCollection)
    assert set(bars) == {"ci c-1", "ci c-2"}
    for model, g in want.groupby("model"):
        half = t975(g["df"]) * g["se"]
        expect = list(zip(g["layer"].astype(float), np.clip(g["mean"] - half, 0, 1), np.clip(g["mean"] + half, 0, 1)))
        np.testing.assert_allclose(bar_ends(bars[f"ci {model}"]), expect, rtol=1e-12, atol=1e-15)
    assert "conservative 95% interval of the mean over the layer's heads" in ax.get_title()
    assert not ci_artists(draw("compare", warehouse, metric="q_R2_pos").figure.axes[0], LineCollection)
    assert not ci_artists(draw("compare", warehouse, ci=False).figure.axes[0], LineCollection)


def test_comparison_without_stored_intervals_says_so(old_runs):
    ax = draw("compare", old_runs).figure.axes[0]
    assert set(ci_artists(ax, LineCollection)) == {"ci c-1"}  # c-1's layer 0 mean has no bar (a NaN SE)
    assert "no error bars for c-2: no finite stored interval" in ax.get_title()
    assert len(ci_artists(ax, LineCollection)["ci c-1"].get_segments()) == 1


# --------------------------------------------------------------------------- trajectories


def trajectory(wh, **kw):
    return draw("trajectory", wh, family="f", **kw)


def test_trajectory_bands_are_each_heads_stored_interval(warehouse):
    res = trajectory(warehouse)
    ax = res.figure.axes[0]
    want = query(warehouse, "SELECT step, layer, q_head, ap_overall_ci_low AS low, ap_overall_ci_high AS high "
                            "FROM family_head_trajectory WHERE family = 'f' ORDER BY ALL")
    bands = ci_artists(ax)
    assert len(bands) == 8 and res.extra["bands"] == "heads"
    for (layer, q_head), g in want.groupby(["layer", "q_head"]):
        edges = band_edges(bands[f"ci L{layer} H{q_head}"])
        np.testing.assert_allclose([edges[float(s)] for s in g["step"]], g[["low", "high"]].to_numpy(), rtol=1e-12)
    assert "95% interval of each head's AP" in res.figure._suptitle.get_text()


def test_trajectory_of_many_heads_bands_the_layer_means_by_the_documented_bound(warehouse):
    res = trajectory(warehouse, ci_max_heads=4)
    ax = res.figure.axes[0]
    want = query(warehouse, """
        SELECT layer, step, avg(ap_overall) AS mean, avg(ap_overall_se) AS se, min(ap_se_df) AS df
        FROM family_head_trajectory WHERE family = 'f' GROUP BY ALL ORDER BY ALL""")
    bands = ci_artists(ax)
    assert set(bands) == {"ci layer 0", "ci layer 1"}
    for layer, g in want.groupby("layer"):
        half = t975(g["df"]) * g["se"]
        edges = band_edges(bands[f"ci layer {layer}"])
        np.testing.assert_allclose([edges[float(s)] for s in g["step"]],
                                   np.c_[np.clip(g["mean"] - half, 0, 1), np.clip(g["mean"] + half, 0, 1)], rtol=1e-12)
    assert "conservative 95% interval of the mean over the layer's heads" in res.figure._suptitle.get_text()
    assert not ci_artists(trajectory(warehouse, ci=False).figure.axes[0])
    assert not ci_artists(trajectory(warehouse, ci=False, ci_max_heads=1).figure.axes[0])


def test_trajectory_of_runs_without_intervals_draws_lines_without_bands(old_runs):
    with db.writer(old_runs) as con:  # c-1 as old as c-2
        con.execute("UPDATE head_metrics SET ap_overall_se = NULL, ap_overall_ci_low = NULL, "
                    "ap_overall_ci_high = NULL, ap_se_df = NULL")
    for kw in ({}, {"ci_max_heads": 1}):
        res = trajectory(old_runs, **kw)
        ax = res.figure.axes[0]
        assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
        lines = [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none")]
        assert len(lines) == 8 + 2  # each head (faint) and each layer's mean (bold), with or without bands
        assert "no standard errors stored for these runs" in res.figure._suptitle.get_text()


# --------------------------------------------------------------------------- the head-count limit

@pytest.mark.parametrize("kind, kw, n_heads", [
    ("curves", {"model": "c-1"}, 8),
    ("trajectory", {"family": "f"}, 8),
    ("compare", {}, 16),
])
def test_per_head_intervals_up_to_exactly_ci_max_heads_heads(warehouse, kind, kw, n_heads):
    """With as many heads as ci_max_heads each head keeps its own interval; one head more and the
    plot shows the interval of the mean instead."""
    at = draw(kind, warehouse, ci_max_heads=n_heads, **kw)
    past = draw(kind, warehouse, ci_max_heads=n_heads - 1, **kw)
    assert at.extra["bands"] == "heads" and past.extra["bands"] == "mean"
    if kind == "compare":
        at_bars = sum(len(c.get_segments()) for c in ci_artists(at.figure.axes[0], LineCollection).values())
        past_bars = sum(len(c.get_segments()) for c in ci_artists(past.figure.axes[0], LineCollection).values())
        assert at_bars == n_heads and past_bars == 4  # two models x two layer means
    else:
        assert len(ci_artists(at.figure.axes[0])) == n_heads
        assert set(ci_artists(past.figure.axes[0])) == ({"ci mean"} if kind == "curves" else {"ci layer 0", "ci layer 1"})


def test_the_mean_band_of_heads_with_unequal_degrees_of_freedom_uses_the_smallest(small_copy, tmp_path):
    """Two heads see half of the examples (fewer jackknife groups, fewer degrees of freedom): the
    band of the mean over all heads takes the t quantile of the smallest, the widest."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from warehouse.settings.config import load_config
    from warehouse.run.pipeline import analyze_dataset

    for name in ("l00h00k", "l00h00q", "l00h01q"):
        path = small_copy / name / "data.parquet"
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.less(table.column("example_id"), 4)), path)
    wh = tmp_path / "wh.duckdb"
    cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": "u"})
    assert analyze_dataset(cfg, small_copy, progress=False).n_done == 8
    dfs = query(wh, "SELECT layer, q_head, ap_se_df FROM head_metrics ORDER BY ALL")
    assert sorted(set(dfs["ap_se_df"])) == [3, 7]  # precondition: unequal degrees of freedom
    res = draw("curves", wh, model="u", ci_max_heads=1)
    want = query(wh, """
        SELECT s.q_bucket, avg(s.ap) AS mean, avg(s.ap_se) AS se, min(h.ap_se_df) AS df_min,
               max(h.ap_se_df) AS df_max
        FROM latest_head_bucket_summary AS s JOIN head_metrics AS h USING (model, run_id, layer, q_head)
        GROUP BY s.q_bucket ORDER BY s.q_bucket""")
    edges = band_edges(ci_artists(res.figure.axes[0])["ci mean"])
    got = np.array([edges[round(float(b), 9)] for b in want["q_bucket"]])
    for df, matches in (("df_min", True), ("df_max", False)):
        half = t975(want[df]) * want["se"]
        expect = np.c_[np.clip(want["mean"] - half, 0, 1), np.clip(want["mean"] + half, 0, 1)]
        assert np.allclose(got, expect, rtol=1e-12, atol=1e-15) == matches, df
