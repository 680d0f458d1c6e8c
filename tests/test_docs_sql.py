"""The SQL a researcher copies from README.md, docs/ and the demo's hint gives the right numbers.

The warehouse holds two runs of the demo model (different seed and sampling cap, so their numbers
differ), one run of the tiny-llama fixture and a synthetic family of three checkpoints (one of them
analysed twice, with different seeds). Every documented query is run through the real
`plasticity sql` entry point and compared with an independent pandas/numpy/scipy computation over
the raw tables restricted to each model's latest run (found from `runs` in pandas, not through
the views).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cli.main import FAMILY_HINT, main
from plasticity.synthetic import FamilySpec, SyntheticSpec
from warehouse.sources.demo_data import write_synthetic_family

try:
    from tests.test_families_sql import reference_layers, reference_long
except ImportError:  # pragma: no cover
    from test_families_sql import reference_layers, reference_long

REPO = Path(__file__).resolve().parents[1]
DOCS_FAMILY = FamilySpec(
    family="docs-fam", steps=(10, 100, 1000), stages=("s1", "s1", "s2"), layer_rates=(0.5, -0.5),
    head_scales=(0.2, 0.3, 0.5),
    base=SyntheticSpec(model="docs-fam", num_layers=2, num_q_heads=3, num_k_heads=1, head_dim=4, num_examples=2,
                       seq_len=64, bucket_size=16, sliding_windows={}, seed=4))
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TINY_LLAMA = REPO / "tests" / "fixtures" / "tiny-llama" / "dense" / "tinyllama"
MARKER_RE = re.compile(r"<!-- sql-example: ([a-z0-9-]+) -->\s*```sql\n(.*?)```", re.S)
SQL_BLOCK_RE = re.compile(r"```sql\n(.*?)```", re.S)
COMMAND_RE = re.compile(r'plasticity sql "([^"]+)"')
# tables and views holding several runs or models: a query reading them is a documented example
# views that read only the latest run of every model (sql/trajectories.sql)
LATEST_ONLY = {"latest_layer_plasticity", "family_checkpoints", "family_head_metrics_long", "family_layer_metric_trajectory",
               "family_layer_trajectory", "family_head_trajectory"}
MULTI_RUN = {"runs", "head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors",
             "token_attention", "head_attention_summary", "query_scale_sweep", "bucket_plasticity",
             "layer_plasticity", "latest_runs", "latest_head_metrics", "latest_head_bucket_plasticity",
             "latest_head_component_weights", "shards", "shard_buckets", "head_samples"}


def normalized(query: str) -> str:
    return " ".join(query.split()).rstrip(";")


def documented_examples() -> dict[str, str]:
    """{name: query} of the marked ```sql blocks of README.md and docs/*.md."""
    out: dict[str, str] = {}
    for path in DOC_FILES:
        for name, query in MARKER_RE.findall(path.read_text()):
            assert name not in out, f"two SQL examples are named {name}"
            out[name] = query
    return out


def tables_read(query: str) -> set[str]:
    """Base tables and views a query reads, from DuckDB's own parse tree."""
    con = duckdb.connect()
    tree = json.loads(con.execute("SELECT json_serialize_sql($q)", {"q": query}).fetchone()[0])
    assert not tree["error"], tree

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE":
                yield node["table_name"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return set(walk(tree))


# ----------------------------------------------------------------------------- the warehouse


@pytest.fixture(scope="module")
def warehouse(demo_dataset, tmp_path_factory):
    """Two runs of synthetic-demo (seed 0, then seed 1 with a 4096-row cap) and one of tinyllama."""
    tmp = tmp_path_factory.mktemp("docs_sql")
    wh = tmp / "wh.duckdb"
    common = ["--warehouse", str(wh), "--output_dir", str(tmp / "results"), "--max_workers", "1", "--quiet"]
    demo = ["demo", "--data", str(demo_dataset.parent), *common]
    assert main([*demo, "--seed", "0", "--attention_scales", "1.0"]) == 0
    hint_out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(hint_out):
        assert main([*demo, "--seed", "1", "--max_tokens_per_head", "4096"]) == 0
    assert main(["analyze", "--dataset_local_root", str(TINY_LLAMA), "--model", "tinyllama", "--num_q_heads", "6",
                 "--num_k_heads", "2", *common]) == 0
    fam = DOCS_FAMILY
    for step, folder in write_synthetic_family(tmp / "family", fam, with_truth=False).items():
        keys = ["--dataset_local_root", str(folder), "--model", fam.model(step), "--family", fam.family,
                "--stage", fam.stage(step), "--step", str(step), *common]
        if step == fam.steps[0]:  # an older run, with another seed, that the family views must not read
            assert main(["analyze", *keys, "--seed", "5"]) == 0
        assert main(["analyze", *keys]) == 0
    return wh, hint_out.getvalue()


@pytest.fixture(scope="module")
def latest(warehouse):
    """Raw tables, each restricted in pandas to the latest started run of every model."""
    wh, _ = warehouse
    with duckdb.connect(str(wh), read_only=True) as con:
        raw = {t: con.execute(f"SELECT * FROM {t}").df() for t in
               ("runs", "models", "head_metrics", "head_bucket_plasticity", "head_attention_summary", "head_errors")}
    runs = raw["runs"].sort_values(["started_at", "run_id"], ascending=[False, True])
    newest = runs.groupby("model", sort=False).head(1)[["model", "run_id"]]
    out = {name: df.merge(newest, on=["model", "run_id"]) for name, df in raw.items() if "run_id" in df}
    out["all_runs"] = raw
    return out


def run_sql(wh: Path, query: str, capsys) -> pd.DataFrame:
    capsys.readouterr()
    assert main(["sql", query, "--warehouse", str(wh), "--csv"]) == 0
    text = capsys.readouterr().out
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=["nan"])


# ----------------------------------------------------------------------------- references


def _mean_nan(values) -> float:
    """Mean that is NaN when any value is NaN (DuckDB's avg)."""
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def ref_layer_means(t):
    hm = t["head_metrics"]
    g = hm.groupby(["model", "layer"], sort=True)["ap_overall"]
    return pd.DataFrame({"mean_ap": g.agg(_mean_nan), "n_heads": g.size()}).reset_index()


def ref_layer_profile(t):
    hm = t["head_metrics"].dropna(subset=["ap_overall"])
    rows = []
    for (model, layer), g in hm.groupby(["model", "layer"], sort=True):
        ap = g["ap_overall"].to_numpy()
        rows.append({"model": model, "layer": layer, "depth": layer / hm.loc[hm["model"] == model, "layer"].max(),
                     "mean_ap": ap.mean(), "q1_ap": np.quantile(ap, 0.25), "median_ap": np.median(ap),
                     "q3_ap": np.quantile(ap, 0.75), "n_heads": len(ap)})
    return pd.DataFrame(rows)


def ref_latest_layer_plasticity(t):
    """Per model and layer (sorted): the finite heads' mean, quartiles, t-interval of the mean, and the
    conservative interval mean -/+ t(0.975, min df) * mean SE clipped to [0, 1], as the plots draw it."""
    hm = t["head_metrics"]
    rows = []
    for (model, layer), g in hm.groupby(["model", "layer"], sort=True):
        g = g[np.isfinite(g["ap_overall"])]
        ap, se, df = (g[c].to_numpy(dtype=np.float64) for c in ("ap_overall", "ap_overall_se", "ap_se_df"))
        n, mean = len(ap), ap.mean()
        half = stats.t.ppf(0.975, n - 1) * ap.std(ddof=1) / np.sqrt(n) if n >= 2 else np.nan
        known = bool(np.isfinite(se).all() and (df >= 1).all())
        mean_half = stats.t.ppf(0.975, df.min()) * se.mean() if known else np.nan
        rows.append({"model": model, "layer": layer, "n_heads": n, "mean_ap": mean, "median_ap": np.median(ap),
                     "q1_ap": np.quantile(ap, 0.25), "q3_ap": np.quantile(ap, 0.75), "ci_low": mean - half,
                     "ci_high": mean + half, "mean_ci_low": np.clip(mean - mean_half, 0, 1),
                     "mean_ci_high": np.clip(mean + mean_half, 0, 1)})
    return pd.DataFrame(rows)


def ref_top_plastic_heads(t):
    hm = t["head_metrics"].dropna(subset=["ap_overall"])
    hm = hm.sort_values(["model", "ap_overall", "layer", "q_head"], ascending=[True, False, True, True])
    top = hm.groupby("model", sort=True).head(5)
    return top[["model", "layer", "q_head", "ap_overall", "ap_overall_se", "q_R2_pos"]]


def ref_heads_side_by_side(t):
    hm = t["head_metrics"]
    hm = hm[hm["model"].isin(["synthetic-demo", "tinyllama"])].sort_values(["layer", "q_head", "model"])
    return hm[["layer", "q_head", "model", "ap_overall", "ap_overall_ci_low", "ap_overall_ci_high"]]


def ref_ap_vs_r2_pos(t):
    hm = t["head_metrics"].dropna(subset=["ap_overall", "q_R2_pos"])
    rows = []
    for model, g in hm.groupby("model", sort=True):
        rows.append({"model": model, "n_heads": len(g),
                     "pearson_r": stats.pearsonr(g["ap_overall"], g["q_R2_pos"]).statistic,
                     "spearman_rho": stats.spearmanr(g["ap_overall"], g["q_R2_pos"]).statistic})
    return pd.DataFrame(rows)


def ref_ap_by_r2_band(t):
    hm = t["head_metrics"].dropna(subset=["ap_overall"]).copy()
    hm["r2_pos_band"] = np.select([hm["q_R2_pos"] < 0.1, hm["q_R2_pos"] < 0.5], ["0.0-0.1", "0.1-0.5"], "0.5-1.0")
    g = hm.groupby(["model", "r2_pos_band"], sort=True)["ap_overall"]
    return pd.DataFrame({"n_heads": g.size(), "mean_ap": g.mean()}).reset_index()


def ref_ap_by_query_bucket(t):
    cells = t["head_bucket_plasticity"].dropna(subset=["plasticity"])
    ap_j = cells.groupby(["model", "layer", "q_head", "q_bucket"])["plasticity"].mean().reset_index()
    g = ap_j.groupby(["model", "q_bucket"], sort=True)["plasticity"]
    return pd.DataFrame({"mean_ap_j": g.mean(), "n_heads": g.size()}).reset_index()


def ref_attention_classes(t):
    s = t["head_attention_summary"]
    rows = []
    for (model, status, cls), g in s.groupby(["model", "status", "attn_class"], sort=True):
        ratio = g["mean_entropy_ratio"].to_numpy()
        rows.append({"model": model, "status": status, "attn_class": cls, "n_heads": len(g),
                     # NaN when no head of the group is estimable (every ratio NaN)
                     "mean_entropy_ratio": ratio[~np.isnan(ratio)].mean() if (~np.isnan(ratio)).any() else np.nan,
                     "mean_key_coverage": _mean_nan(g["mean_key_coverage"])})
    return pd.DataFrame(rows)


def ref_latest_errors(t):
    e = t["head_errors"]
    g = e.groupby(["model", "problem"], sort=True)["file"]
    return pd.DataFrame({"n_heads": g.size(), "first_file": g.min()}).reset_index()


def ref_family_layer_trajectory(t):
    layers = reference_layers(reference_long(t["all_runs"]))
    ap = layers[layers["metric"] == "ap_overall"].rename(columns={"mean_value": "mean_ap"})
    return ap.sort_values(["family", "step", "layer"])[["family", "step", "layer", "n_heads", "mean_ap", "ci_low",
                                                         "ci_high"]]


def ref_family_metric_trajectory(t):
    layers = reference_layers(reference_long(t["all_runs"]))
    r2 = layers[layers["metric"] == "q_R2_pos"].sort_values(["family", "step", "layer"])
    return r2[["family", "stage", "step", "layer", "n_heads", "mean_value", "median_value", "q1_value", "q3_value"]]


def ref_family_head_change(t):
    long = reference_long(t["all_runs"])
    ap = long[(long["metric"] == "ap_overall") & ~np.isnan(long["value"])].sort_values("step")
    g = ap.groupby(["family", "layer", "q_head"], sort=False)["value"]
    out = pd.DataFrame({"first_ap": g.first(), "last_ap": g.last()}).reset_index()
    out["change"] = out["last_ap"] - out["first_ap"]
    out["size"] = out["change"].abs()
    out = out.sort_values(["family", "size", "layer", "q_head"], ascending=[True, False, True, True])
    return out[["family", "layer", "q_head", "first_ap", "last_ap", "change"]]


FAMILY_REFERENCES = {
    "family-layer-trajectory": ref_family_layer_trajectory,
    "family-metric-trajectory": ref_family_metric_trajectory,
    "family-head-change": ref_family_head_change,
}

REFERENCES = {
    "layer-means": ref_layer_means,
    "layer-profile": ref_layer_profile,
    "latest-layer-plasticity": ref_latest_layer_plasticity,
    "top-plastic-heads": ref_top_plastic_heads,
    "heads-side-by-side": ref_heads_side_by_side,
    "ap-vs-r2-pos": ref_ap_vs_r2_pos,
    "ap-by-r2-band": ref_ap_by_r2_band,
    "ap-by-query-bucket": ref_ap_by_query_bucket,
    "attention-classes": ref_attention_classes,
    "latest-errors": ref_latest_errors,
    **FAMILY_REFERENCES,
}


def assert_same_frame(got: pd.DataFrame, want: pd.DataFrame, name: str) -> None:
    want = want.reset_index(drop=True)
    assert list(got.columns) == list(want.columns), f"{name}: columns {list(got.columns)} != {list(want.columns)}"
    assert len(got) == len(want), f"{name}: {len(got)} rows, expected {len(want)}\n{got}\n{want}"
    for col in want.columns:
        a, b = got[col].to_numpy(), want[col].to_numpy()
        if pd.api.types.is_numeric_dtype(want[col]) and not pd.api.types.is_bool_dtype(want[col]):
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name}: column {col}")
        else:
            assert [str(x) for x in a] == [str(x) for x in b], f"{name}: column {col}"


# ----------------------------------------------------------------------------- tests


def test_every_documented_sql_block_is_a_checked_example():
    examples = documented_examples()
    assert set(examples) == set(REFERENCES), "every marked SQL example needs a reference computation here"
    for path in DOC_FILES:
        text = path.read_text()
        assert len(SQL_BLOCK_RE.findall(text)) == len(MARKER_RE.findall(text)), \
            f"{path.name}: every ```sql block needs a '<!-- sql-example: name -->' marker before it"
    for name, query in examples.items():
        read = tables_read(query)
        reads_runs = read & MULTI_RUN
        assert reads_runs or read & LATEST_ONLY, f"{name} reads no warehouse table"
        filtered = {t for t in reads_runs if t.startswith("latest_")} or "run_id = " in query or not reads_runs
        assert filtered, f"{name} reads {sorted(reads_runs)} without a latest_* view or a run filter"


def test_documented_commands_are_checked_examples(warehouse):
    """`plasticity sql "..."` lines in the docs and the demo's hint that read results are named examples."""
    _, demo_out = warehouse
    hints = COMMAND_RE.findall(demo_out)
    assert len(hints) == 1, demo_out
    commands = [q for path in DOC_FILES for q in COMMAND_RE.findall(path.read_text())] + hints
    examples = {normalized(q) for q in documented_examples().values()}
    for query in commands:
        if query != "..." and tables_read(query) & (MULTI_RUN | LATEST_ONLY):  # "..." stands for any query
            assert normalized(query) in examples, f"not a checked example: {query}"


def test_the_two_demo_runs_differ(latest):
    """Otherwise a query mixing runs would give the same numbers and the checks below prove nothing."""
    hm = latest["all_runs"]["head_metrics"]
    demo = hm[hm["model"] == "synthetic-demo"]
    assert demo["run_id"].nunique() == 2 and latest["head_metrics"]["model"].nunique() == 2 + len(DOCS_FAMILY.steps)
    per_run = demo.pivot_table(index=["layer", "q_head"], columns="run_id", values="ap_overall")
    assert (per_run.iloc[:, 0] - per_run.iloc[:, 1]).abs().max() > 1e-4
    att = latest["all_runs"]["head_attention_summary"]
    assert att.loc[att["model"] == "synthetic-demo", "run_id"].nunique() == 2


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_documented_query_numbers(name, warehouse, latest, capsys):
    wh, _ = warehouse
    query = documented_examples()[name]
    got = run_sql(wh, query, capsys)
    want = REFERENCES[name](latest)
    if name in FAMILY_REFERENCES:  # every checkpoint, and the superseded run really differs
        assert len(want) >= 2 and want["family"].unique().tolist() == [DOCS_FAMILY.family]
        if "step" in want:
            assert sorted(set(want["step"])) == list(DOCS_FAMILY.steps)
    elif name != "latest-errors":
        assert len(want) >= 2 and want["model"].nunique() >= 2, f"{name}: the reference covers too little"
    assert_same_frame(got, want, name)


def test_the_family_demo_hint_is_the_documented_example():
    assert normalized(FAMILY_HINT) == normalized(documented_examples()["family-layer-trajectory"])


def test_the_superseded_family_run_differs(latest):
    """Otherwise reading it by mistake would give the same trajectory and the checks above prove nothing."""
    hm = latest["all_runs"]["head_metrics"]
    first = hm[hm["model"] == DOCS_FAMILY.model(DOCS_FAMILY.steps[0])]
    per_run = first.pivot_table(index=["layer", "q_head"], columns="run_id", values="ap_overall")
    assert per_run.shape[1] == 2 and (per_run.iloc[:, 0] - per_run.iloc[:, 1]).abs().max() > 1e-4
