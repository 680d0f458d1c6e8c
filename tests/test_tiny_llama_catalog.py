"""The data edges on real qk-sniffer captures (tests/fixtures/tiny-llama): layout and bucket scheme from
the markdown dataset card, every shard passes the input checks, and a head-sampled capture (a sparse
set of query heads) is normal only when the card says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from warehouse.store import db
from warehouse.settings.config import load_config
from warehouse.run.pipeline import analyze_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-llama"
DENSE = FIXTURE / "dense" / "tinyllama"
SPARSE = FIXTURE / "sparse" / "tinyllama_sparse"


def analyse(root, tmp_path, **overrides):
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "max_workers": 1, "attention": False,
                             **overrides})
    summary = analyze_dataset(cfg, root, progress=False)
    with db.reader(cfg.warehouse) as con:
        models = con.execute("SELECT model, num_layers, num_q_heads, num_k_heads, layout_source, bucket_scheme, "
                             "bucket_size, sampling_strategy, q_capture_probability, card_model_name FROM models").fetchall()
        bad_shards = con.execute("SELECT path, problem FROM shards WHERE problem IS NOT NULL").fetchall()
        n_shards = con.execute("SELECT count(*) FROM shards").fetchone()[0]
        errors = con.execute("SELECT layer, q_head, problem FROM head_errors ORDER BY ALL").fetchall()
    return summary, models, bad_shards, n_shards, errors


@pytest.mark.parametrize("root,strategy,probability", [(DENSE, "all", 1.0), (SPARSE, "uniform", 0.125)],
                         ids=["dense", "sparse"])
def test_card_layout_and_bucket_scheme_on_real_captures(root, strategy, probability, tmp_path):
    summary, models, bad_shards, n_shards, errors = analyse(root, tmp_path)
    assert (summary.status, summary.n_heads, summary.n_done) == ("succeeded", 18, 18)
    assert models == [(root.name, 3, 6, 2, "card", "uniform", 64, strategy, probability, root.name)]
    assert (bad_shards, n_shards, errors) == ([], 24, [])


def test_head_sampling_on_the_card_makes_a_sparse_set_normal(tmp_path):
    root = tmp_path / "tinyllama_sparse"
    shutil.copytree(SPARSE, root)
    for name in ("l00h01q", "l02h05q"):
        shutil.rmtree(root / name)
    summary, _, _, _, errors = analyse(root, tmp_path / "plain")
    assert errors == [(0, 1, "missing_query_shard"), (2, 5, "missing_query_shard")]
    assert summary.status == "partial" and summary.n_done == 16
    card = root / "README.md"
    card.write_text(card.read_text() + "- `head_sampling_strategy`: `random_query`\n"
                                       "- `head_sampling_selected_query_heads`: `16`\n")
    summary, _, _, _, errors = analyse(root, tmp_path / "sampled")
    assert (summary.status, summary.n_heads, summary.n_done, errors) == ("succeeded", 16, 16, [])
