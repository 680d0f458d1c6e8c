"""Configured head counts plan a sampled subset of query heads (qk-sniffer often captures
only some query heads, so the shard names cannot give the counts; the config must be enough)."""

from __future__ import annotations

from warehouse.settings.config import load_config
from warehouse.run.planning import find_catalog, head_pairs
from wiring_reference import write_wiring_dataset


def test_configured_head_counts_plan_a_sampled_subset_of_query_heads(tmp_path):
    # query heads 2, 5, 10 of 12 and key heads 0, 1: the names alone suggest 11 q heads, no whole group
    root = write_wiring_dataset(tmp_path / "data", {0: [2, 10], 1: [2, 5, 10]}, num_q_heads=12, num_k_heads=2)
    cfg = load_config(None, {"warehouse": str(tmp_path / "wh.duckdb"), "num_q_heads": 12, "num_k_heads": 2})
    cat = find_catalog(root, cfg)
    assert (cat.num_layers, cat.num_q_heads, cat.num_k_heads) == (2, 12, 2)
    planned = head_pairs(cat, cfg)
    assert [(h.layer, h.q_head, h.k_head) for h in planned if h.problem is None] == [
        (0, 2, 0), (0, 10, 1), (1, 2, 0), (1, 5, 0), (1, 10, 1)]  # GQA: k_head = q_head // 6
    # no card says heads were sampled, so the other configured query heads are expected and missing
    assert {h.problem for h in planned if h.q_path is None} == {"missing_query_shard"}
    assert len(planned) == 2 * 12
