"""Resume (docs/runs.md, "Runs, resume and concurrency"): re-running the same model and config skips the
heads already in head_metrics and retries the failed ones.

A transient failure is injected into the real pipeline (the pure `analyze_head` raises once for
one head; one worker, so compute runs in this process); the warehouse, the files and everything
else are real. The heads of the first run must not be recomputed by the second: checked by a spy
on `analyze_head` and by the rows' DuckDB `rowid`s, which a delete and re-insert would change.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import plasticity.head
from test_bad_input import rewrite, same as same_rows, set_vector_value
from wiring_reference import SEED, reference_head, shard_path, write_wiring_dataset
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

HEADS = {(layer, q_head) for layer in range(2) for q_head in range(4)}
FLAKY_HEAD = (1, 2)


@pytest.fixture(scope="module")
def wiring_root(tmp_path_factory):
    return write_wiring_dataset(tmp_path_factory.mktemp("resume") / "wiring")


def config(tmp_path):
    return load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                              "model": "wiring", "seed": SEED})


def snapshot(cfg, run_id):
    """Per head: its head_metrics row and its cell and component rows, each with its rowid."""
    p = {"m": "wiring", "r": run_id}
    out = {}
    with db.reader(cfg.warehouse) as con:
        for table in ("head_metrics", "head_bucket_plasticity", "head_component_weights"):
            for row in con.execute(f"SELECT rowid, * EXCLUDE (model, run_id) FROM {table} "
                                   "WHERE model = $m AND run_id = $r ORDER BY ALL", p).fetchall():
                out.setdefault((row[1], row[2]), []).append((table, row))
        errors = con.execute("SELECT layer, q_head, file, problem, message FROM head_errors "
                             "WHERE model = $m AND run_id = $r ORDER BY ALL", p).fetchall()
        runs = con.execute("SELECT status, n_done, n_errors FROM runs WHERE model = $m AND run_id = $r", p).fetchall()
    return out, errors, runs


def test_a_head_that_failed_once_is_retried_and_the_others_are_left_alone(wiring_root, tmp_path, monkeypatch):
    real = plasticity.head.analyze_head
    calls: list[tuple[int, int]] = []
    failures: list[tuple[int, int]] = []

    def flaky(q, k, orientation, *, layer, q_head, params):
        calls.append((layer, q_head))
        if (layer, q_head) == FLAKY_HEAD and not failures:
            failures.append(FLAKY_HEAD)
            raise RuntimeError("injected transient failure")
        return real(q, k, orientation, layer=layer, q_head=q_head, params=params)

    monkeypatch.setattr(plasticity.head, "analyze_head", flaky)
    cfg = config(tmp_path)
    first = analyze_dataset(cfg, wiring_root, progress=False)
    assert sorted(calls) == sorted(HEADS)
    assert (first.n_done, first.n_errors, first.status) == (7, 1, "partial")
    rows, errors, runs = snapshot(cfg, first.run_id)
    assert set(rows) == HEADS - {FLAKY_HEAD}
    (layer, q_head, file, problem, message), = errors
    assert (layer, q_head, problem) == (*FLAKY_HEAD, "analysis_failed")
    assert file == str(shard_path(wiring_root, *FLAKY_HEAD, "q")) and "injected transient failure" in message
    assert runs == [("partial", 7, 1)]

    calls.clear()
    second = analyze_dataset(cfg, wiring_root, progress=False)
    assert second.run_id == first.run_id
    assert calls == [FLAKY_HEAD]  # only the failed head is computed again
    assert (second.n_computed, second.n_skipped, second.n_done, second.n_errors, second.status) == (
        1, 7, 8, 0, "succeeded")
    after, errors_after, runs_after = snapshot(cfg, second.run_id)
    assert errors_after == [] and runs_after == [("succeeded", 8, 0)]
    for head, head_rows in rows.items():  # same values, same rowids: not deleted and re-inserted
        assert same_rows(after[head], head_rows), head

    # the retried head holds what an independent computation gives (rowids left out)
    ref = reference_head(wiring_root, *FLAKY_HEAD, 2, cfg.max_tokens_per_head, cfg.params)
    with db.reader(cfg.warehouse) as con:
        cur = con.execute("SELECT * FROM head_metrics WHERE layer = $l AND q_head = $q",
                          {"l": FLAKY_HEAD[0], "q": FLAKY_HEAD[1]})
        (row,) = cur.fetchall()
        stored = dict(zip([d[0] for d in cur.description], row))
    for col in ("n_q_tokens", "q_R2_pos", "q_R2_scalar", "q_noise_med_abs_skew", "ap_overall", "estimator"):
        assert stored[col] == ref.result.metrics[col], col
    n_cells = sum(1 for t, _ in after[FLAKY_HEAD] if t == "head_bucket_plasticity")
    assert n_cells == len(ref.result.bucket_rows["q_bucket"]) > 0


def test_a_head_with_bad_data_stays_an_error_on_resume(wiring_root, tmp_path):
    root = shutil.copytree(wiring_root, tmp_path / "wiring")
    bad = shard_path(root, 0, 1, "q")
    rewrite(bad, lambda t: set_vector_value(t, 5, 1, np.nan))
    cfg = config(tmp_path)
    first = analyze_dataset(cfg, root, progress=False)
    assert (first.n_done, first.n_errors, first.status) == (7, 1, "partial")
    rows, errors, _ = snapshot(cfg, first.run_id)
    assert [e[:4] for e in errors] == [(0, 1, str(bad), "nonfinite_values")]

    second = analyze_dataset(cfg, root, progress=False)
    assert second.run_id == first.run_id
    assert (second.n_computed, second.n_skipped) == (1, 7)  # retried, as docs/runs.md promises
    assert (second.n_done, second.n_errors, second.status) == (7, 1, "partial")
    after, errors_after, runs_after = snapshot(cfg, second.run_id)
    assert [e[:4] for e in errors_after] == [(0, 1, str(bad), "nonfinite_values")]  # once, not twice
    assert str(bad) in errors_after[0][4]
    assert runs_after == [("partial", 7, 1)]
    assert set(after) == HEADS - {(0, 1)}
    for head, head_rows in rows.items():
        assert same_rows(after[head], head_rows), head
