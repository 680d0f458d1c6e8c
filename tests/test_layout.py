"""Head layout resolution (GQA; docs/method.md#inputs): config > card > a complete shard set; never guessed from a
sparse or inconsistent set; expected query heads follow what the card says about head sampling."""

from __future__ import annotations

import re

import pytest

from warehouse.sources.layout import HeadLayout, LayoutError, expected_query_layers, infer_from_shards, resolve_layout


def full_set(layers: int, q: int, k: int) -> list[tuple[int, int, str]]:
    return [(l, h, "q") for l in range(layers) for h in range(q)] + [(l, h, "k") for l in range(layers) for h in range(k)]


def test_precedence_config_then_card_then_shards():
    ids = full_set(3, 6, 2)
    assert resolve_layout(ids, config=(None, 12, 4), card=(3, None, None)) == HeadLayout(3, 12, 4, "config")
    assert resolve_layout(ids, config=(3, 6, 2), card=(3, 6, 2)) == HeadLayout(3, 6, 2, "config")
    assert resolve_layout(ids, config=(None, None, None), card=(5, 6, 2)) == HeadLayout(5, 6, 2, "card")
    assert resolve_layout(ids, config=(4, None, None), card=(None, 6, 3)) == HeadLayout(4, 6, 3, "card")
    assert resolve_layout(ids, config=(None, None, None)) == HeadLayout(3, 6, 2, "shards")
    assert resolve_layout(ids, config=(None, None, None)).group_size == 3


@pytest.mark.parametrize("config,card,clash", [
    ((None, 12, 4), (3, 6, 2), "num_q_heads = 12 in the config but 6 on the dataset card; "
                               "num_k_heads = 4 in the config but 2 on the dataset card"),
    ((None, 12, None), (3, 6, 2), "num_q_heads = 12 in the config but 6"),  # a half-given config is no exception
    ((4, None, None), (3, 6, 2), "num_layers = 4 in the config but 3"),
])
def test_config_counts_that_contradict_the_card_are_refused(config, card, clash):
    with pytest.raises(LayoutError, match=re.escape(clash) + r".*\(/data/m/README.md\).*pairing"):
        resolve_layout(full_set(3, 6, 2), config=config, card=card, card_path="/data/m/README.md")


@pytest.mark.parametrize("change,detail", [
    (lambda ids: [i for i in ids if i != (1, 4, "q")], "l01h04q"),            # head-sampled capture: one q head absent
    (lambda ids: [i for i in ids if i != (2, 1, "k")], "l02h01k"),            # a key shard missing
    (lambda ids: ids + [(0, 6, "q")], "l01h06q"),                              # a stray query shard
    (lambda ids: [i for i in ids if i[0] != 1], "l01h00q"),                   # a whole layer missing
    (lambda ids: [i for i in ids if i[2] == "q"], "no key shards"),
    (lambda ids: [i for i in ids if not (i[2] == "q" and i[1] == 5)] + [(l, 2, "k") for l in range(3)],
     "not a whole number of GQA groups"),                                     # 5 q heads over 3 k heads
])
def test_sparse_or_inconsistent_sets_stop_with_a_request_for_the_counts(change, detail):
    ids = change(full_set(3, 6, 2))
    with pytest.raises(LayoutError) as err:
        resolve_layout(ids, config=(None, None, None), where="/data/m")
    msg = str(err.value)
    assert detail in msg and "num_q_heads" in msg and "/data/m" in msg and "head_sampling" in msg


def test_known_layout_ignores_what_the_shards_would_suggest():
    # the same sparse/stray sets are fine once the counts are known: pairing comes from the counts only
    ids = [i for i in full_set(3, 6, 2) if i != (1, 4, "q")] + [(0, 6, "q")]
    layout = resolve_layout(ids, config=(None, None, None), card=(3, 6, 2))
    assert layout == HeadLayout(3, 6, 2, "card") and [q // layout.group_size for q in range(6)] == [0, 0, 0, 1, 1, 1]
    assert infer_from_shards(full_set(2, 4, 4)) == (2, 4, 4)


def test_layout_that_is_not_whole_groups_is_refused():
    with pytest.raises(LayoutError, match="whole GQA groups"):
        resolve_layout(full_set(1, 6, 2), config=(None, None, None), card=(1, 6, 4))


def test_expected_query_layers():
    layout = HeadLayout(4, 6, 2, "card")
    assert expected_query_layers(layout, [0, 2], head_sampling=False, full_attention_only=False) == [0, 1, 2, 3]
    assert expected_query_layers(layout, [0, 2], head_sampling=True, full_attention_only=False) == []
    assert expected_query_layers(layout, [0, 2, 9], head_sampling=False, full_attention_only=True) == [0, 2]
    assert expected_query_layers(layout, [0, 2], head_sampling=False, full_attention_only=False, layers=[1, 3, 7]) == [1, 3]


def test_shard_names_use_ascii_digits_only(tmp_path):
    from warehouse.sources.catalog import scan_shards

    for name in ("l00h00q", "l\u0660h\u0660q", "l0h0x", "L0H0Q"):  # Arabic-Indic zeros, a bad kind, upper case
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.parquet").write_bytes(b"x")
    scan = scan_shards(tmp_path)
    assert [(s.layer, s.head, s.kind, s.error) for s in scan.shards] == [(0, 0, "q", None)]
    assert scan.paths == [str(tmp_path / "l00h00q" / "data.parquet")]


def test_absurd_layouts_are_refused_before_planning():
    with pytest.raises(LayoutError, match="not a plausible layout"):
        resolve_layout(full_set(1, 2, 1), config=(10**9, 8, 8))
    with pytest.raises(LayoutError, match="not a plausible layout"):
        resolve_layout(full_set(1, 2, 1), config=(0, 8, 8))
