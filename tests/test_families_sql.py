"""The trajectory views, on one warehouse file and on several at once, against independent references.

A tiny synthetic family of three checkpoints is analysed for real (one file per checkpoint, and all in one
file), plus an older run of one checkpoint (which the views must not read) and a model without a family.
Every number of every view is recomputed in pandas/numpy/scipy from the raw tables; a hand-made warehouse
gives closed-form cases (NaN heads, one-head layers, a superseded run).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cli.main import main
from plasticity.synthetic import FamilySpec, SyntheticSpec
from warehouse.store import db, sandbox, schema
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_family
from warehouse.run.pipeline import analyze_dataset

FAMILY = FamilySpec(
    family="tfam", steps=(10, 100, 1000), stages=("a", "a", "b"), layer_rates=(0.25, -0.25),
    head_scales=(0.2, 0.3, 0.5),
    base=SyntheticSpec(model="tfam", num_layers=2, num_q_heads=3, num_k_heads=1, head_dim=4, num_examples=2,
                       seq_len=64, bucket_size=16, sliding_windows={}, seed=0))
#: The migration adding models.family/stage/step (its number may change when branches merge).
FAMILIES_MIGRATION = next(m.version for m in schema.migrations() if m.name.endswith("_model_families.sql"))
VIEWS = ("family_checkpoints", "family_head_metrics_long", "family_layer_metric_trajectory",
         "family_layer_trajectory", "family_head_trajectory")
HEAD_METRICS = ("n_q_tokens", "n_k_tokens", "q_R2_pos", "q_beta_norm", "q_R2_scalar", "q_mae_baseline", "q_mae_proj",
                "q_mae_ratio", "q_resid0_skew", "q_resid0_kurt", "q_resid0_ks_p", "q_noise_med_abs_skew",
                "q_noise_med_abs_kurt", "q_noise_med_ks_p", "q_noise_frac_ks_p_lt_alpha", "ap_overall", "ap_overall_se")
ATTENTION_METRICS = ("mean_entropy", "mean_entropy_ratio", "mean_max_attn", "mean_k_eff", "mean_query_norm",
                     "mean_n_keys", "mean_key_coverage", "row_std", "local_attn_near", "local_attn_far",
                     "local_bias_ratio", "same_token_attn", "diff_token_attn", "same_token_ratio", "qvar_l2_adjacent",
                     "qvar_l2_distant", "gain", "gain_r2")


def analyse(folder: Path, model: str, warehouse: Path, seed: int = 0, **family) -> None:
    cfg = load_config(None, {"dataset_local_root": str(folder), "model": model, "warehouse": str(warehouse),
                             "max_workers": 1, "seed": seed, "attention_scales": [0.5, 1.0, 2.0], **family})
    analyze_dataset(cfg, folder, model=model, progress=False)


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family_sql")
    folders = write_synthetic_family(tmp / "data", FAMILY, with_truth=False)
    single, per_model = tmp / "single" / "all.duckdb", tmp / "per-model"
    for wh in (single, None):
        for step, folder in folders.items():
            model = FAMILY.model(step)
            target = wh or per_model / f"{model}.duckdb"
            keys = {"family": FAMILY.family, "stage": FAMILY.stage(step), "step": step}
            if step == 10:  # an older run with another seed: superseded by the run below
                analyse(folder, model, target, seed=1, **keys)
            analyse(folder, model, target, **keys)
        analyse(folders[100], "loner", wh or per_model / "loner.duckdb")  # no family
    return {"single": single, "per_model": sorted(per_model.glob("*.duckdb")), "tmp": tmp, "folders": folders}


def raw_tables(paths: list[Path]) -> dict[str, pd.DataFrame]:
    frames: dict[str, list[pd.DataFrame]] = {}
    for path in paths:
        with duckdb.connect(str(path), read_only=True) as con:
            for t in ("runs", "models", "head_metrics", "head_attention_summary"):
                frames.setdefault(t, []).append(con.execute(f"SELECT * FROM {t}").df())
    return {t: pd.concat(f, ignore_index=True) for t, f in frames.items()}


def reference_long(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """(family, stage, step, model, run_id, layer, q_head, k_head, metric, value) from the raw tables."""
    runs = raw["runs"].sort_values(["started_at", "run_id"], ascending=[False, True])
    latest = runs.groupby("model", sort=False).head(1)[["model", "run_id"]]
    ckpt = raw["models"].dropna(subset=["family"])[["family", "stage", "step", "model"]].merge(latest, on="model")
    keys = ["model", "run_id", "layer", "q_head", "k_head"]
    wide = ckpt.merge(raw["head_metrics"], on=["model", "run_id"]).merge(
        raw["head_attention_summary"][keys + list(ATTENTION_METRICS)], on=keys, how="left")
    long = wide.melt(id_vars=["family", "stage", "step", "model", "run_id", "layer", "q_head", "k_head"],
                     value_vars=list(HEAD_METRICS + ATTENTION_METRICS), var_name="metric", value_name="value")
    long["value"] = long["value"].astype(np.float64)
    return long.dropna(subset=["value"]).reset_index(drop=True)  # NULL -> no row; NaN stays NaN? see below


def reference_layers(long: pd.DataFrame) -> pd.DataFrame:
    rows = []
    keys = ["family", "stage", "step", "model", "run_id", "layer", "metric"]
    for key, g in long.groupby(keys, sort=True, dropna=False):
        v = g["value"].to_numpy(dtype=np.float64)
        fin = v[np.isfinite(v)]
        n = fin.size
        sd = float(np.std(fin, ddof=1)) if n >= 2 else np.nan
        half = stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) if n >= 2 else np.nan
        mean = float(np.mean(fin)) if n else np.nan
        q = np.quantile(fin, [0.25, 0.5, 0.75]) if n else [np.nan] * 3
        rows.append({**dict(zip(keys, key)), "n_heads": n, "n_not_finite": int(v.size - n), "mean_value": mean,
                     "sd_value": sd, "ci_low": mean - half, "ci_high": mean + half, "median_value": q[1],
                     "q1_value": q[0], "q3_value": q[2], "min_value": fin.min() if n else np.nan,
                     "max_value": fin.max() if n else np.nan})
    return pd.DataFrame(rows)


def view(paths, name: str, order: str) -> pd.DataFrame:
    with sandbox.sandbox(list(paths)) as con:
        return con.execute(f"SELECT * FROM {name} ORDER BY {order}").df()


def assert_frames(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)[list(got.columns)]
    assert len(got) == len(want) and len(got) > 0
    for col in got.columns:
        a, b = got[col], want[col]
        if pd.api.types.is_float_dtype(b) or pd.api.types.is_float_dtype(a):
            np.testing.assert_allclose(a.to_numpy(dtype=np.float64), b.to_numpy(dtype=np.float64), rtol=1e-12,
                                       atol=1e-15, err_msg=col)
        else:
            assert [None if pd.isna(x) else x for x in a] == [None if pd.isna(x) else x for x in b], col


# --------------------------------------------------------------------------- the t quantile


#: t_0.975(df) correctly rounded to float64, computed with mpmath at 50 digits (inverting the regularised
#: incomplete beta function), both sides of the table's end (599 / 600) included.
T975_EXACT = {1: 12.706204736174705, 2: 4.302652729749464, 3: 3.1824463052837095, 10: 2.228138851986275, 30: 2.042272456301238, 100: 1.9839715185235522, 299: 1.96792966906567, 300: 1.9679030112610871, 301: 1.9678765312856954, 450: 1.9652496647364674, 599: 1.9639322489452788, 600: 1.9639256220427295, 601: 1.9639190172367824, 650: 1.9636203223723645, 750: 1.963132036685773, 873: 1.962685070094358, 1000: 1.9623390808264085, 2500: 1.9609133447955673, 5000: 1.960438551706508, 100000: 1.9599877075346097}


def test_t_quantile_macro_is_correctly_rounded_at_reference_points_and_agrees_with_scipy():
    con = duckdb.connect()
    schema.apply(con, 0)
    for df, want in T975_EXACT.items():
        assert con.execute("SELECT t_quantile_975($df)", {"df": df}).fetchone()[0] == want, df
    got = con.execute("SELECT t_quantile_975(df) AS t FROM range(1, 5001) r(df) ORDER BY df").fetchnumpy()["t"]
    np.testing.assert_allclose(got, stats.t.ppf(0.975, np.arange(1, 5001)), rtol=5e-15, atol=0)  # scipy is off by up to 3.4e-15 (df = 6)
    assert con.execute("SELECT t_quantile_975(0), t_quantile_975(NULL), t_quantile_975(-3)").fetchone() == (
        None, None, None)


# --------------------------------------------------------------------------- closed form


def test_closed_form_layer_statistics_nan_heads_and_superseded_runs(tmp_path):
    wh = tmp_path / "wh.duckdb"
    db.ensure_schema(wh)
    with db.writer(wh) as con:
        con.execute("INSERT INTO runs (run_id, model, started_at, status) VALUES "
                    "('old', 'c1', TIMESTAMP '2026-01-01', 'succeeded'), ('new', 'c1', TIMESTAMP '2026-01-02', 'partial'),"
                    "('r2', 'c2', TIMESTAMP '2026-01-01', 'succeeded'), ('r3', 'solo', TIMESTAMP '2026-01-01', 'succeeded')")
        con.execute("INSERT INTO models (model, family, stage, step) VALUES ('c1', 'f', 's', 5), ('c2', 'f', NULL, 50), "
                    "('solo', NULL, NULL, NULL)")
        con.execute("""INSERT INTO head_metrics (model, run_id, layer, q_head, k_head, ap_overall, ap_overall_se) VALUES
            ('c1', 'new', 0, 0, 0, 0.1, 0.01), ('c1', 'new', 0, 1, 0, 0.2, 0.01), ('c1', 'new', 0, 2, 0, 0.3, 0.01),
            ('c1', 'new', 0, 3, 0, 'NaN', 'NaN'), ('c1', 'new', 1, 0, 0, 0.7, 0.02),
            ('c1', 'old', 0, 0, 0, 0.9, 0.01), ('c1', 'old', 1, 0, 0, 0.9, 0.01),
            ('c2', 'r2', 0, 0, 0, 0.5, 0.03), ('c2', 'r2', 0, 1, 0, 0.5, 0.03),
            ('solo', 'r3', 0, 0, 0, 0.4, 0.01)""")
    rows = view([wh], "family_layer_trajectory", "step, layer")
    assert list(rows["model"]) == ["c1", "c1", "c2"] and set(rows["run_id"]) == {"new", "r2"}
    first, one_head, flat = (rows.iloc[i] for i in range(3))
    half = 4.302652729749462 * 0.1 / np.sqrt(3)  # t(0.975, 2), sd of 0.1, 0.2, 0.3 is 0.1
    assert (first.n_heads, first.n_not_finite, first.stage) == (3, 1, "s")
    np.testing.assert_allclose([first.mean_ap, first.sd_ap, first.ci_low, first.ci_high, first.median_ap,
                                first.q1_ap, first.q3_ap, first.min_ap, first.max_ap],
                               [0.2, 0.1, 0.2 - half, 0.2 + half, 0.2, 0.15, 0.25, 0.1, 0.3], rtol=1e-13)
    assert (one_head.n_heads, one_head.mean_ap) == (1, 0.7)
    assert pd.isna(one_head.sd_ap) and pd.isna(one_head.ci_low) and pd.isna(one_head.ci_high)
    assert (flat.n_heads, flat.mean_ap, flat.sd_ap, flat.ci_low, flat.ci_high) == (2, 0.5, 0.0, 0.5, 0.5)
    assert pd.isna(flat.stage)
    heads = view([wh], "family_head_trajectory", "step, layer, q_head")
    assert len(heads) == 7 and np.isnan(heads["ap_overall"].iloc[3]) and heads["ap_overall_se"].iloc[4] == 0.02
    ckpts = view([wh], "family_checkpoints", "step")
    assert list(zip(ckpts["model"], ckpts["run_id"], ckpts["status"])) == [("c1", "new", "partial"),
                                                                           ("c2", "r2", "succeeded")]


# --------------------------------------------------------------------------- real runs


def test_views_on_one_file_equal_the_reference(family_data):
    single = family_data["single"]
    raw = raw_tables([single])
    long = reference_long(raw)
    assert set(long["metric"]) == set(HEAD_METRICS + ATTENTION_METRICS)
    assert long["model"].nunique() == 3 and "loner" not in set(long["model"])
    assert_frames(view([single], "family_head_metrics_long", "step, layer, q_head, metric"), long,
                  ["step", "layer", "q_head", "metric"])
    ref = reference_layers(long)
    assert_frames(view([single], "family_layer_metric_trajectory", "step, layer, metric"), ref,
                  ["step", "layer", "metric"])
    ap = ref[ref["metric"] == "ap_overall"].drop(columns="metric").rename(columns={
        "mean_value": "mean_ap", "sd_value": "sd_ap", "median_value": "median_ap", "q1_value": "q1_ap",
        "q3_value": "q3_ap", "min_value": "min_ap", "max_value": "max_ap"})
    got = view([single], "family_layer_trajectory", "step, layer")
    assert_frames(got, ap, ["step", "layer"])
    assert len(got) == 6 and (got["n_heads"] == 3).all() and got["ci_low"].lt(got["mean_ap"]).all()
    # the superseded seed-1 run of step 10 is in the file, but not in the views
    runs = raw["runs"]
    assert (runs["model"] == FAMILY.model(10)).sum() == 2
    assert got.loc[got["step"] == 10, "run_id"].nunique() == 1


def test_several_files_give_the_same_views_as_one(family_data):
    per_model, single = family_data["per_model"], family_data["single"]
    assert len(per_model) == 4
    for name, order in (("family_layer_metric_trajectory", "step, layer, metric"),
                        ("family_head_trajectory", "step, layer, q_head"), ("family_checkpoints", "step")):
        many = view(per_model, name, order).drop(columns=["started_at"], errors="ignore")
        one = view([single], name, order).drop(columns=["started_at"], errors="ignore")
        pd.testing.assert_frame_equal(many, one, check_exact=True)
    with sandbox.sandbox(per_model) as con:  # each file also on its own, under its stem
        (n,) = con.execute(f'SELECT count(*) FROM "{FAMILY.model(100)}".head_metrics').fetchone()
        assert n == 6


def test_sql_command_reads_globs_templates_and_repeated_files(family_data, capsys):
    folder = family_data["per_model"][0].parent
    query = "SELECT model, count(*) AS n FROM family_head_trajectory GROUP BY model ORDER BY model"
    outputs = []
    for flags in (["--warehouse", str(folder / "*.duckdb")], ["--warehouse", str(folder / "{model}.duckdb")],
                  [x for p in family_data["per_model"] for x in ("--warehouse", str(p))],
                  ["--warehouse", str(folder / "tfam-*.duckdb"), "--warehouse", str(folder / "*.duckdb")]):
        capsys.readouterr()
        assert main(["sql", query, "--csv", *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert len(set(outputs)) == 1
    assert outputs[0].splitlines() == ["model,n"] + [f"{FAMILY.model(s)},6" for s in (10, 100, 1000)]


def test_one_model_in_two_files_is_an_error(family_data, tmp_path, capsys):
    dup = tmp_path / "copy-of-all.duckdb"
    shutil.copy(family_data["single"], dup)
    code = main(["sql", "SELECT 1", "--warehouse", str(family_data["single"]), "--warehouse", str(dup)])
    err = capsys.readouterr().err
    assert code == 2 and "is in several warehouse files" in err and str(dup) in err
    assert "model 'loner'" in err and "and 3 more model(s)" in err


def test_expanding_warehouse_paths(tmp_path):
    odd = tmp_path / "odd[1]"  # glob characters in a folder name stay literal around {model}
    odd.mkdir()
    for name in ("b", "a"):
        db.ensure_schema(odd / f"{name}.duckdb")
    (odd / "a.duckdb.wal").write_text("")
    assert db.expand_warehouse_paths([str(odd / "{model}.duckdb")]) == [odd / "a.duckdb", odd / "b.duckdb"]
    assert db.expand_warehouse_paths([str(odd / "a.duckdb"), str(odd / "{model}.duckdb")]) == [
        odd / "a.duckdb", odd / "b.duckdb"]
    assert db.expand_warehouse_paths([str(tmp_path / "missing.duckdb")]) == [tmp_path / "missing.duckdb"]
    for pattern in (str(tmp_path / "*.duckdb"), str(tmp_path / "nothing" / "{model}.duckdb")):
        with pytest.raises(FileNotFoundError, match="no warehouse file matches"):
            db.expand_warehouse_paths([pattern])


def test_an_older_warehouse_joins_the_union_and_upgrades_with_the_families_migration(family_data, tmp_path, monkeypatch):
    old = tmp_path / "old.duckdb"
    (loner,) = [p for p in family_data["per_model"] if p.stem == "loner"]  # a model without a family
    shutil.copy(loner, old)
    with duckdb.connect(str(old)) as con:  # as version 2 left it
        for v in VIEWS:
            con.execute(f"DROP VIEW {v}")
        for column in ("family", "stage", "step"):
            con.execute(f"ALTER TABLE models DROP COLUMN {column}")
        con.execute("DELETE FROM schema_migrations WHERE version >= $v", {"v": FAMILIES_MIGRATION})
    others = [p for p in family_data["per_model"] if p.stem != "loner"]
    ckpts = view([*others, old], "family_checkpoints", "step")
    assert list(ckpts["model"]) == [FAMILY.model(s) for s in FAMILY.steps]
    with sandbox.sandbox([*others, old]) as con:
        assert con.execute("SELECT family FROM models WHERE model = 'loner'").fetchall() == [(None,)]
    before = tuple(m for m in schema.migrations() if m.version < FAMILIES_MIGRATION)
    monkeypatch.setattr(schema, "migrations", lambda: before)
    monkeypatch.setattr(schema, "schema_version", lambda: FAMILIES_MIGRATION - 1)
    with pytest.raises(db.WarehouseError, match="without a migration"):
        db.check_existing_schema(old, 5.0)  # schema.sql has the columns; without the migration the upgrade lacks them
    monkeypatch.undo()
    assert db.ensure_schema(old) == schema.schema_version()
    with db.reader(old) as con:
        cols = con.execute("SELECT column_name, data_type, comment FROM duckdb_columns() WHERE table_name = 'models' "
                           "AND column_name IN ('family', 'stage', 'step') ORDER BY column_index").fetchall()
    assert [(c, t) for c, t, _ in cols] == [("family", "VARCHAR"), ("stage", "VARCHAR"), ("step", "BIGINT")]
    assert all(comment for _, _, comment in cols)


HOLD_LOCK = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
""")


def test_attaching_waits_for_a_writer_and_counts_the_wait(family_data, tmp_path):
    files = [tmp_path / p.name for p in family_data["per_model"]]
    for src, dst in zip(family_data["per_model"], files):
        shutil.copy(src, dst)
    before = db.LOCK_WAITS.copy()
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(files[1]), "1.0"], stdout=subprocess.PIPE,
                          text=True) as holder:
        assert holder.stdout.readline().strip() == "locked"
        rows = view(files, "family_checkpoints", "step")  # waits until the holder lets go
        holder.wait()
    assert len(rows) == 3
    assert db.LOCK_WAITS.count == before.count + 1 and db.LOCK_WAITS.seconds > before.seconds
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(files[2]), "30"], stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(db.WarehouseBusy, match=str(files[2]).replace("[", "\\[")):
                with sandbox.sandbox(files, timeout_s=0.3):
                    pass
        finally:
            holder.kill()
