"""While the attention kernels compile (a fresh machine's first run), groups run their per-head analysis at
once and their attention later (warehouse.run.worker_pool.iter_outcomes): the joined outcomes must be exactly
those of one task per group, in the process and through the worker pool."""

from __future__ import annotations

import numpy as np
import pytest

from warehouse.run import group, pipeline, planning, worker_pool
from warehouse.store import results
from warehouse.settings.config import load_config


def _tasks(root, tmp_path):
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": "true",
                             "attention_scales": [0.5, 1.0]})
    cat = planning.profile_catalog(planning.find_catalog(root, cfg))
    return planning.plan_groups(cat, cfg)


def _by_head(batches):
    out = {}
    for batch in batches:
        for o in batch:
            assert (o.layer, o.q_head) not in out
            out[(o.layer, o.q_head)] = o.tables()
    return out


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for head, tables in want.items():
        assert got[head].keys() == tables.keys(), head
        for name, cols in tables.items():
            assert got[head][name].keys() == cols.keys(), (head, name)
            for col, values in cols.items():
                a, b = np.asarray(got[head][name][col]), np.asarray(values)
                same = np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
                assert same, (head, name, col)


def _deferring(n: int):
    """defer_attention for the first `n` questions, then not (the kernels 'arrive' mid-run)."""
    calls = []

    def defer() -> bool:
        calls.append(1)
        return len(calls) <= n

    return defer


@pytest.mark.parametrize("workers", [1, 2])
def test_deferred_attention_gives_the_outcomes_of_one_task_per_group(small_dataset, tmp_path, monkeypatch, workers):
    tasks = _tasks(small_dataset, tmp_path)
    assert len(tasks) >= 4 and all(t.attention_on for t in tasks)
    want = _by_head(worker_pool.iter_outcomes(tasks, 1))
    assert any("token_attention" in t for t in want.values())
    phases = []
    if workers == 1:  # in this process: see which tasks ran
        real = group.compute_group
        monkeypatch.setattr(worker_pool, "compute_group", lambda t: phases.append(t.phase) or real(t))
    waits = []
    got = _by_head(worker_pool.iter_outcomes(tasks, workers, defer_attention=_deferring(3),
                                          wait_attention=lambda: waits.append(1)))
    _assert_same(got, want)
    if workers == 1:
        assert phases.count("analysis") == phases.count("attention") >= 1 and "all" in phases, phases


def test_attention_waits_for_the_kernels_when_nothing_else_is_left(small_dataset, tmp_path):
    """Deferred to the end (the kernels never 'arrive' by themselves): the run waits once, then does them."""
    tasks = _tasks(small_dataset, tmp_path)
    want = _by_head(worker_pool.iter_outcomes(tasks, 1))
    waits = []
    got = _by_head(worker_pool.iter_outcomes(tasks, 2, defer_attention=lambda: True,
                                          wait_attention=lambda: waits.append(1)))
    _assert_same(got, want)
    assert waits == [1]


def _outcome(q_head, error=None, tables=None):
    o = results.HeadOutcome(0, q_head, 0, error=error)
    o.extra_tables = tables or {}
    return o


def test_merge_phases_keeps_what_one_task_would_have_stored():
    analysis_error = {"file": "q.parquet", "problem": "too_few_rows", "message": "..."}
    attention_error = {"file": "q.parquet", "problem": "analysis_failed", "message": "attention"}
    tables = {"token_attention": {"x": np.arange(3)}}
    merged = group.merge_phases(
        [_outcome(0), _outcome(1, analysis_error), _outcome(2)],
        [_outcome(0, tables=tables), _outcome(1, analysis_error), _outcome(2, attention_error, tables)])
    assert merged[0].error is None and merged[0].extra_tables is tables
    assert merged[1].error is analysis_error and merged[1].extra_tables == {}
    assert merged[2].error is attention_error  # stored as the head's error, as an 'all' task's would be
    with pytest.raises(AssertionError):
        group.merge_phases([_outcome(0)], [_outcome(1)])


def test_the_progress_bar_says_why_heads_wait_while_the_kernels_compile(small_dataset, tmp_path, monkeypatch, capsys):
    """Heads are counted once their attention is done: while the kernels compile the bar says so,
    and stops saying it once they are in."""
    from warehouse.run import kernel_cache

    calls = []
    monkeypatch.setattr(kernel_cache, "compiling", lambda part: calls.append(part) or len(calls) <= 6)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "output_dir": str(tmp_path / "out"),
                             "max_workers": 1, "attention": "true", "attention_scales": [0.5, 1.0]})
    summary = pipeline.analyze_dataset(cfg, small_dataset, progress=True)
    assert summary.n_errors == 0 and summary.n_done == summary.n_heads
    frames = capsys.readouterr().err.replace("\r", "\n").splitlines()
    said = [i for i, f in enumerate(frames) if "compiling the attention kernels" in f]
    assert said, frames
    last = [f for f in frames if f.strip()][-1]
    assert f"{summary.n_heads}/{summary.n_heads}" in last and "compiling" not in last, last
