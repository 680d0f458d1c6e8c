"""The `models` table: what was resolved for each analysed model (latest state, one row per model),
and the `catalog_problems` of its dataset; both written with the shard catalog.

A row says where the head layout came from (config | card | shards), the bucket scheme and the
sampling the dataset card states (so plots place buckets and estimators weight captures without
re-reading the card), the card's own model name (untrusted text, stored as such), and the family,
stage and training step of a checkpoint (`warehouse.store.families`; none of them changes a number, so
they are not part of the run id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb

from warehouse.sources.card import DatasetCard
from warehouse.sources.catalog import CatalogProblem
from warehouse.store.families import Checkpoint
from warehouse.sources.layout import HeadLayout

MODEL_COLUMNS = (
    "model", "dataset_name", "revision", "num_layers", "num_q_heads", "num_k_heads", "layout_source",
    "head_sampling", "attention_scope", "bucket_scheme", "bucket_size", "sampling_strategy", "sampler_base_rate",
    "q_capture_probability", "k_capture_probability", "card_model_name", "updated_at", "family", "stage", "step",
)


@dataclass(frozen=True)
class ModelInfo:
    """The resolved state of one model's dataset."""

    model: str
    dataset_name: str | None
    revision: str
    layout: HeadLayout
    card: DatasetCard
    checkpoint: Checkpoint | None = None  # its family, stage and step (config or Hub branch), if any

    def row(self) -> dict:
        card, layout, ckpt = self.card, self.layout, self.checkpoint
        # qk-sniffer samples queries and keys with one sampler, so their capture probabilities are equal;
        # NULL when the card does not say, or when it varies by bucket (log sampler: see DatasetCard)
        p = card.constant_capture_probability
        return {
            "model": self.model, "dataset_name": self.dataset_name, "revision": self.revision,
            "num_layers": layout.num_layers, "num_q_heads": layout.num_q_heads, "num_k_heads": layout.num_k_heads,
            "layout_source": layout.source, "head_sampling": card.head_sampling,
            "attention_scope": card.attention_scope, "bucket_scheme": card.bucket_scheme,
            "bucket_size": card.bucket_size, "sampling_strategy": card.sampling_strategy,
            "sampler_base_rate": card.sampler_base_rate, "q_capture_probability": p, "k_capture_probability": p,
            "card_model_name": card.model_name,
            "updated_at": datetime.now(timezone.utc).replace(tzinfo=None),
            "family": ckpt.family if ckpt else None, "stage": ckpt.stage if ckpt else None,
            "step": ckpt.step if ckpt else None,
        }

    def run_facts(self) -> dict:
        """What the dataset card states that changes a stored number or a check: part of the run id.
        (The head counts enter the run id through the resolved config; their source does not.)"""
        card = self.card
        return {"bucket_scheme": card.bucket_scheme, "bucket_size": card.bucket_size,
                "sampling_strategy": card.sampling_strategy, "sampler_base_rate": card.sampler_base_rate,
                "capture_fraction": card.capture_fraction}


def replace_model(con: duckdb.DuckDBPyConnection, info: ModelInfo, problems: list[CatalogProblem]) -> None:
    """Replace the model's `models` row and `catalog_problems` rows (the caller holds the transaction)."""
    con.execute("DELETE FROM models WHERE model = $m", {"m": info.model})
    row = info.row()
    con.execute(f"INSERT INTO models ({', '.join(MODEL_COLUMNS)}) VALUES ({', '.join('$' + c for c in MODEL_COLUMNS)})",
                row)
    con.execute("DELETE FROM catalog_problems WHERE model = $m", {"m": info.model})
    for p in problems:
        con.execute("INSERT INTO catalog_problems VALUES ($m, $r, $f, $p, $msg, $t)",
                    {"m": info.model, "r": info.revision, "f": p.file, "p": p.problem, "msg": p.message,
                     "t": row["updated_at"]})


def read_model(con: duckdb.DuckDBPyConnection, model: str) -> dict | None:
    """The model's `models` row as a dict, or None."""
    cur = con.execute("SELECT * FROM models WHERE model = $m", {"m": model})
    values = cur.fetchone()
    return None if values is None else dict(zip([d[0] for d in cur.description], values))


def plot_bucket_options(row: dict | None) -> dict:
    """`PlotOptions` bucket_type / bucket_min_size for a model's bucket scheme ({} when unknown).

    The plots place bucket ``b`` at ``b * bucket_min_size`` (uniform) or ``2**b * bucket_min_size`` (log,
    the upstream convention); qk-sniffer's log bucket ``b`` starts at position ``2**b - 1``, so its
    multiplier is 1 (the card's minimum bucket size only clamps the first bucket)."""
    if not row or row.get("bucket_scheme") not in ("uniform", "log") or not row.get("bucket_size"):
        return {}
    if row["bucket_scheme"] == "log":
        return {"bucket_type": "log", "bucket_min_size": 1.0}
    return {"bucket_type": "uniform", "bucket_min_size": float(row["bucket_size"])}


def bucket_plot_defaults(warehouse: str | os.PathLike, model: str | None, timeout_s: float = 60.0) -> dict:
    """`plot_bucket_options` of `model` read from the warehouse ({} when the model, the table or the
    file is not there)."""
    from warehouse.store import db

    if not model or not os.path.exists(warehouse):
        return {}
    with db.reader(warehouse, timeout_s) as con:
        if not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'models'").fetchone():
            return {}
        return plot_bucket_options(read_model(con, model))
