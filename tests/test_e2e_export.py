"""CSV exports (docs/method.md#tables): the files of a model's latest run, sorted by layer, q_head
(then buckets or component), each value equal to the warehouse's, NaN written as `nan`.

The warehouse is filled so that the order rows were inserted in differs from the sorted order: an
older run with another seed; then the latest run in two passes, layer 1 first (with head (1, 2)
failing once) and the rest on resume, so (1, 10) is stored before (0, 2) and (1, 2) last. Query
heads 2, 5 and 10 of 12 (a sampled subset, as qk-sniffer captures often are) also make
"q_head before layer" and a text sort ("10" < "2") visible. Head (1, 5) has bad data.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

import plasticity.head
from cli.main import main as cli_main
from test_bad_input import rewrite, set_vector_value
from test_pipeline import SPEC_HEAD_COLUMNS
from wiring_reference import SEED, shard_path, write_wiring_dataset
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

MODEL = "wiring-export"
Q_HEADS = {0: [2, 10], 1: [2, 5, 10]}
BAD_HEAD = (1, 5)
FLAKY_HEAD = (1, 2)
FILES = {  # table: (CSV columns, the columns the rows must be sorted by)
    "head_metrics": (SPEC_HEAD_COLUMNS, ("layer", "q_head")),
    "head_bucket_plasticity": (["layer", "q_head", "k_head", "q_bucket", "k_bucket", "plasticity", "n_pairs"],
                               ("layer", "q_head", "q_bucket", "k_bucket")),
    "head_component_weights": (["layer", "q_head", "k_head", "component", "component_r2", "weight"],
                               ("layer", "q_head", "component")),
    "head_errors": (["layer", "q_head", "k_head", "file", "problem", "message"], ("layer", "q_head")),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    root = write_wiring_dataset(tmp / "data", Q_HEADS, model=MODEL, num_q_heads=12, num_k_heads=2)
    # the card says so, as qk-sniffer's do for head_sampling: the absent query heads are not errors
    card = root / "README.md"
    card.write_text(card.read_text().replace("---\n", "---\nhead_sampling_strategy: random_query\n", 1))
    bad_file = shard_path(root, *BAD_HEAD, "q")
    rewrite(bad_file, lambda t: set_vector_value(t, 3, 0, np.inf))
    wh = tmp / "wh.duckdb"

    def run(**overrides):
        cfg = load_config(None, {"warehouse": str(wh), "max_workers": 1, "attention": False, "model": MODEL,
                                 "num_q_heads": 12, "num_k_heads": 2, **overrides})
        return analyze_dataset(cfg, root, progress=False)

    older = run(seed=SEED + 1)
    real = plasticity.head.analyze_head
    failed = []

    def fail_once(q, k, orientation, *, layer, q_head, params):
        if (layer, q_head) == FLAKY_HEAD and not failed:
            failed.append(FLAKY_HEAD)
            raise RuntimeError("injected transient failure")
        return real(q, k, orientation, layer=layer, q_head=q_head, params=params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plasticity.head, "analyze_head", fail_once)
        part = run(seed=SEED, layers=[1])
        latest = run(seed=SEED)
    assert failed and part.run_id == latest.run_id != older.run_id
    assert (latest.n_computed, latest.n_done, latest.n_errors) == (4, 4, 1)
    out = tmp / "csv"
    assert cli_main(["export", "--model", MODEL, "--warehouse", str(wh), "--out", str(out)]) == 0
    return {"wh": wh, "out": out, "latest": latest.run_id, "older": older.run_id, "bad_file": str(bad_file)}


def stored(wh, table, columns, run_id, order="rowid"):
    with db.reader(wh) as con:
        return con.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE model = $m AND run_id = $r "
                           f"ORDER BY {order}", {"m": MODEL, "r": run_id}).fetchall()


def same_text(text: str, value) -> bool:
    """The CSV cell `text` is the warehouse value: floats to the last digit, NaN as `nan`."""
    if isinstance(value, float):
        return text == "nan" if math.isnan(value) else float(text) == value
    if isinstance(value, bool) or value is None:
        return text == ("" if value is None else str(value).lower())
    return type(value)(text) == value


@pytest.mark.parametrize("table", FILES)
def test_csv_rows_are_the_latest_run_in_layer_q_head_order(exported, table):
    columns, sort_key = FILES[table]
    with open(exported["out"] / f"{table}.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == list(columns)
    inserted = stored(exported["wh"], table, columns, exported["latest"])  # in insertion order
    key = [columns.index(c) for c in sort_key]
    expected = sorted(inserted, key=lambda r: tuple(r[i] for i in key))  # sorted here, not by SQL
    assert len(rows) == len(expected) > 0
    assert [tuple(int(r[i]) for i in key) for r in rows] == [tuple(r[i] for i in key) for r in expected]
    for got, want in zip(rows, expected):
        assert all(same_text(t, v) for t, v in zip(got, want)), (got, want)
    if table != "head_errors":
        # the data are built so that a lost or wrong ORDER BY would show
        heads = [(r[0], r[1]) for r in inserted]
        first_seen = list(dict.fromkeys(heads))
        assert first_seen != sorted(first_seen)
        assert sorted(first_seen) != sorted(first_seen, key=lambda h: (h[1], h[0]))


def test_csv_shows_nan_cells_and_the_error_and_not_the_older_run(exported):
    with open(exported["out"] / "head_bucket_plasticity.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    empty = [c for c in cells if c["plasticity"] == "nan"]
    assert empty and all(c["n_pairs"] == "0" for c in empty)  # cells without pairs: NaN, 0 pairs
    with open(exported["out"] / "head_errors.csv", newline="") as fh:
        (error,) = list(csv.DictReader(fh))
    assert (error["layer"], error["q_head"], error["k_head"], error["file"], error["problem"]) == (
        "1", "5", "0", exported["bad_file"], "nonfinite_values")
    # the older run has other values, so equality with the latest run (above) excludes it
    columns = ["layer", "q_head", "ap_overall"]
    older = dict(((l, q), ap) for l, q, ap in stored(exported["wh"], "head_metrics", columns, exported["older"]))
    latest = dict(((l, q), ap) for l, q, ap in stored(exported["wh"], "head_metrics", columns, exported["latest"]))
    assert set(older) == set(latest) and all(older[h] != latest[h] for h in latest)
