"""The download side of a streamed Hub run: which files each unit of the run needs, in what order,
and the `ShardStream` that fetches them (`warehouse.run.streaming`) with huggingface_hub, pinned to the
run's commit and checked against the Hub's hashes (`warehouse.sources.hub_files`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from warehouse.run.planning import Catalog, GroupTask
from warehouse.sources.catalog import BucketRange, ShardError
from warehouse.store import db
from warehouse.run.streaming import ShardStream
from warehouse.settings.config import RunConfig
from warehouse.sources.hub_files import HubBranchFiles, download_shard, remove_partial_downloads, stream_folder_lock

#: Parallel downloads when `download_max_workers` is not set (huggingface_hub's own default).
DEFAULT_DOWNLOAD_WORKERS = 8


def stream_units(cat: Catalog, groups: list[GroupTask]) -> list[tuple]:
    """The run's units in the order it needs them: each group's readable shards (key, then queries),
    then each other readable shard not profiled yet (only its profile is needed: the catalog lists
    every shard)."""
    units: list[tuple] = []
    claimed: set[str] = set()
    for task in groups:
        shards = ([task.k_info] if task.k_info is not None else []) + [q for _, q in task.queries]
        paths = [s.path for s in shards if s.error is None and s.path not in claimed]
        claimed.update(paths)
        units.append(((task.layer, task.k_head), paths))
    for shard in cat.shards:
        if shard.error is None and shard.n_rows is None and shard.path not in claimed:
            units.append((("profile", shard.path), [shard.path]))
    return units


#: Profiles never taken from an earlier run: the shard was not read, so the next run tries it again.
NOT_REUSED_PROBLEMS = ("download_failed",)


def reuse_profiles(warehouse: str, lock_timeout_s: float, model: str, revision: str, cat: Catalog,
                   needed: set[str]) -> int:
    """Fill in, from the warehouse's catalog of the same model at the same commit, the profile of each
    shard outside `needed` (the paths the run's groups read): a resumed streamed run then downloads
    only what its unfinished heads need (each batch of a streamed run stores the profiles of the shards
    its heads read). The profile of a file depends on its bytes and the card's
    bucket scheme alone, both fixed by the commit, so the stored rows are the ones profiling gives.
    Returns how many shards were filled in."""
    wanted = {s.path: s for s in cat.shards if s.path not in needed and s.error is None}
    if not wanted:
        return 0
    with db.reader(warehouse, lock_timeout_s) as con:
        rows = con.execute(
            "SELECT path, layer, head, kind, n_rows, dim, sliding_window, n_examples, has_token_str, error, problem "
            "FROM shards WHERE model = $m AND revision = $r", {"m": model, "r": revision}).fetchall()
        buckets = con.execute(
            "SELECT layer, head, kind, bucket, n_rows, min_position, max_position, mean_position FROM shard_buckets "
            "WHERE model = $m ORDER BY layer, head, kind, bucket", {"m": model}).fetchall()
    by_head: dict[tuple, list[BucketRange]] = {}
    for layer, head, kind, *rest in buckets:
        by_head.setdefault((layer, head, kind), []).append(BucketRange(*rest))
    n = 0
    for path, layer, head, kind, n_rows, dim, window, n_examples, tokens, error, problem in rows:
        shard = wanted.get(path)
        if shard is None or (shard.layer, shard.head, shard.kind) != (layer, head, kind):
            continue
        if problem in NOT_REUSED_PROBLEMS or (error is None and n_rows is None):
            continue  # not read by that run, or not profiled: this run reads it
        shard.n_rows, shard.dim, shard.sliding_window, shard.n_examples = n_rows, dim, window, n_examples
        shard.has_token_str = bool(tokens)
        shard.buckets = by_head.get((layer, head, kind), [])
        if error is not None:  # stored as str(ShardError) = "<path>: <message>"
            message = error[len(path) + 2:] if error.startswith(f"{path}: ") else error
            shard.error = ShardError(path, problem, message)
        n += 1
    return n


@contextmanager
def open_stream(hub: HubBranchFiles | None, cat: Catalog, groups: list[GroupTask],
                cfg: RunConfig) -> Iterator[ShardStream | None]:
    """A `ShardStream` over the run's units (None for a local dataset); closed (and its undeleted
    files removed, unless ``keep_downloads``) however the run ends."""
    if hub is None:
        yield None
        return
    with stream_folder_lock(hub, cfg.lock_timeout_s):  # one streamed run per commit folder at a time
        remove_partial_downloads(hub)  # a killed run's partial files
        sizes = {path: f.size for path, f in hub.shards.items()}
        stream = ShardStream(stream_units(cat, groups), sizes, lambda path: download_shard(hub, path),
                             budget_bytes=int(cfg.download_budget_gb * 1e9),
                             max_workers=cfg.download_max_workers or DEFAULT_DOWNLOAD_WORKERS,
                             keep=bool(cfg.keep_downloads))
        try:
            yield stream
        finally:
            stream.close()
