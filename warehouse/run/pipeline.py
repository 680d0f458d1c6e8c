"""The per-model run: catalog -> plan heads -> compute (worker processes) -> write (this process).

Compute steps read shards through their own in-memory DuckDB connections and
return plain results; only the calling process writes the warehouse, in short
transactions, so a crash leaves every committed head intact and a re-run with
the same config resumes where it stopped.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import os
import sys
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from plasticity.orientation import orientation_from_bucket_sums
from plasticity.types import AnalysisParams
from warehouse.store import db, results
from warehouse.run import kernel_cache
from warehouse.sources.card import DatasetCard, find_card, read_card
from warehouse.sources.catalog import (
    MIN_QUERY_ROWS, CatalogProblem, ShardError, ShardInfo, catalog_columns, profile_shard, scan_shards,
)
from warehouse.settings.config import RunConfig
from warehouse.store.families import Checkpoint, checkpoint_of
from warehouse.sources.layout import HeadLayout, expected_query_layers, resolve_layout
from warehouse.run.loading import load_rows
from warehouse.store.models import ModelInfo
from warehouse.sources.revision import content_revision
from warehouse.sources.names import safe_path_component
from warehouse.run.processes import ONE_THREAD_ENV, tie_to_parent

# Results are committed in batches: every FLUSH_EVERY_HEADS heads or FLUSH_EVERY_SECONDS, whichever
# comes first. Each commit opens the warehouse (~30 ms) and replaces the batch's rows in one
# transaction, so a crash loses at most one batch; fewer, larger batches leave the CPU to the workers.
FLUSH_EVERY_HEADS = 64
FLUSH_EVERY_SECONDS = 5.0


def package_version() -> str:
    try:
        return version("attention-plasticity-warehouse")
    except PackageNotFoundError:
        return "0+unknown"


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
    duckdb_threads: int = 1
    # 'all'; or, while the attention kernels are still being compiled, 'analysis' (the per-head analysis only) now
    # and 'attention' (the attention patterns only) later, whose outcomes `merge_phases` joins
    phase: str = "all"

    @property
    def attention_on(self) -> bool:
        return self.attention != "false"

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
    """The revision of a local dataset: a hash of every byte of every shard (`warehouse.sources.revision`)."""
    return content_revision(cat.base, cat.paths)


def _mark_outside_layout(shards: list[ShardInfo], layout: HeadLayout) -> None:
    """Shards whose layer or head the layout does not have: a `layout_mismatch` error (never re-paired)."""
    limit = {"q": layout.num_q_heads, "k": layout.num_k_heads}
    for s in shards:
        if s.error is None and (s.layer >= layout.num_layers or s.head >= limit[s.kind]):
            what = "query" if s.kind == "q" else "key"
            s.error = ShardError(s.path, "layout_mismatch",
                                 f"{what} head {s.head} of layer {s.layer} is outside the layout: {layout.describe()}")


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


def find_catalog(root: str | Path, cfg: RunConfig) -> Catalog:
    """Every shard of the dataset by name (not yet profiled), the dataset card and the head layout.

    Layout: config, else card, else a complete shard set (`warehouse.sources.layout.resolve_layout`); raises
    `LayoutError` (before any work) when it cannot be known. Cheap: a directory listing and the card.
    """
    scan = scan_shards(root, cfg.model_dir)
    card = read_card(find_card(root))
    layout = resolve_layout(
        [(s.layer, s.head, s.kind) for s in scan.shards],
        config=(cfg.num_layers, cfg.num_q_heads, cfg.num_k_heads),
        card=(card.num_layers, card.num_q_heads, card.num_k_heads), where=str(scan.base),
    )
    _mark_outside_layout(scan.shards, layout)
    expected = expected_query_layers(
        layout, (s.layer for s in scan.shards), head_sampling=card.head_sampling is not None,
        full_attention_only=card.attention_scope == "full_only", layers=cfg.layers,
    )
    return Catalog(Path(root), scan.base, scan.shards, layout, card,
                   scan.problems + _dataset_problems(card, scan.shards), scan.paths, expected)


def profile_catalog(cat: Catalog) -> Catalog:
    """Profile every shard in place (footer and scalar columns only, a few ms a shard)."""
    for s in cat.shards:
        cat.profile(s)
    return cat


def build_catalog(root: str | Path, cfg: RunConfig, threads: int = 1) -> Catalog:
    """Find and profile every shard (`find_catalog`, `profile_catalog`).

    `threads` is accepted for compatibility; profiling reads only footers and scalar columns.
    """
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
                duckdb_threads=cfg.duckdb_threads,
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


def compute_group(task: GroupTask) -> list[results.HeadOutcome]:
    """Analyse every query head of one GQA group. Never raises: failures become per-head errors.

    The key shard is read once for the group (its rows and the orientation sums in one
    pass); each query shard once for its head.
    """
    from plasticity.head import analyze_head

    out: list[results.HeadOutcome] = []
    k_rows = orientation = None
    k_err = None
    analysis = task.phase != "attention"
    tokens = task.computes_attention
    if task.k_info is None:
        k_err = _missing_key_error(task.layer, task.k_head)
    else:
        try:
            if analysis:
                k_rows, (_, sums, counts) = load_rows(None, task.k_info, task.cap, task.params.seed,
                                                      with_tokens=tokens, key_sums=True)
                orientation = orientation_from_bucket_sums(sums, counts)
            else:
                k_rows = load_rows(None, task.k_info, task.cap, task.params.seed, with_tokens=tokens)
        except ShardError as e:
            k_err = _error(e.path, e.problem, str(e))
        except Exception as e:  # a bug or degenerate data: only this group's heads fail
            k_err = _error(task.k_info.path, "analysis_failed", f"{task.k_info.path}: {type(e).__name__}: {e}")
    for q_head, q_info in task.queries:
        outcome = results.HeadOutcome(task.layer, q_head, task.k_head)
        if k_err is not None:
            outcome.error = k_err
            out.append(outcome)
            continue
        try:
            if q_info.error is not None:
                raise q_info.error
            if q_info.sliding_window != task.k_info.sliding_window:
                raise ShardError(q_info.path, "window_mismatch",
                                 f"query sliding_window {q_info.sliding_window} differs from key shard "
                                 f"{task.k_info.path}'s {task.k_info.sliding_window} (None = full causal)")
            q_rows = load_rows(None, q_info, task.cap, task.params.seed, with_tokens=tokens)
            if q_rows.n < MIN_QUERY_ROWS:  # a cap below the minimum: the shard itself passed the profile
                raise ShardError(q_info.path, "too_few_rows",
                                 f"max_tokens_per_head = {task.cap} keeps {q_rows.n} query row(s); the position "
                                 f"regression needs at least {MIN_QUERY_ROWS} (through 2 points it fits exactly)")
            if q_rows.d != k_rows.d:
                raise ShardError(
                    q_info.path, "width_mismatch",
                    f"query vectors have width {q_rows.d} but key shard {task.k_info.path} has width {k_rows.d}",
                )
            if analysis:
                outcome.result = analyze_head(q_rows, k_rows, orientation, layer=task.layer, q_head=q_head,
                                              params=task.params)
            if tokens:
                outcome.extra_tables = attention_tables(q_rows, k_rows, task)
        except ShardError as e:
            outcome.error = _error(e.path, e.problem, str(e))
        except Exception as e:  # a bug or degenerate data: still only this head fails
            outcome.error = _error(q_info.path, "analysis_failed", f"{q_info.path}: {type(e).__name__}: {e}")
        q_rows = None  # free this head's rows before the next one is read
        out.append(outcome)
    return out


def merge_phases(analysis: list[results.HeadOutcome], attention: list[results.HeadOutcome]) -> list[results.HeadOutcome]:
    """The outcomes one 'all' task gives, from its 'analysis' and 'attention' tasks' (same heads,
    same order): a head whose analysis failed keeps that error (an 'all' task stops there); else it
    takes the attention tables, and the attention's error if it had one (an 'all' task's head
    then has its result and that error, and is stored as the error)."""
    if [o.q_head for o in analysis] != [o.q_head for o in attention]:
        raise AssertionError("the two phases of a group have different heads")
    for first, second in zip(analysis, attention):
        if first.error is None:
            first.extra_tables = second.extra_tables
            first.error = second.error
    return analysis


def attention_tables(q_rows, k_rows, task: GroupTask) -> dict:
    """Attention-pattern tables of one head (plasticity.attention).

    ``attention: auto`` computes the exact query rows of a head that has at least
    ``attention_min_exact_rows`` of them and stores those rows only (otherwise nothing is computed
    and the summary says why); ``true`` computes and stores every query row, flagging the
    non-exact ones (``exact`` false). Summaries use exact rows only in both modes."""
    from plasticity.attention import head_attention_metrics

    auto = task.attention == "auto"
    tokens, summary, sweep = head_attention_metrics(
        q_rows, k_rows, scales=tuple(task.attention_scales), rows="exact" if auto else "all",
        min_exact_rows=task.attention_min_exact_rows)
    if auto:  # exact rows only (none for a skipped head)
        tokens = {name: col[tokens["exact"]] for name, col in tokens.items()}
    return {
        "token_attention": tokens,
        "head_attention_summary": {k: [v] for k, v in summary.items()},
        "query_scale_sweep": sweep,
    }


def _init_worker(parent_pid: int | None = None) -> None:
    # A worker never outlives the coordinating process: if that is killed (even with SIGKILL), the
    # kernel kills the worker (Linux), or the worker's parent watch ends it within half a second.
    if parent_pid is not None:
        tie_to_parent(parent_pid)
    # Processes, not BLAS threads, carry the parallelism; one thread each also
    # keeps floating-point reductions identical whatever the worker count. The
    # variables must be in the environment the worker starts with (numpy loads
    # BLAS while the pool unpickles this function), so `start_pool` sets them in
    # the parent; setting them here again only covers pools made elsewhere.
    for var in ONE_THREAD_ENV:
        os.environ[var] = "1"
    _keep_freed_memory()


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_memory() -> None:
    """Let a worker's malloc keep freed memory for the next head instead of handing it back.

    Every head allocates and frees the same large arrays; by default glibc returns them to the
    kernel (munmap, heap trim) and the next head faults the pages in again, zero-filled. That
    was 6-12% of the workers' CPU time (system time) on the benchmark shapes. Arrays up to 32 MiB
    (glibc's ceiling) now come from the heap, which is never trimmed below its peak, so a
    worker's resident size stays at the peak of one head. No-op outside glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_TOP_PAD, 64 << 20)


def _warm_up(kernels: bool = False) -> int:
    """Import everything a compute step needs, so the first group does not pay for it; with
    ``kernels`` (the run computes attention) also numba, and the compiled kernels once they are
    cached (while the background warm-up still compiles them, loading would compile them again)."""
    import plasticity.head  # noqa: F401
    import warehouse.run.loading  # noqa: F401

    if kernels:
        if kernel_cache.kernels_cached("attention"):
            import plasticity.attention.kernel  # noqa: F401
        else:
            import numba  # noqa: F401
    return os.getpid()


@contextmanager
def _parent_main_hidden() -> Iterator[None]:
    """Start spawned processes without re-running this process's ``__main__`` in them.

    multiprocessing's spawn imports the parent's main module in every child, so that functions
    defined there can be unpickled. The pool runs only functions of this package, and when the
    parent is Dagster (a run launched from the UI, `dagster asset materialize`) or pytest, that
    module is their command line: about a second of imports per worker, for nothing. Without a
    ``__file__`` and a ``__spec__`` the main module is not re-imported (as for ``python -c``)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextmanager
def start_pool(workers: int, kernels: bool = False) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` spawned processes, already importing the analysis code (with
    ``kernels``, also numba: see `_warm_up`) while the caller does other work (None when
    workers <= 1: compute runs in this process). The workers do not import the caller's
    ``__main__`` (see `_parent_main_hidden`): submit functions of this package."""
    if workers <= 1:
        yield None
        return
    saved = {v: os.environ.get(v) for v in ONE_THREAD_ENV}
    for var in ONE_THREAD_ENV:
        os.environ[var] = "1"
    try:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            with _parent_main_hidden():  # each submit starts one worker while none is idle
                for _ in range(workers):
                    pool.submit(_warm_up, kernels)
            try:
                yield pool
            except BaseException:
                _stop_workers(pool)  # interrupted or failed: do not wait for groups nobody will collect
                raise
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _stop_workers(pool: ProcessPoolExecutor, timeout_s: float = 5.0) -> None:
    """Cancel what is queued and end the running workers (SIGTERM, then SIGKILL after `timeout_s`).

    ``shutdown`` alone would wait for every group in flight. The executor keeps its processes in
    ``_processes`` (CPython 3.8-3.13); without it the pool just shuts down normally."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def iter_outcomes(tasks: list[GroupTask], workers: int, pool: ProcessPoolExecutor | None = None, *,
                  prepare: Callable[[GroupTask], None] | None = None,
                  started: Callable[[], None] | None = None,
                  defer_attention: Callable[[], bool] | None = None,
                  wait_attention: Callable[[], None] | None = None) -> Iterator[list[results.HeadOutcome]]:
    """Results of each group as it completes; at most 2 x workers groups in flight (bounded memory).

    Uses `pool` when given (see `start_pool`), else its own; with workers <= 1 runs in this process.
    `prepare(task)` runs just before a task is submitted; `started()` once the first tasks are in
    flight (before anything is yielded), so this process's own work overlaps the workers'.

    While ``defer_attention()`` is true (the attention kernels are still being compiled), a group
    with attention runs as two tasks: its per-head analysis at once, its attention once
    ``defer_attention()`` is false (``wait_attention()`` blocks until then), and its outcomes are
    yielded joined (`merge_phases`), the same as one task would give. So a fresh machine's first
    run computes while numba compiles instead of waiting for it.
    """
    def noop(*_):
        return None

    prepare = prepare or noop
    started = started or noop
    waited = False  # once waited for, attention is never deferred again (even if the wait timed out)

    def defer() -> bool:
        return defer_attention is not None and not waited and defer_attention()

    def wait_kernels() -> None:
        nonlocal waited
        if wait_attention is not None:
            wait_attention()
        waited = True

    deferred: list[GroupTask] = []  # groups whose attention waits for the kernels
    held: dict[tuple[int, int], list[results.HeadOutcome]] = {}  # their analysis outcomes

    def next_task() -> GroupTask | None:
        if deferred and not defer():
            return dataclasses.replace(deferred.pop(0), phase="attention")
        if not queue:
            return None
        task = queue.pop()
        prepare(task)
        if task.attention_on and defer():
            deferred.append(task)
            return dataclasses.replace(task, phase="analysis")
        return task

    def finished(task: GroupTask, outcomes: list[results.HeadOutcome]) -> list[results.HeadOutcome] | None:
        """What to yield for a task's outcomes (None: held until the group's attention is done)."""
        key = (task.layer, task.k_head)
        if task.phase == "analysis":
            held[key] = outcomes
            return None
        return merge_phases(held.pop(key), outcomes) if task.phase == "attention" else outcomes

    queue = list(reversed(tasks))
    if pool is None and (workers <= 1 or len(tasks) <= 1):
        started()
        while queue or deferred:
            task = next_task()
            if task is None:  # only deferred attention left
                wait_kernels()
                continue
            outcomes = finished(task, compute_group(task))
            if outcomes is not None:
                yield outcomes
        return
    if pool is None:
        with start_pool(workers) as own:
            yield from iter_outcomes(tasks, workers, own, prepare=prepare, started=started,
                                     defer_attention=defer_attention, wait_attention=wait_attention)
        return
    pending: dict = {}

    def fill() -> None:
        # while groups wait for the kernels to compile (one process), leave the compile a core: the
        # analysis meanwhile has slack (a run without attention never waits, so never holds back)
        while len(pending) < (max(1, workers - 1) if deferred and defer() else 2 * workers):
            task = next_task()
            if task is None:
                return
            pending[pool.submit(compute_group, task)] = task

    fill()
    try:
        started()
    except BaseException:
        for fut in pending:  # those not yet running; running ones finish as the pool shuts down
            fut.cancel()
        raise
    while pending or deferred:
        if not pending:  # only deferred attention left
            wait_kernels()
            fill()
            continue
        # while attention waits, look again at least every 0.2 s: it starts as soon as the kernels are in
        done, _ = wait(set(pending), timeout=0.2 if deferred else None, return_when=FIRST_COMPLETED)
        for fut in done:
            outcomes = finished(pending.pop(fut), fut.result())
            if outcomes is not None:
                yield outcomes
        fill()


def _stop_run(wh: str, timeout_s: float, run_id: str, model: str, exc: BaseException,
              flush: Callable[[], None] | None) -> None:
    """A run that stops early keeps the heads it computed and is marked 'interrupted' (Ctrl-C, SIGTERM,
    a cancelled Dagster run) or 'failed' (an error), with the reason, instead of staying 'running'.
    Best effort: a problem here is reported, never raised over the original one."""
    interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)) or not isinstance(exc, Exception)
    status = "interrupted" if interrupted else "failed"
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        if flush is not None:
            flush()
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


def analyze_dataset(
    cfg: RunConfig,
    root: str | Path,
    *,
    model: str | None = None,
    revision: str | None = None,
    resume: bool = True,
    progress: bool | None = None,
    on_outcome: Callable[[results.HeadOutcome], None] | None = None,
) -> RunSummary:
    """Analyse every head of one model's dataset folder into the warehouse.

    The head layout is resolved first (config, else dataset card, else a complete shard set; a
    `LayoutError` stops the run before any work), then the revision (the Hub commit sha, else a hash
    of every byte of every shard) and the run id from both, so the same data and settings give the
    same run id whichever command or asset launches the run. The model name is the caller's, else the
    config's, else the folder's (never the card's: card text is untrusted).

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
    """
    t0 = time.perf_counter()
    # Everything up to the plan needs only the shard names, so the workers start (and import the
    # analysis code) only when there is work, and as early as possible.
    cat = find_catalog(root, cfg)
    model = safe_path_component(str(model or cfg.model or Path(root).name), "model name")  # names the results folder
    cfg.check_layers_exist({s.layer for s in cat.shards})
    revision = revision or local_revision(cat)
    info = cat.model_info(model, cfg.dataset_name, revision, checkpoint_of(cfg))
    cfg = resolved_config(cfg, cat.layout)
    run_id = cfg.run_id(model, revision, info.run_facts())
    wh = cfg.warehouse
    db.ensure_schema(wh, cfg.lock_timeout_s)
    with db.reader(wh, cfg.lock_timeout_s) as con:
        already = results.done_heads(con, model, run_id) if resume else set()
    pairs = head_pairs(cat, cfg)
    n_heads = len(pairs)
    groups = plan_groups(cat, cfg, skip=already, pairs=pairs)  # tasks share the ShardInfo objects _run profiles
    failed = plan_failures(cat, pairs, skip=already)
    n_todo = sum(len(g.queries) for g in groups) + len(failed)
    workers = max(1, min(cfg.workers(), len(groups)))
    kernels = any(g.attention_on for g in groups)  # the attention kernels are compiled only for attention
    if groups:
        kernel_cache.start_kernel_warmup(["analysis", "attention"] if kernels else ["analysis"])
    with start_pool(workers, kernels) as pool:
        return _run(cfg, cat, groups, pool, workers, t0, model=model, info=info, run_id=run_id, failed=failed,
                    resume=resume, n_heads=n_heads, n_todo=n_todo, progress=progress, on_outcome=on_outcome)


def resolved_config(cfg: RunConfig, layout: HeadLayout) -> RunConfig:
    """`cfg` with the resolved head layout filled in: what the run id and the `runs` table record.
    The layout's source (config, card, shards) is left out: the same layout gives the same numbers."""
    return dataclasses.replace(cfg, num_layers=layout.num_layers, num_q_heads=layout.num_q_heads,
                               num_k_heads=layout.num_k_heads)


def _run(cfg, cat, groups, pool, workers, t0, *, model, info, run_id, failed, resume, n_heads, n_todo, progress,
         on_outcome) -> RunSummary:
    wh = cfg.warehouse
    revision = info.revision
    profiled: set[int] = set()

    def profile(shard: ShardInfo | None) -> None:
        if shard is not None and id(shard) not in profiled:
            cat.profile(shard)
            profiled.add(id(shard))

    def prepare(task: GroupTask) -> None:
        # every group needs the analysis kernels (a no-op once cached); attention waits in iter_outcomes
        kernel_cache.wait_for_kernels(["analysis"])
        # a task carries its shards' profiles (row counts, window, errors) to the worker
        profile(task.k_info)
        for _, shard in task.queries:
            profile(shard)

    present: set[str] = set()
    run_opened: list[bool] = []

    def open_run() -> None:
        # runs while the first groups compute: profile the other shards, record catalog and run
        for shard in cat.shards:
            profile(shard)
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
        run_opened.append(True)

    bar = None
    if progress is None:
        progress = os.isatty(2)
    if progress and n_todo:
        from tqdm import tqdm

        bar = tqdm(total=n_todo, unit="head", desc=f"{model}", dynamic_ncols=True)
        if any(g.attention_on for g in groups) and kernel_cache.compiling("attention"):
            # heads are counted once their attention is done, which waits for the compile
            bar.set_postfix_str("compiling the attention kernels, once per machine; analysis meanwhile")
    buffer: list[results.HeadOutcome] = []
    n_failed = 0
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if buffer:
            with db.writer(wh, cfg.lock_timeout_s) as wcon:
                results.write_outcomes(wcon, model, run_id, buffer, present)
            buffer.clear()
        last_flush = time.monotonic()

    def take(outcomes: list[results.HeadOutcome]) -> None:
        nonlocal n_failed
        buffer.extend(outcomes)
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

    try:
        take(failed)  # heads the plan knows cannot run: written with the first batch, after open_run
        for outcomes in iter_outcomes(groups, workers, pool, prepare=prepare, started=open_run,
                                      defer_attention=lambda: kernel_cache.compiling("attention"),
                                      wait_attention=lambda: kernel_cache.wait_for_kernels(["attention"])):
            take(outcomes)
            if len(buffer) >= FLUSH_EVERY_HEADS or time.monotonic() - last_flush > FLUSH_EVERY_SECONDS:
                flush()
        flush()
        with db.writer(wh, cfg.lock_timeout_s) as con:
            n_done, n_err, status = results.finish_run(con, run_id, model)
    except BaseException as exc:
        if run_opened:
            _stop_run(wh, cfg.lock_timeout_s, run_id, model, exc, flush if buffer else None)
        raise
    finally:
        if bar is not None:
            bar.close()
    return RunSummary(model, run_id, revision, n_heads, n_todo, n_heads - n_todo, n_done, n_err, status,
                      time.perf_counter() - t0, str(wh))
