"""Attention patterns at pipeline level: the attention tables equal a softmax written out here, query by query,
on the rows of the Parquet files (read with pyarrow), for a full-causal layer and a layer with a
sliding window, where n_keys (the window) and position + 1 differ. Tolerance rel 1e-9: the same
formula, summed in another order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plasticity.synthetic import SyntheticSpec
from wiring_reference import read_rows, shard_path
from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.sources.demo_data import write_synthetic_dataset
from warehouse.run.pipeline import analyze_dataset

SPEC = SyntheticSpec(model="wiring-attn", num_layers=2, num_q_heads=2, num_k_heads=1, head_dim=8, num_examples=2,
                     seq_len=96, bucket_size=16, sliding_windows={1: 17}, seed=5)
SHARP_MAX, UNIFORM_MIN = 0.5, 0.95  # attention class thresholds (defaults)


def softmax_rows(q, k):
    """{(example_id, position): (entropy, entropy_ratio, max_attn, n_keys)} by a loop over the queries:
    visible keys of the query's example with pos_k <= pos_q and, with a window w, pos_k > pos_q - w;
    a = softmax(q . k / sqrt(d)); entropy in nats (NaN below position 2); ratio = entropy / log(n_keys)."""
    window = q.sliding_window
    out = {}
    for vector, example, position in zip(q.vectors.astype(np.float64), q.example_id, q.position):
        visible = (k.example_id == example) & (k.position <= position)
        if window is not None:
            visible &= k.position > position - window
        scores = k.vectors[visible].astype(np.float64) @ vector / math.sqrt(q.d)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        n_keys = int(visible.sum())
        entropy = float(-(weights * np.log(weights)).sum()) if position >= 2 else math.nan
        ratio = entropy / math.log(n_keys) if n_keys >= 2 else math.nan
        out[(int(example), int(position))] = (entropy, ratio, float(weights.max()), n_keys)
    return out


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn")
    root = write_synthetic_dataset(tmp / "data", SPEC, with_truth=False)
    cfg = load_config(None, {"warehouse": str(tmp / "wh.duckdb"), "max_workers": 1, "attention": True})
    summary = analyze_dataset(cfg, root, progress=False)
    assert summary.n_errors == 0 and summary.n_done == 4
    return root, cfg, summary


def test_token_attention_equals_an_independent_softmax(attention_run):
    root, cfg, summary = attention_run
    p = {"m": summary.model, "r": summary.run_id}
    windowed = 0
    for layer in range(SPEC.num_layers):
        for q_head in range(SPEC.num_q_heads):
            q = read_rows(shard_path(root, layer, q_head, "q"))
            want = softmax_rows(q, read_rows(shard_path(root, layer, q_head // SPEC.group, "k")))
            with db.reader(cfg.warehouse) as con:
                rows = con.execute(
                    "SELECT example_id, position, entropy, entropy_ratio, max_attn, n_keys FROM token_attention "
                    "WHERE model = $m AND run_id = $r AND layer = $l AND q_head = $q",
                    {**p, "l": layer, "q": q_head}).fetchall()
                (mean_ratio, attn_class), = con.execute(
                    "SELECT mean_entropy_ratio, attn_class FROM head_attention_summary "
                    "WHERE model = $m AND run_id = $r AND layer = $l AND q_head = $q",
                    {**p, "l": layer, "q": q_head}).fetchall()
            assert len(rows) == len(want) == q.n
            for example, position, *values in rows:
                entropy, ratio, max_attn, n_keys = want[(example, int(position))]
                assert values[3] == n_keys, (layer, q_head, example, position)
                np.testing.assert_allclose(values[:3], [entropy, ratio, max_attn], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{layer} {q_head} {example} {position}")
                windowed += n_keys < position + 1
            ratios = [v[1] for v in want.values() if not math.isnan(v[1])]
            assert mean_ratio == pytest.approx(np.mean(ratios), rel=1e-9)
            assert attn_class == ("sharp" if mean_ratio <= SHARP_MAX else "uniform" if mean_ratio >= UNIFORM_MIN
                                  else "medium")
    assert windowed > 0  # the window really cuts rows, so log(n_keys) is not log(position + 1)
