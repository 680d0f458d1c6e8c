"""Which heads' attention a run computes under ``attention: auto``, decided before any vector is read.

A head's attention is computed only when it has at least ``attention_min_exact_rows`` exact query
rows (every key the query may see was captured). Whether a row is exact depends on positions
alone, so the decision reads each shard's ``example_id``, ``position`` (and ``sliding_window``)
columns: the columns the catalog profile reads, a small fraction of a shard's bytes. A head below
the threshold is computed as before for its analysis, but its attention is not: its summary says
``skipped`` with the reason, and no per-token row is stored. When no head of the run needs
attention, the attention kernels are neither compiled nor loaded.

The count uses every captured row, before the row cap: a cap only removes rows, so it can only
lower the count, and a head below the threshold here stays below it. A head above it is handed to
the kernels, which decide again on the rows they actually get.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from plasticity.attention.visibility import count_exact_rows

__all__ = ["read_positions", "plan_attention_coverage"]


def read_positions(path: str) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """(example_id, position, sliding_window) of a shard, without its vectors; None when the file
    cannot be read this way (the analysis then reads it and reports the problem against the head)."""
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        columns = ["example_id", "position"] + (["sliding_window"] if "sliding_window" in names else [])
        table = pf.read(columns=columns, use_threads=False)
        example_id = table.column("example_id").to_numpy().astype(np.int64)
        position = table.column("position").to_numpy()
        if not np.all(np.isfinite(position)) or not np.all(position == np.floor(position)):
            return None
        window = None
        if "sliding_window" in names:
            windows = table.column("sliding_window").drop_null()
            window = int(windows[0].as_py()) if len(windows) else None
        return example_id, position.astype(np.int64), window
    except Exception:  # noqa: BLE001 - any unreadable file: leave the decision to the analysis
        return None


def plan_attention_coverage(groups) -> None:
    """Fill ``attention_skipped`` of every ``attention: auto`` group (warehouse.run.pipeline.GroupTask):
    the query heads with fewer exact rows than ``attention_min_exact_rows``."""
    for task in groups:
        if task.attention != "auto" or task.k_info is None:
            continue
        keys = read_positions(task.k_info.path)
        if keys is None:
            continue
        skipped = set()
        for q_head, q_info in task.queries:
            queries = read_positions(q_info.path)
            if queries is None:
                continue
            window = queries[2] if queries[2] is not None else keys[2]
            if count_exact_rows(queries[0], queries[1], keys[0], keys[1], window) < task.attention_min_exact_rows:
                skipped.add(q_head)
        task.attention_skipped = frozenset(skipped)
