"""`attention: auto` decides from positions alone which heads' attention to compute.

The exact-row count against a brute force over the visibility mask; the plan on a sparse capture
made from the tiny-llama dense one (independent query and key position masks); a head below the
threshold is summarised as skipped without importing the compiled kernels (numba)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_LLAMA
from plasticity.attention.visibility import count_exact_rows, visible_mask
from warehouse.run.attention_plan import plan_attention_coverage, read_positions
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_sparse_capture
from warehouse.run.pipeline import find_catalog, plan_groups

DENSE = TINY_LLAMA / "dense" / "tinyllama"
#: keep rate and seed of the sparse capture: 1/4 of the positions, and a layer where a few query
#: rows (at the first positions) still see all their keys, which the tests assert
SPARSE_KEEP, SPARSE_SEED = 0.25, 1


def brute_exact(qe, qp, ke, kp, window):
    """Exact rows by definition: every visible position of the query's example is a captured key."""
    n = 0
    for e, p in zip(qe, qp):
        visible = set(range(max(0, p - window + 1) if window else 0, p + 1))
        captured = {int(x) for x in kp[(ke == e)] if x in visible}
        n += captured == visible
    return n


@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_count_exact_rows_matches_the_definition(window):
    rng = np.random.default_rng(7)
    qe, ke = rng.integers(0, 3, 300), rng.integers(0, 3, 40)
    qp, kp = rng.integers(0, 12, 300), rng.integers(0, 12, 40)  # duplicates and gaps on purpose
    expected = brute_exact(qe, qp, ke, kp, window)
    assert 0 < expected < 300  # both kinds of rows present
    assert count_exact_rows(qe, qp, ke, kp, window) == expected
    # and the mask view of the same definition, on one example
    one = qe == 0
    mask = visible_mask(qp[one], np.arange(12), window)
    have = np.isin(np.arange(12), kp[ke == 0])
    assert count_exact_rows(qe[one], qp[one], ke[ke == 0], kp[ke == 0], window) == int(
        (mask <= have[None, :]).all(axis=1).sum())


@pytest.fixture(scope="session")
def sparse_tiny_llama(tmp_path_factory):
    """The tiny-llama capture thinned by our sampler (independent query and key position masks)."""
    return write_sparse_capture(DENSE, tmp_path_factory.mktemp("sparse") / "tinyllama", SPARSE_KEEP, SPARSE_SEED)


def test_sparse_capture_keeps_independent_masks(sparse_tiny_llama):
    q = read_positions(str(sparse_tiny_llama / "l00h00q" / "data.parquet"))
    q2 = read_positions(str(sparse_tiny_llama / "l00h05q" / "data.parquet"))
    k = read_positions(str(sparse_tiny_llama / "l00h00k" / "data.parquet"))
    q_other_layer = read_positions(str(sparse_tiny_llama / "l01h00q" / "data.parquet"))
    assert np.array_equal(q[1], q2[1])  # one mask per layer and kind, shared by the heads
    assert not np.array_equal(q[1], k[1]) and not np.array_equal(q[1], q_other_layer[1])
    assert 0.2 < q[1].size / 2048 < 0.3  # 4 x 512 dense rows, about 1/4 kept


def test_plan_skips_heads_below_the_threshold_from_positions(sparse_tiny_llama):
    cfg = load_config(None, {"model": "sparse", "max_workers": 1})  # shipped defaults: auto, 100 rows
    assert cfg.attention == "auto" and cfg.attention_min_exact_rows == 100
    cat = find_catalog(sparse_tiny_llama, cfg)
    groups = plan_groups(cat, cfg)
    plan_attention_coverage(groups)
    counts = {}
    for task in groups:
        k = read_positions(task.k_info.path)
        for q_head, q_info in task.queries:
            q = read_positions(q_info.path)
            counts[(task.layer, q_head)] = brute_exact(q[0], q[1], k[0], k[1], None)
    assert max(counts.values()) > 0  # some skipped heads do have exact rows (the first positions)
    assert {(t.layer, q) for t in groups for q in t.attention_skipped} == {h for h, n in counts.items() if n < 100}
    assert not any(t.needs_attention_kernels for t in groups)
    dense_groups = plan_groups(find_catalog(DENSE, cfg), cfg)
    plan_attention_coverage(dense_groups)
    assert all(t.attention_skipped == frozenset() and t.needs_attention_kernels for t in dense_groups)


def test_a_skipped_head_is_summarised_without_the_kernels(sparse_tiny_llama):
    code = (
        "import sys\n"
        "from conftest import read_shard\n"
        "from plasticity.attention import head_attention_metrics\n"
        f"q = read_shard({str(sparse_tiny_llama)!r}, 2, 0, 'q')\n"
        f"k = read_shard({str(sparse_tiny_llama)!r}, 2, 0, 'k')\n"
        "tokens, summary, sweep = head_attention_metrics(q, k, rows='exact', min_exact_rows=100)\n"
        "assert summary['status'] == 'skipped', summary['status']\n"
        "assert summary['n_exact_rows'] > 0, summary['n_exact_rows']\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(TINY_LLAMA.parents[1]), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
