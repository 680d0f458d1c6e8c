"""The per-model run: catalog -> plan heads -> compute (worker processes) -> write (this process).

Compute steps read shards through their own in-memory DuckDB connections and
return plain results; only the calling process writes the warehouse, in short
transactions, so a crash leaves every committed head intact and a re-run with
the same config resumes where it stopped. The plan is `warehouse.run.planning`, a group's computation
`warehouse.run.group`, the worker processes `warehouse.run.worker_pool`; this module runs them and writes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from warehouse.store import db, results
from warehouse.run import kernel_cache
from warehouse.sources.catalog import ShardError, ShardInfo
from warehouse.sources.hub_files import HubBranchFiles
from warehouse.settings.config import RunConfig
from warehouse.store.families import checkpoint_of
from warehouse.store.models import ModelInfo
from warehouse.sources.revision import RevisionHash
from warehouse.sources.names import safe_path_component
from warehouse.run.planning import (GroupTask, find_catalog, head_pairs, plan_failures, plan_groups,
                                    snapshot_digests,
                                    resolved_config)
from warehouse.run.streaming import ShardStream
from warehouse.run.hub_stream import open_stream, reuse_profiles
from warehouse.run.worker_pool import iter_outcomes, start_pool

# Results are committed in batches: every FLUSH_EVERY_HEADS heads or FLUSH_EVERY_SECONDS, whichever
# comes first. Each commit opens the warehouse (~30 ms) and replaces the batch's rows in one
# transaction, so a crash loses at most one batch; fewer, larger batches leave the CPU to the workers.
FLUSH_EVERY_HEADS = 64
FLUSH_EVERY_SECONDS = 5.0
# A local run computes while its revision is hashed and holds the results until the run id is known;
# past this many held heads it waits for the hash before it starts another group, so the memory held
# stays that of two batches (the attention tables of a head can be megabytes) on any dataset size.
MAX_HELD_HEADS = 2 * FLUSH_EVERY_HEADS


def package_version() -> str:
    try:
        return version("attention-plasticity-warehouse")
    except PackageNotFoundError:
        return "0+unknown"


def _stop_run(wh: str, timeout_s: float, run_id: str, model: str, exc: BaseException,
              flush: Callable[[], None] | None) -> None:
    """A run that stops early keeps the heads it computed and is marked 'interrupted' (Ctrl-C, SIGTERM,
    a cancelled Dagster run) or 'failed' (an error), with the reason, instead of staying 'running'.
    Best effort: a problem here is reported, never raised over the original one."""
    interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)) or not isinstance(exc, Exception)
    status = "interrupted" if interrupted else "failed"
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if flush is not None:
        try:
            flush()
        except Exception as cleanup:  # noqa: BLE001 -- e.g. the disk is full: the one-row update below may still fit
            print(f"warning: could not write the last heads of run {run_id} of {model} to {wh}: {cleanup}",
                  file=sys.stderr)
    try:
        with db.writer(wh, timeout_s) as con:
            results.stop_run(con, run_id, model, status, reason)
    except Exception as cleanup:  # noqa: BLE001 -- the original exception is the one to raise
        print(f"warning: could not mark run {run_id} of {model} as {status} in {wh}: {cleanup}", file=sys.stderr)


@dataclass
class RunSummary:
    model: str
    run_id: str
    revision: str
    n_heads: int
    n_computed: int
    n_skipped: int
    n_done: int
    n_errors: int
    status: str
    seconds: float
    warehouse: str
    downloads: dict | None = None  # a streamed Hub run's `ShardStream.stats` (None for a local dataset)


def analyze_dataset(
    cfg: RunConfig,
    root: str | Path,
    *,
    model: str | None = None,
    revision: str | None = None,
    resume: bool = True,
    progress: bool | None = None,
    on_outcome: Callable[[results.HeadOutcome], None] | None = None,
    hub: HubBranchFiles | None = None,
) -> RunSummary:
    """Analyse every head of one model's dataset folder into the warehouse.

    The head layout is resolved first (config, else dataset card, else a complete shard set; a
    `LayoutError` stops the run before any work), then the revision (the Hub commit sha, else a hash
    of every byte of every shard) and the run id from both, so the same data and settings give the
    same run id whichever command or asset launches the run. The model name is the caller's, else the
    config's, else the folder's (never the card's: card text is untrusted). A local dataset's hash is
    made while its first groups compute, and their results are committed once it is known
    (`_analyze_local`).

    The run is planned from the shard names; when heads remain to compute, worker processes
    (`cfg.workers()`, spawned) start and import the analysis code. Each group's shards are
    profiled just before it is submitted; once the first groups are in flight this process
    profiles the other shards and records the catalog and the run. Workers compute GQA groups
    (`compute_group`) and never open the warehouse; this process alone writes the results, in
    one transaction every FLUSH_EVERY_HEADS heads or FLUSH_EVERY_SECONDS, so a killed run keeps
    every committed head and the next run with the same config (same run_id) skips them.

    A machine whose numba cache is empty compiles the kernels once, in a
    background process, while this process plans and profiles (`warehouse.run.kernel_cache`); the first
    group waits for it, so the workers load the kernels instead of each compiling them.

    `hub`: the shards are a Hub branch's at one commit, not (all) on disk: the run is planned from the
    Hub's listing, its revision is the commit sha, and each group's shards are downloaded as its turn
    comes, within ``cfg.download_budget_gb``, and deleted once its results are in
    (`warehouse.run.hub_stream`). Every stored value is the same as a run over a complete copy.
    """
    t0 = time.perf_counter()
    # Everything up to the plan needs only the shard names, so the workers start (and import the
    # analysis code) only when there is work, and as early as possible.
    cat = find_catalog(root, cfg, listing=hub.shard_folders if hub is not None else None)
    model = safe_path_component(str(model or cfg.model or Path(root).name), "model name")  # names the results folder
    cfg.check_layers_exist({s.layer for s in cat.shards})
    checkpoint = checkpoint_of(cfg)
    if hub is not None:  # streamed from the Hub: each download is checked against the Hub's SHA-256
        revision = revision or hub.sha
    elif revision:  # a Hub snapshot: each shard checked against the SHA-256 its cached blob is named by
        snapshot_digests(cat)
    cfg = resolved_config(cfg, cat.layout)
    wh = cfg.warehouse
    if revision is None:  # a local dataset: hashed while its first groups compute
        return _analyze_local(cfg, cat, t0, model=model, checkpoint=checkpoint, resume=resume, progress=progress,
                              on_outcome=on_outcome)
    info = cat.model_info(model, cfg.dataset_name, revision, checkpoint)
    run_id = cfg.run_id(model, revision, info.run_facts())
    db.ensure_schema(wh, cfg.lock_timeout_s)
    with db.reader(wh, cfg.lock_timeout_s) as con:
        already = results.done_heads(con, model, run_id) if resume else set()
    pairs = head_pairs(cat, cfg)
    n_heads = len(pairs)
    groups = plan_groups(cat, cfg, skip=already, pairs=pairs)  # tasks share the ShardInfo objects _run profiles
    workers = max(1, min(cfg.workers(), len(groups)))
    kernels = _prepare_kernels(cfg, groups)
    if hub is not None:  # shards no group reads: their stored profile at this commit, when there is one
        needed = {s.path for g in groups for s in [g.k_info, *(q for _, q in g.queries)] if s is not None}
        reuse_profiles(wh, cfg.lock_timeout_s, model, revision, cat, needed)
    known = _Identity(info, run_id, already)
    # downloads start before the workers do: both take seconds, and the first group needs both
    with open_stream(hub, cat, groups, cfg) as stream, start_pool(workers, kernels) as pool:
        return _run(cfg, cat, pairs, groups, pool, workers, t0, model=model, settle=lambda: known, resume=resume,
                    n_heads=n_heads, progress=progress, on_outcome=on_outcome, stream=stream)


def _prepare_kernels(cfg: RunConfig, groups: list[GroupTask]) -> bool:
    """Decide which heads' attention `attention: auto` computes, and start compiling the kernels the
    groups need when the machine's numba cache lacks them; whether the attention kernels are needed."""
    if cfg.attention == "auto":
        from warehouse.run.attention_plan import plan_attention_coverage

        plan_attention_coverage(groups)
    # the attention kernels are compiled and loaded only when some head's attention is computed
    kernels = any(g.needs_attention_kernels for g in groups)
    if groups:
        kernel_cache.start_kernel_warmup(["analysis", "attention"] if kernels else ["analysis"])
    return kernels


@dataclass
class _Identity:
    """What the run id decides: the revision's model row, the run id, the heads it already has."""

    info: ModelInfo
    run_id: str
    already: set[tuple[int, int]]


def _group_files(groups: list[GroupTask]) -> list[str]:
    """The shard files of the groups in the order the run reads them."""
    return [s.path for g in groups for s in (g.k_info, *(q for _, q in g.queries)) if s is not None]


def resumable_heads(wh: str, timeout_s: float, cfg: RunConfig, model: str, facts: dict) -> set[tuple[int, int]]:
    """Heads done in any earlier run of `model` with these settings, whatever its revision: the heads a
    run whose revision is not known yet may find already done (never more: the run id is the model,
    the revision and these settings, and an earlier run's revision is in its `runs` row)."""
    with db.reader(wh, timeout_s) as con:
        revisions = [r for (r,) in con.execute("SELECT DISTINCT revision FROM runs WHERE model = $m",
                                               {"m": model}).fetchall()]
        done: set[tuple[int, int]] = set()
        for rev in revisions:
            done |= results.done_heads(con, model, cfg.run_id(model, rev, facts))
    return done


def _analyze_local(cfg: RunConfig, cat, t0: float, *, model: str, checkpoint, resume: bool, progress,
                   on_outcome) -> RunSummary:
    """A local dataset's run, started before its revision is known.

    The revision (a hash of every byte, `RevisionHash`, threads of this process) is made while the
    warehouse schema is checked, the workers start and the first groups compute; each group waits only
    for its own files' digests (hashed first, in the plan's order), which its worker verifies as it
    reads them, so every analysed byte is a byte the revision describes. Nothing is committed before
    the revision, hence the run id, is known; then the heads this run id already has are left out.

    Which groups start before that: those with no head done in any earlier run of this model with the
    same settings (`resumable_heads`; none in a new warehouse). Only such a run can share this run's id,
    so a resumed run computes no head it has, and a run of new data (new revision: nothing done) loses
    nothing: the heads held back are computed once the revision is known. A head the run id turns out
    to have (not possible by that rule, checked all the same) is dropped, never stored twice.
    """
    wh = cfg.warehouse
    pairs = head_pairs(cat, cfg)
    every = plan_groups(cat, cfg, pairs=pairs)
    facts = cat.model_info(model, cfg.dataset_name, "", checkpoint).run_facts()  # the revision is not in them
    with RevisionHash(cat.base, cat.paths, first=_group_files(every)) as hashing:
        existing = Path(wh).exists()
        maybe_done: set[tuple[int, int]] = set()
        if existing:  # its checks first: a damaged file stops the run before any worker starts
            db.ensure_schema(wh, cfg.lock_timeout_s)
            if resume:
                maybe_done = resumable_heads(wh, cfg.lock_timeout_s, cfg, model, facts)
        groups = plan_groups(cat, cfg, skip=maybe_done, pairs=pairs)
        workers = max(1, min(cfg.workers(), len(groups)))
        kernels = _prepare_kernels(cfg, groups)

        def settle() -> _Identity:
            revision = hashing.revision()
            digests = hashing.digests()
            for shard in cat.shards:
                shard.sha256 = digests.get(shard.path)
            info = cat.model_info(model, cfg.dataset_name, revision, checkpoint)
            run_id = cfg.run_id(model, revision, info.run_facts())
            with db.reader(wh, cfg.lock_timeout_s) as con:
                already = results.done_heads(con, model, run_id) if resume else set()
            return _Identity(info, run_id, already)

        def verified(task: GroupTask) -> None:
            # the worker checks what it reads against these digests (`warehouse.run.loading.open_verified`)
            for shard in (task.k_info, *(q for _, q in task.queries)):
                if shard is not None:
                    shard.sha256 = hashing.digest(shard.path)

        with start_pool(workers, kernels) as pool:
            if not existing:  # created while the workers import the analysis code
                db.ensure_schema(wh, cfg.lock_timeout_s)
            return _run(cfg, cat, pairs, groups, pool, workers, t0, model=model, settle=settle, settled=hashing.done,
                        verified=verified, resume=resume, n_heads=len(pairs), progress=progress,
                        on_outcome=on_outcome)


def _run(cfg, cat, pairs, groups, pool, workers, t0, *, model, settle: Callable[[], _Identity],
         settled: Callable[[], bool] = lambda: True, verified: Callable[[GroupTask], None] | None = None,
         resume, n_heads, progress, on_outcome, stream: ShardStream | None = None) -> RunSummary:
    """Compute `groups` and write their outcomes. `settle()` gives the run's identity (revision, run id,
    heads done), waiting for it if needed; `settled()` says whether it would return at once. Outcomes
    are held until it is known; then the run is recorded and they are committed (the heads the run
    already has left out), and the heads `groups` lacks that the run still needs are computed after
    them (`_analyze_local`). `verified(task)`: gives a task's shards their digests before it is submitted."""
    wh = cfg.warehouse
    profiled: set[int] = set()
    ident: list[_Identity] = []  # the run's identity, once settled
    planned = {(g.layer, q) for g in groups for q, _ in g.queries}

    def arrived(key, shards) -> None:
        """Wait for a streamed unit's downloads; a file that failed is an error on its heads, naming it."""
        failures = stream.wait(key)
        for shard in shards:
            if shard is not None and shard.path in failures:
                shard.error = ShardError(shard.path, "download_failed", f"download failed: {failures[shard.path]}")
                profiled.add(id(shard))

    def profile(shard: ShardInfo | None) -> None:
        if shard is not None and id(shard) not in profiled:
            cat.profile(shard)
            profiled.add(id(shard))
            if stream is not None:
                unsaved.append(shard)

    unsaved: list[ShardInfo] = []  # streamed: profiles not in the stored catalog yet, written with the next batch

    def prepare(task: GroupTask) -> None:
        # every group needs the analysis kernels (a no-op once cached); attention waits in iter_outcomes
        kernel_cache.wait_for_kernels(["analysis"])
        if verified is not None:
            verified(task)
        if not ident and len(buffer) >= MAX_HELD_HEADS:
            settle_run()  # enough held: wait for the run id, the loop commits them
        if stream is not None:
            arrived((task.layer, task.k_head), [task.k_info] + [shard for _, shard in task.queries])
        # a task carries its shards' profiles (row counts, window, errors) to the worker
        profile(task.k_info)
        for _, shard in task.queries:
            profile(shard)

    present: set[str] = set()
    run_opened: list[bool] = []

    def profile_all() -> None:
        # streamed: only those on disk so far; the complete catalog is recorded when the run ends
        for shard in cat.shards if stream is None else ():
            profile(shard)

    def started() -> None:
        # runs while the first groups compute: profile the other shards, record the run if its id is known
        profile_all()
        if settled():
            settle_run()

    settling: list[bool] = []

    def settle_run() -> None:
        """Once the run id is known: drop held outcomes of heads the run has (see `_analyze_local`),
        record catalog and run, plan the heads still missing."""
        nonlocal n_taken
        if settling:
            return
        settling.append(True)
        known = settle()
        ident.append(known)
        kept = [o for o in buffer if (o.layer, o.q_head) not in known.already]
        n_taken -= len(buffer) - len(kept)
        buffer[:] = kept
        profile_all()  # a no-op when done already
        open_run(known)
        failures = plan_failures(cat, pairs, skip=known.already)  # heads the plan knows cannot run
        later.extend(plan_groups(cat, cfg, skip=known.already | planned, pairs=pairs))
        if bar is not None:  # now the number of heads to come is known
            bar.total = len(planned - known.already) + len(failures) + sum(len(g.queries) for g in later)
            bar.refresh()
        take(failures)

    def open_run(known: _Identity) -> None:
        info, run_id, revision = known.info, known.run_id, known.info.revision
        # from here on a stop marks the run: a signal can arrive between the commit that records the run
        # (readers then see it 'running') and this function's return (marking a run not recorded yet
        # updates no row)
        run_opened.append(True)
        with db.writer(wh, cfg.lock_timeout_s) as con:
            results.replace_catalog(con, model, revision, cat.shards, info, cat.problems)
            if not resume:
                tables = results.existing_tables(con)
                for table in results.RESULT_TABLES:
                    if table in tables:
                        con.execute(f"DELETE FROM {table} WHERE model = $m AND run_id = $r", {"m": model, "r": run_id})
            results.start_run(con, run_id, model, cfg.dataset_name, revision, cfg.to_dict(), package_version(),
                              n_heads)
            present.update(results.existing_tables(con))

    bar = None
    if progress is None:
        progress = os.isatty(2)
    if progress and (groups or not settled()):
        from tqdm import tqdm

        bar = tqdm(total=len(planned), unit="head", desc=f"{model}", dynamic_ncols=True)
        if any(g.needs_attention_kernels for g in groups) and kernel_cache.compiling("attention"):
            # heads are counted once their attention is done, which waits for the compile
            bar.set_postfix_str("compiling the attention kernels, once per machine; analysis meanwhile")
    buffer: list[results.HeadOutcome] = []
    later: list[GroupTask] = []  # groups held back until the run id is known (`_analyze_local`)
    n_taken = n_failed = 0
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if buffer and ident:  # nothing is committed before the run id is known
            with db.writer(wh, cfg.lock_timeout_s) as wcon:
                results.write_outcomes(wcon, model, ident[0].run_id, buffer, present)
                if unsaved and run_opened:  # streamed: the profiles of the shards these heads read
                    results.replace_shard_profiles(wcon, model, ident[0].info.revision, unsaved)
                    unsaved.clear()
            buffer.clear()
        last_flush = time.monotonic()

    def group_ready(task: GroupTask) -> bool:
        """Whether a streamed group's shards are in."""
        return stream.ready((task.layer, task.k_head))

    def take(outcomes: list[results.HeadOutcome]) -> None:
        nonlocal n_failed, n_taken
        buffer.extend(outcomes)
        n_taken += len(outcomes)
        for o in outcomes:
            if on_outcome is not None:
                on_outcome(o)
        n_failed += sum(1 for o in outcomes if o.error)
        if bar is not None:
            bar.update(len(outcomes))
            if n_failed:
                bar.set_postfix(errors=n_failed)
            elif bar.postfix and not kernel_cache.compiling("attention"):
                bar.set_postfix_str("")

    # a streamed run keeps every group's files until its attention is done: deferring attention
    # (while the kernels compile) would hold the disk budget, so the first attention group waits instead
    deferral = {} if stream is not None else dict(
        defer_attention=lambda: kernel_cache.compiling("attention"),
        wait_attention=lambda: kernel_cache.wait_for_kernels(["attention"]))

    def compute(tasks: list[GroupTask], workers: int, pool, started: Callable[[], None] | None) -> None:
        for outcomes in iter_outcomes(tasks, workers, pool, prepare=prepare, started=started, **deferral,
                                      ready=None if stream is None else group_ready):
            if stream is not None:
                # nothing reads a group's shards once its outcomes are in, so they go now, not at the commit:
                # a run whose downloads wait for room commits in the usual batches instead of once a group
                # (opening the warehouse and committing alone is ~20 ms of CPU); a crash before the commit
                # loses those heads, and the next run downloads their shards again
                stream.release((outcomes[0].layer, outcomes[0].k_head))
            take(outcomes)
            if not ident and settled():
                settle_run()
            if len(buffer) >= FLUSH_EVERY_HEADS or time.monotonic() - last_flush > FLUSH_EVERY_SECONDS:
                flush()

    try:
        compute(groups, workers, pool, started)
        settle_run()  # waits for the revision if the groups were done first
        if later:
            _prepare_kernels(cfg, later)
            compute(later, workers if pool is not None else max(1, min(cfg.workers(), len(later))), pool, None)
        flush()
        if stream is not None:
            # the shards no group reads are downloaded only for their profile, and go at once
            for shard in cat.shards:
                if id(shard) not in profiled and shard.error is None and shard.n_rows is None:
                    arrived(("profile", shard.path), [shard])
                    profile(shard)
                    stream.release(("profile", shard.path))
        info, run_id = ident[0].info, ident[0].run_id
        with db.writer(wh, cfg.lock_timeout_s) as con:
            if stream is not None:  # every shard's profile is known now
                results.replace_catalog(con, model, info.revision, cat.shards, info, cat.problems)
            n_done, n_err, status = results.finish_run(con, run_id, model)
    except BaseException as exc:
        if not settling and isinstance(exc, Exception):
            # a failure (not an interrupt) before the run id was known: wait for it, so the run is
            # recorded as failed with the heads it computed, as a later failure leaves it
            try:
                settle_run()
            except Exception as cleanup:  # noqa: BLE001 -- the original exception is the one to raise
                print(f"warning: could not record the run of {model} in {wh}: {cleanup}", file=sys.stderr)
        if run_opened:
            _stop_run(wh, cfg.lock_timeout_s, ident[0].run_id, model, exc, flush if buffer else None)
        raise
    finally:
        if bar is not None:
            bar.close()
    return RunSummary(model, run_id, info.revision, n_heads, n_taken, n_heads - n_taken, n_done, n_err, status,
                      time.perf_counter() - t0, str(wh), None if stream is None else stream.stats())
