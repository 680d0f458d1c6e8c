"""The per-model run: catalog -> plan heads -> compute (worker processes) -> write (this process).

Compute steps read shards through their own in-memory DuckDB connections and
return plain results; only the calling process writes the warehouse, in short
transactions, so a crash leaves every committed head intact and a re-run with
the same config resumes where it stopped.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing as mp
import os
import sys
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from plasticity.orientation import orientation_from_bucket_sums
from plasticity.types import AnalysisParams
from warehouse import db, results
from warehouse.catalog import (
    ShardError, ShardInfo, catalog_columns, find_shards, infer_layout, profile_shard, read_dataset_card,
)
from warehouse.config import RunConfig
from warehouse.loading import load_rows

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

    @property
    def attention_on(self) -> bool:
        return self.attention != "false"


@dataclass
class Catalog:
    root: Path
    shards: list[ShardInfo]
    num_layers: int
    num_q_heads: int
    num_k_heads: int
    card: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_k_heads


def local_revision(shards: Iterable[ShardInfo]) -> str:
    """Fingerprint of a local dataset: relative path, size and Parquet footer of every shard."""
    h = hashlib.sha1()
    for s in sorted(shards, key=lambda s: s.path):
        p = Path(s.path)
        h.update(f"{p.parent.name}/{p.name}".encode())
        try:
            size = p.stat().st_size
            h.update(str(size).encode())
            with open(p, "rb") as fh:
                fh.seek(max(0, size - 65536))
                h.update(fh.read())
        except OSError:
            h.update(b"missing")
    return "local-" + h.hexdigest()[:12]


def find_catalog(root: str | Path, cfg: RunConfig) -> Catalog:
    """Every shard of the dataset by name (not yet profiled), the layout and the dataset card.

    Layout from the config, else from the shard names. Cheap: a directory listing.
    """
    shards = find_shards(root, cfg.model_dir)
    if cfg.num_q_heads is not None:
        num_q, num_k = cfg.num_q_heads, cfg.num_k_heads
        num_layers = cfg.num_layers if cfg.num_layers is not None else infer_layout(shards)[0]
    else:
        inferred = infer_layout(shards)
        num_layers = cfg.num_layers if cfg.num_layers is not None else inferred[0]
        num_q, num_k = inferred[1], inferred[2]
    base = Path(root) / cfg.model_dir if cfg.model_dir else Path(root)
    return Catalog(Path(root), shards, num_layers, num_q, num_k, read_dataset_card(base) or read_dataset_card(root))


def profile_catalog(cat: Catalog) -> Catalog:
    """Profile every shard in place (footer and scalar columns only, a few ms a shard)."""
    for s in cat.shards:
        profile_shard(s)
    return cat


def build_catalog(root: str | Path, cfg: RunConfig, threads: int = 1) -> Catalog:
    """Find and profile every shard; layout from the config, else from the shard names.

    `threads` is accepted for compatibility; profiling reads only footers and scalar columns.
    """
    return profile_catalog(find_catalog(root, cfg))


def head_pairs(cat: Catalog, cfg: RunConfig) -> list[tuple[int, int, int, str, str | None]]:
    """(layer, q_head, k_head, q_path, k_path) of every planned query shard.

    The GQA join and the layer/head filters are sql/head_samples.sql, the same
    query the Dagster `head_samples` asset runs against the warehouse catalog.
    """
    import sql

    # numpy columns (object arrays for text and nullable values): DuckDB scans a dict of them
    # without importing pandas, which an Arrow table would cost (~0.5 s, before the workers start)
    table = {k: np.array(v, dtype=object) for k, v in catalog_columns(cat.shards, "_", None).items()}
    table["layer"] = table["layer"].astype(np.int64)
    table["head"] = table["head"].astype(np.int64)
    params = {"model": "_", "group_size": cat.group_size, "num_layers": cat.num_layers,
              "num_q_heads": cat.num_q_heads, "layers": cfg.layers, "cap": cfg.max_tokens_per_head}
    con = db.memory_connection()
    try:
        con.register("shards", table)
        cur = con.execute(sql.load("head_samples"), params)
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()
    return [(int(r["layer"]), int(r["q_head"]), int(r["k_head"]), r["q_path"], r["k_path"]) for r in out]


def plan_groups(cat: Catalog, cfg: RunConfig, skip: set[tuple[int, int]] = frozenset(),
                pairs: list[tuple[int, int, int, str, str | None]] | None = None) -> list[GroupTask]:
    """GQA groups of query heads to compute, skipping heads already done (``pairs``: `head_pairs`,
    computed here when not given)."""
    by_path = {s.path: s for s in cat.shards}
    groups: dict[tuple[int, int], GroupTask] = {}
    for layer, q_head, k_head, q_path, k_path in (head_pairs(cat, cfg) if pairs is None else pairs):
        if (layer, q_head) in skip:
            continue
        task = groups.get((layer, k_head))
        if task is None:
            task = groups[(layer, k_head)] = GroupTask(
                layer=layer, k_head=k_head, k_info=by_path.get(k_path), queries=[],
                params=cfg.params, cap=cfg.max_tokens_per_head, attention=cfg.attention,
                attention_scales=tuple(cfg.attention_scales), attention_min_exact_rows=cfg.attention_min_exact_rows,
                duckdb_threads=cfg.duckdb_threads,
            )
        task.queries.append((q_head, by_path[q_path]))
    return [groups[k] for k in sorted(groups)]


def _error(file: str | None, problem: str, message: str) -> dict:
    return {"file": file, "problem": problem, "message": message}


def compute_group(task: GroupTask) -> list[results.HeadOutcome]:
    """Analyse every query head of one GQA group. Never raises: failures become per-head errors.

    The key shard is read once for the group (its rows and the SPEC 2.2 orientation sums in one
    pass); each query shard once for its head.
    """
    from plasticity.head import analyze_head

    out: list[results.HeadOutcome] = []
    k_rows = orientation = None
    k_err = None
    if task.k_info is None:
        k_err = _error(None, "missing_key_shard", f"key shard l{task.layer:02d}h{task.k_head:02d}k/data.parquet is missing")
    else:
        try:
            k_rows, (_, sums, counts) = load_rows(None, task.k_info, task.cap, task.params.seed,
                                                  with_tokens=task.attention_on, key_sums=True)
            orientation = orientation_from_bucket_sums(sums, counts)
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
            q_rows = load_rows(None, q_info, task.cap, task.params.seed, with_tokens=task.attention_on)
            if q_rows.d != k_rows.d:
                raise ShardError(
                    q_info.path, "width_mismatch",
                    f"query vectors have width {q_rows.d} but key shard {task.k_info.path} has width {k_rows.d}",
                )
            outcome.result = analyze_head(q_rows, k_rows, orientation, layer=task.layer, q_head=q_head, params=task.params)
            if task.attention_on:
                outcome.extra_tables = attention_tables(q_rows, k_rows, task)
        except ShardError as e:
            outcome.error = _error(e.path, e.problem, str(e))
        except Exception as e:  # a bug or degenerate data: still only this head fails
            outcome.error = _error(q_info.path, "analysis_failed", f"{q_info.path}: {type(e).__name__}: {e}")
        q_rows = None  # free this head's rows before the next one is read
        out.append(outcome)
    return out


def attention_tables(q_rows, k_rows, task: GroupTask) -> dict:
    """SPEC 4 attention-pattern tables of one head (plasticity.attention).

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


_ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker() -> None:
    # Processes, not BLAS threads, carry the parallelism; one thread each also
    # keeps floating-point reductions identical whatever the worker count. The
    # variables must be in the environment the worker starts with (numpy loads
    # BLAS while the pool unpickles this function), so `start_pool` sets them in
    # the parent; setting them here again only covers pools made elsewhere.
    for var in _ONE_THREAD_ENV:
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


def _warm_up() -> int:
    """Import everything a compute step needs, so the first group does not pay for it."""
    import plasticity.head  # noqa: F401
    import warehouse.loading  # noqa: F401

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
def start_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` spawned processes, already importing the analysis code while the caller
    does other work (None when workers <= 1: compute runs in this process). The workers do not
    import the caller's ``__main__`` (see `_parent_main_hidden`): submit functions of this package."""
    if workers <= 1:
        yield None
        return
    saved = {v: os.environ.get(v) for v in _ONE_THREAD_ENV}
    for var in _ONE_THREAD_ENV:
        os.environ[var] = "1"
    try:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            with _parent_main_hidden():  # each submit starts one worker while none is idle
                for _ in range(workers):
                    pool.submit(_warm_up)
            yield pool
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def iter_outcomes(tasks: list[GroupTask], workers: int, pool: ProcessPoolExecutor | None = None, *,
                  prepare: Callable[[GroupTask], None] | None = None,
                  started: Callable[[], None] | None = None) -> Iterator[list[results.HeadOutcome]]:
    """Results of each group as it completes; at most 2 x workers groups in flight (bounded memory).

    Uses `pool` when given (see `start_pool`), else its own; with workers <= 1 runs in this process.
    `prepare(task)` runs just before a task is submitted; `started()` once the first tasks are in
    flight (before anything is yielded), so this process's own work overlaps the workers'.
    """
    def noop(*_):
        return None

    prepare = prepare or noop
    started = started or noop
    if pool is None and (workers <= 1 or len(tasks) <= 1):
        started()
        for t in tasks:
            prepare(t)
            yield compute_group(t)
        return
    if pool is None:
        with start_pool(workers) as own:
            yield from iter_outcomes(tasks, workers, own, prepare=prepare, started=started)
        return
    pending = set()
    queue = list(reversed(tasks))

    def fill() -> None:
        while queue and len(pending) < 2 * workers:
            task = queue.pop()
            prepare(task)
            pending.add(pool.submit(compute_group, task))

    fill()
    try:
        started()
    except BaseException:
        for fut in pending:  # those not yet running; running ones finish as the pool shuts down
            fut.cancel()
        raise
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()
        fill()


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

    The run is planned from the shard names; when heads remain to compute, worker processes
    (`cfg.workers()`, spawned) start and import the analysis code. Each group's shards are
    profiled just before it is submitted; once the first groups are in flight this process
    profiles the other shards and records the catalog and the run. Workers compute GQA groups
    (`compute_group`) and never open the warehouse; this process alone writes the results, in
    one transaction every FLUSH_EVERY_HEADS heads or FLUSH_EVERY_SECONDS, so a killed run keeps
    every committed head and the next run with the same config (same run_id) skips them.
    """
    t0 = time.perf_counter()
    # Everything up to the plan needs only the shard names, so the workers start (and import the
    # analysis code) only when there is work, and as early as possible.
    cat = find_catalog(root, cfg)
    model = model or cfg.model or cat.card.get("model_name") or cat.card.get("model") or Path(root).name
    model = str(model)
    revision = revision or local_revision(cat.shards)
    run_id = cfg.run_id(model, revision)
    wh = cfg.warehouse
    db.ensure_schema(wh, cfg.lock_timeout_s)
    with db.reader(wh, cfg.lock_timeout_s) as con:
        already = results.done_heads(con, model, run_id) if resume else set()
    pairs = head_pairs(cat, cfg)
    n_heads = len(pairs)
    groups = plan_groups(cat, cfg, skip=already, pairs=pairs)  # tasks share the ShardInfo objects _run profiles
    n_todo = sum(len(g.queries) for g in groups)
    workers = max(1, min(cfg.workers(), len(groups)))
    with start_pool(workers) as pool:
        return _run(cfg, cat, groups, pool, workers, t0, model=model, revision=revision, run_id=run_id,
                    resume=resume, n_heads=n_heads, n_todo=n_todo, progress=progress, on_outcome=on_outcome)


def _run(cfg, cat, groups, pool, workers, t0, *, model, revision, run_id, resume, n_heads, n_todo, progress,
         on_outcome) -> RunSummary:
    wh = cfg.warehouse
    profiled: set[int] = set()

    def profile(info: ShardInfo | None) -> None:
        if info is not None and id(info) not in profiled:
            profile_shard(info)
            profiled.add(id(info))

    def prepare(task: GroupTask) -> None:
        # a task carries its shards' profiles (row counts, window, errors) to the worker
        profile(task.k_info)
        for _, info in task.queries:
            profile(info)

    present: set[str] = set()

    def open_run() -> None:
        # runs while the first groups compute: profile the other shards, record catalog and run
        for info in cat.shards:
            profile(info)
        with db.writer(wh, cfg.lock_timeout_s) as con:
            results.replace_catalog(con, model, revision, cat.shards)
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
    if progress and n_todo:
        from tqdm import tqdm

        bar = tqdm(total=n_todo, unit="head", desc=f"{model}", dynamic_ncols=True)
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

    try:
        for outcomes in iter_outcomes(groups, workers, pool, prepare=prepare, started=open_run):
            buffer.extend(outcomes)
            for o in outcomes:
                if on_outcome is not None:
                    on_outcome(o)
            n_failed += sum(1 for o in outcomes if o.error)
            if bar is not None:
                bar.update(len(outcomes))
                if n_failed:
                    bar.set_postfix(errors=n_failed)
            if len(buffer) >= FLUSH_EVERY_HEADS or time.monotonic() - last_flush > FLUSH_EVERY_SECONDS:
                flush()
        flush()
    finally:
        if bar is not None:
            bar.close()
    with db.writer(wh, cfg.lock_timeout_s) as con:
        n_done, n_err, status = results.finish_run(con, run_id, model)
    return RunSummary(model, run_id, revision, n_heads, n_todo, n_heads - n_todo, n_done, n_err, status,
                      time.perf_counter() - t0, str(wh))
