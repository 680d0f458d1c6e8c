"""The GQA head layout of a dataset (docs/method.md#inputs): how many layers, query heads and key heads.

Head counts come from the config; else from the dataset card; else they are inferred, but only
from a complete, consistent shard set (every layer 0..L-1 has query heads 0..Q-1 and key heads
0..K-1, and K divides Q). qk-sniffer's ``head_sampling`` captures a random subset of query heads,
so a sparse shard set is normal and says nothing about the counts: when neither the config nor the
card gives them and the set is not complete, the run stops before any work (`LayoutError`) and
asks for them. A stray or missing shard therefore never changes which key head a query head is
paired with. Pure functions: shard identities in, layout out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ShardId = tuple[int, int, str]  # (layer, head, 'q' | 'k')
LAYOUT_SOURCES = ("config", "card", "shards")
#: A layout planning more query heads than this is refused: every expected head becomes a planned row,
#: so an absurd count (a typo, a hostile card) would otherwise exhaust memory before any check.
MAX_PLANNED_HEADS = 1 << 20


class LayoutError(ValueError):
    """The head layout cannot be known: the run stops before any work."""


@dataclass(frozen=True)
class HeadLayout:
    num_layers: int
    num_q_heads: int
    num_k_heads: int
    source: str  # where the head counts came from: config | card | shards

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_k_heads

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_q_heads} query heads / {self.num_k_heads} key heads "
                f"(from the {self.source})")


def _shard_name(layer: int, head: int, kind: str) -> str:
    return f"l{layer:02d}h{head:02d}{kind}"


def infer_from_shards(ids: Iterable[ShardId]) -> tuple[int, int, int]:
    """(num_layers, num_q_heads, num_k_heads) of a complete, consistent shard set; LayoutError (saying
    what is missing or inconsistent) otherwise."""
    ids = set(ids)
    q = {(l, h) for l, h, kind in ids if kind == "q"}
    k = {(l, h) for l, h, kind in ids if kind == "k"}
    if not q or not k:
        raise LayoutError(f"the dataset has no {'query' if not q else 'key'} shards")
    num_layers = max(l for l, _, _ in ids) + 1
    num_q = max(h for _, h in q) + 1
    num_k = max(h for _, h in k) + 1
    missing = [_shard_name(l, h, kind) for l in range(num_layers)
               for kind, n, have in (("q", num_q, q), ("k", num_k, k)) for h in range(n) if (l, h) not in have]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise LayoutError(f"the shard set is not complete: {num_layers} layers x {num_q} query / {num_k} key heads "
                          f"would need {shown}")
    if num_q % num_k:
        raise LayoutError(f"the shards hold {num_q} query heads and {num_k} key heads per layer, which is not a "
                          "whole number of GQA groups")
    return num_layers, num_q, num_k


LAYOUT_KEYS = ("num_layers", "num_q_heads", "num_k_heads")


def check_config_agrees_with_card(config: tuple[int | None, int | None, int | None],
                                  card: tuple[int | None, int | None, int | None], card_path: str | None) -> None:
    """LayoutError when the config and the dataset card both give a count and the two differ.

    The pairing of every query head with its key head (``q_head // group``) follows from the counts,
    so a contradiction would pair every head of the run wrongly while no single head could be blamed:
    the run stops before any work and names both values instead of choosing one."""
    clashes = [f"{key} = {mine} in the config but {theirs} on the dataset card"
               for key, mine, theirs in zip(LAYOUT_KEYS, config, card)
               if mine is not None and theirs is not None and int(mine) != int(theirs)]
    if clashes:
        raise LayoutError(f"{'; '.join(clashes)} ({card_path or 'the dataset card'}): the query/key head pairing "
                          "depends on these counts, so the run does not choose between them. Remove the key from "
                          "the config to use the card's count, or correct the card.")


def resolve_layout(ids: Iterable[ShardId], *, config: tuple[int | None, int | None, int | None],
                   card: tuple[int | None, int | None, int | None] = (None, None, None),
                   where: str = "the dataset", card_path: str | None = None) -> HeadLayout:
    """The layout of a dataset from (num_layers, num_q_heads, num_k_heads) of the config and of the card
    (None = not given), else from the shard identities (`infer_from_shards`).

    Head counts: config, else card, else shards. Layers: config, else card, else the shards'
    (largest layer + 1). Raises LayoutError when the head counts cannot be known, or when the config
    and the card give different counts (`check_config_agrees_with_card`).
    """
    check_config_agrees_with_card(config, card, card_path)
    ids = list(ids)
    cfg_layers, cfg_q, cfg_k = config
    card_layers, card_q, card_k = card
    if cfg_q is not None and cfg_k is not None:
        num_q, num_k, source = cfg_q, cfg_k, "config"
    elif card_q is not None and card_k is not None:
        num_q, num_k, source = card_q, card_k, "card"
    else:
        try:
            inferred = infer_from_shards(ids)
        except LayoutError as exc:
            raise LayoutError(
                f"cannot tell the head layout of {where}: neither the config nor the dataset card gives "
                f"num_q_heads/num_k_heads, and {exc}. Captures of a subset of heads (qk-sniffer head_sampling) "
                "are normal, so the counts are never guessed from such a set: set num_q_heads and num_k_heads "
                "(and num_layers) in the config."
            ) from None
        num_q, num_k, source = inferred[1], inferred[2], "shards"
    if num_q < 1 or num_k < 1 or num_q % num_k:
        raise LayoutError(f"{num_q} query heads and {num_k} key heads (from the {source}) are not whole GQA groups")
    if cfg_layers is not None:
        num_layers = cfg_layers
    elif card_layers is not None:
        num_layers = card_layers
    elif ids:
        num_layers = max(l for l, _, _ in ids) + 1
    else:
        raise LayoutError(f"cannot tell how many layers {where} has: set num_layers in the config")
    if num_layers < 1 or num_layers * num_q > MAX_PLANNED_HEADS:
        raise LayoutError(f"{num_layers} layers x {num_q} query heads is not a plausible layout (at most "
                          f"{MAX_PLANNED_HEADS} heads); check num_layers and num_q_heads")
    return HeadLayout(int(num_layers), int(num_q), int(num_k), source)


def expected_query_layers(layout: HeadLayout, present_layers: Iterable[int], *, head_sampling: bool,
                          full_attention_only: bool, layers: Iterable[int] | None = None) -> list[int]:
    """Layers in which every query head 0..num_q_heads-1 must have a shard (a missing one is a
    `missing_query_shard` error).

    None when the card says heads were sampled (qk-sniffer ``head_sampling``: the captured subset is
    the whole plan). When it says only full-attention layers were captured (``attention_scope:
    full_only``), the layers with at least one shard (a layer without any is a sliding-window layer).
    Otherwise every layer below ``num_layers``. Restricted to ``layers`` (the config's filter) when given.
    """
    if head_sampling:
        return []
    if full_attention_only:
        out = sorted({int(l) for l in present_layers if 0 <= l < layout.num_layers})
    else:
        out = list(range(layout.num_layers))
    if layers is not None:
        keep = set(layers)
        out = [l for l in out if l in keep]
    return out
