"""The plan of a run: the dataset's catalog (card, shards, layout, problems that belong to no head), the
heads it expects with their key heads, and the groups of heads one worker task computes together
(one key head and its query heads), with the heads that cannot run and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plasticity.types import AnalysisParams
from warehouse.store import db, results
from warehouse.sources.card import DatasetCard, find_card, read_card
from warehouse.sources.catalog import CatalogProblem, ShardError, ShardInfo, catalog_columns, scan_shards
from warehouse.sources.shard_profile import profile_shard
from warehouse.settings.config import RunConfig
from warehouse.store.families import Checkpoint
from warehouse.sources.layout import HeadLayout, expected_query_layers, resolve_layout
from warehouse.store.models import ModelInfo
from warehouse.sources.revision import content_digests, hub_blob_sha256, revision_of_digests


@dataclass
class GroupTask:
    """One key head and the query heads that share it (a GQA group): the unit of parallel work."""

    layer: int
    k_head: int
    k_info: ShardInfo | None
    queries: list[tuple[int, ShardInfo]]
    params: AnalysisParams
    cap: int
    attention: str = "false"  # 'auto' | 'true' | 'false' (RunConfig.attention)
    attention_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    attention_min_exact_rows: int = 100
    # 'all'; or, while the attention kernels are still being compiled, 'analysis' (the per-head analysis only) now
    # and 'attention' (the attention patterns only) later, whose outcomes `merge_phases` joins
    phase: str = "all"
    # query heads whose attention `attention: auto` does not compute: too few exact rows, decided
    # from positions before the run (warehouse.run.attention_plan)
    attention_skipped: frozenset[int] = frozenset()

    @property
    def attention_on(self) -> bool:
        return self.attention != "false"

    @property
    def needs_attention_kernels(self) -> bool:
        """Some query head of the group has its attention computed (not only a skipped summary)."""
        return self.attention_on and any(q not in self.attention_skipped for q, _ in self.queries)

    @property
    def computes_attention(self) -> bool:
        return self.attention_on and self.phase != "analysis"


@dataclass
class Catalog:
    """A dataset as found: its shards (named, not yet profiled), layout, card and dataset problems."""

    root: Path
    base: Path  # root / model_dir: the folder holding the shards
    shards: list[ShardInfo]
    layout: HeadLayout
    card: DatasetCard = field(default_factory=DatasetCard)
    problems: list[CatalogProblem] = field(default_factory=list)  # the dataset's, not any head's
    paths: list[str] = field(default_factory=list)  # every shard file found (all count for the revision)
    expected_layers: list[int] = field(default_factory=list)  # layers whose every query head needs a shard

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def num_q_heads(self) -> int:
        return self.layout.num_q_heads

    @property
    def num_k_heads(self) -> int:
        return self.layout.num_k_heads

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    def profile(self, info: ShardInfo) -> ShardInfo:
        """`profile_shard` with this dataset's bucket scheme."""
        return profile_shard(info, self.card.scheme)

    def model_info(self, model: str, dataset_name: str | None, revision: str,
                   checkpoint: Checkpoint | None = None) -> ModelInfo:
        return ModelInfo(model, dataset_name, revision, self.layout, self.card, checkpoint)


def local_revision(cat: "Catalog") -> str:
    """The revision of a local dataset: a hash of every byte of every shard (`warehouse.sources.revision`).
    Each shard keeps its own digest (`ShardInfo.sha256`): the worker reading it verifies its bytes."""
    digests = content_digests(cat.base, cat.paths)
    for shard in cat.shards:
        shard.sha256 = digests.get(shard.path)
    return revision_of_digests(cat.base, digests)


def snapshot_digests(cat: "Catalog") -> None:
    """Each shard's SHA-256 as its Hub snapshot names it (`hub_blob_sha256`; None where unknown), for
    a run whose revision is a Hub commit: workers verify what they read against it, as for a local run."""
    for shard in cat.shards:
        shard.sha256 = hub_blob_sha256(shard.path)


def _mark_outside_layout(shards: list[ShardInfo], layout: HeadLayout) -> list[CatalogProblem]:
    """Shards whose layer or head the layout does not have: a `layout_mismatch` error (never re-paired).

    A query shard outside the layout is a planned head, so its error lands in `head_errors`; a key
    shard outside it belongs to no head, so it is also returned as a problem of the dataset (the
    `catalog_problems` row), or nobody would hear of it."""
    limit = {"q": layout.num_q_heads, "k": layout.num_k_heads}
    problems = []
    for s in shards:
        if s.error is None and (s.layer >= layout.num_layers or s.head >= limit[s.kind]):
            what = "query" if s.kind == "q" else "key"
            s.error = ShardError(s.path, "layout_mismatch",
                                 f"{what} head {s.head} of layer {s.layer} is outside the layout: {layout.describe()}")
            if s.kind == "k":
                problems.append(CatalogProblem(s.path, "layout_mismatch",
                                               f"{s.error} (no query head pairs with it; it is not used)"))
    return problems


def _dataset_problems(card: DatasetCard, shards: list[ShardInfo]) -> list[CatalogProblem]:
    out = [CatalogProblem(card.path, "invalid_card", f"{card.path}: {p}") for p in card.problems]
    if card.head_sampling is not None and card.head_sampling_query_heads is not None:
        found = len({(s.layer, s.head) for s in shards if s.kind == "q"})
        if found != card.head_sampling_query_heads:
            out.append(CatalogProblem(
                card.path, "head_sampling_mismatch",
                f"{card.path}: the card says {card.head_sampling_query_heads} query heads were sampled, "
                f"the dataset holds {found} query shard(s)"))
    return out


def find_catalog(root: str | Path, cfg: RunConfig, listing: list[str] | None = None) -> Catalog:
    """Every shard of the dataset by name (not yet profiled), the dataset card and the head layout.

    Layout: config, else card, else a complete shard set (`warehouse.sources.layout.resolve_layout`); raises
    `LayoutError` (before any work) when it cannot be known. Cheap: a directory listing and the card.
    `listing`: the shard folder names, when the shards are not on disk yet (`scan_shards`).
    """
    scan = scan_shards(root, cfg.model_dir, listing)
    card = read_card(find_card(root, scan.base))
    layout = resolve_layout(
        [(s.layer, s.head, s.kind) for s in scan.shards],
        config=(cfg.num_layers, cfg.num_q_heads, cfg.num_k_heads),
        card=(card.num_layers, card.num_q_heads, card.num_k_heads), where=str(scan.base), card_path=card.path,
    )
    stray_keys = _mark_outside_layout(scan.shards, layout)
    expected = expected_query_layers(
        layout, (s.layer for s in scan.shards), head_sampling=card.head_sampling is not None,
        full_attention_only=card.attention_scope == "full_only", layers=cfg.layers,
    )
    return Catalog(Path(root), scan.base, scan.shards, layout, card,
                   scan.problems + stray_keys + _dataset_problems(card, scan.shards), scan.paths, expected)


def profile_catalog(cat: Catalog) -> Catalog:
    """Profile every shard in place (footer and scalar columns only, a few ms a shard)."""
    for s in cat.shards:
        cat.profile(s)
    return cat


def build_catalog(root: str | Path, cfg: RunConfig) -> Catalog:
    """Find and profile every shard (`find_catalog`, `profile_catalog`)."""
    return profile_catalog(find_catalog(root, cfg))


@dataclass(frozen=True)
class PlannedHead:
    """One row of sql/head_samples.sql: a head the run plans, and why it cannot run (if it cannot)."""

    layer: int
    q_head: int
    k_head: int
    q_path: str | None
    k_path: str | None
    problem: str | None  # missing_query_shard | layout_mismatch | missing_key_shard | None


def plan_parameters(layout: HeadLayout, expected_layers: list[int], cfg: RunConfig, model: str) -> dict:
    """The parameters of sql/head_samples.sql."""
    return {"model": model, "group_size": layout.group_size, "num_layers": layout.num_layers,
            "num_q_heads": layout.num_q_heads, "expected_layers": list(expected_layers), "layers": cfg.layers,
            "cap": cfg.max_tokens_per_head}


def head_pairs(cat: Catalog, cfg: RunConfig) -> list[PlannedHead]:
    """Every head the run plans: each query shard and each query head the layout expects, with its key head.

    The GQA join, the expected heads and the layer filter are sql/head_samples.sql, the same query the
    Dagster `head_samples` asset runs against the warehouse catalog.
    """
    import sql

    # numpy columns (object arrays for text and nullable values): DuckDB scans a dict of them
    # without importing pandas, which an Arrow table would cost (~0.5 s, before the workers start)
    table = {k: np.array(v, dtype=object) for k, v in catalog_columns(cat.shards, "_", None).items()}
    table["layer"] = table["layer"].astype(np.int64)
    table["head"] = table["head"].astype(np.int64)
    con = db.memory_connection()
    try:
        con.register("shards", table)
        cur = con.execute(sql.load("head_samples"), plan_parameters(cat.layout, cat.expected_layers, cfg, "_"))
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()
    return [PlannedHead(int(r["layer"]), int(r["q_head"]), int(r["k_head"]), r["q_path"], r["k_path"],
                        r["plan_problem"]) for r in out]


def plan_groups(cat: Catalog, cfg: RunConfig, skip: set[tuple[int, int]] = frozenset(),
                pairs: list[PlannedHead] | None = None) -> list[GroupTask]:
    """GQA groups of query heads to compute, skipping heads already done and heads the plan already
    knows cannot run (``pairs``: `head_pairs`, computed here when not given; see `plan_failures`)."""
    by_path = {s.path: s for s in cat.shards}
    groups: dict[tuple[int, int], GroupTask] = {}
    for head in (head_pairs(cat, cfg) if pairs is None else pairs):
        if (head.layer, head.q_head) in skip or head.problem is not None:
            continue
        task = groups.get((head.layer, head.k_head))
        if task is None:
            task = groups[(head.layer, head.k_head)] = GroupTask(
                layer=head.layer, k_head=head.k_head, k_info=by_path.get(head.k_path), queries=[],
                params=cfg.params, cap=cfg.max_tokens_per_head, attention=cfg.attention,
                attention_scales=tuple(cfg.attention_scales), attention_min_exact_rows=cfg.attention_min_exact_rows,
            )
        task.queries.append((head.q_head, by_path[head.q_path]))
    return [groups[k] for k in sorted(groups)]


def plan_failures(cat: Catalog, pairs: list[PlannedHead], skip: set[tuple[int, int]] = frozenset()
                  ) -> list[results.HeadOutcome]:
    """The error outcome of every planned head that cannot run (``head.problem``), naming the file."""
    out = []
    for head in pairs:
        if head.problem is None or (head.layer, head.q_head) in skip:
            continue
        outcome = results.HeadOutcome(head.layer, head.q_head, head.k_head)
        if head.problem == "missing_query_shard":
            file = str(cat.base / f"l{head.layer:02d}h{head.q_head:02d}q" / "data.parquet")
            outcome.error = _error(file, head.problem,
                                   f"{file}: expected query shard is missing (layout {cat.layout.describe()}, and the "
                                   "dataset card does not say that only some heads were captured)")
        elif head.problem == "layout_mismatch":
            outcome.error = _error(head.q_path, head.problem,
                                   f"{head.q_path}: query head {head.q_head} of layer {head.layer} is outside the "
                                   f"layout: {cat.layout.describe()}")
        else:
            outcome.error = _missing_key_error(head.layer, head.k_head)
        out.append(outcome)
    return out


def _error(file: str | None, problem: str, message: str) -> dict:
    return {"file": file, "problem": problem, "message": message}


def _missing_key_error(layer: int, k_head: int) -> dict:
    return _error(None, "missing_key_shard", f"key shard l{layer:02d}h{k_head:02d}k/data.parquet is missing")


def resolved_config(cfg: RunConfig, layout: HeadLayout) -> RunConfig:
    """`cfg` with the resolved head layout filled in: what the run id and the `runs` table record.
    The layout's source (config, card, shards) is left out: the same layout gives the same numbers."""
    return dataclasses.replace(cfg, num_layers=layout.num_layers, num_q_heads=layout.num_q_heads,
                               num_k_heads=layout.num_k_heads)
