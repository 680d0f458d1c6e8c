"""What a worker computes for one group of heads (`compute_group`): load the key shard once, orient,
load each query shard, analyse each head and, when asked, its attention patterns; plain results, no
warehouse access. Also how a run split in two phases joins them again (`merge_phases`).
"""

from __future__ import annotations

from plasticity.orientation import orientation_from_bucket_sums
from warehouse.store import results
from warehouse.sources.catalog import MIN_QUERY_ROWS, ShardError
from warehouse.run import kernel_cache
from warehouse.run.loading import load_rows
from warehouse.run.planning import GroupTask, _error, _missing_key_error


def compute_group(task: GroupTask) -> list[results.HeadOutcome]:
    """Analyse every query head of one GQA group. Never raises: failures become per-head errors.

    The key shard is read once for the group (its rows and the orientation sums in one
    pass); each query shard once for its head.
    """
    from plasticity.head import DegenerateHead, analyze_head

    out: list[results.HeadOutcome] = []
    k_rows = orientation = None
    k_err = None
    analysis = task.phase != "attention"
    tokens = task.computes_attention
    # token text serves only computed attention (same-token attraction); skipped heads need none
    with_text = tokens and task.needs_attention_kernels
    if task.k_info is None:
        k_err = _missing_key_error(task.layer, task.k_head)
    else:
        try:
            if analysis:
                k_rows, (_, sums, counts) = load_rows(None, task.k_info, task.cap, task.params.seed,
                                                      with_tokens=with_text, key_sums=True)
                orientation = orientation_from_bucket_sums(sums, counts)
            else:
                k_rows = load_rows(None, task.k_info, task.cap, task.params.seed, with_tokens=with_text)
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
            q_rows = load_rows(None, q_info, task.cap, task.params.seed, with_tokens=with_text)
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
        except DegenerateHead as e:  # rows that leave every metric undefined: said, never scored
            file = q_info.path if e.side == "q" else task.k_info.path
            outcome.error = _error(file, "degenerate_head", f"{file}: {e}")
        except Exception as e:  # a bug or degenerate data: still only this head fails
            if kernel_cache.raised_by_numba_cache(e):  # the machine's cache, not this head: stop the run
                raise kernel_cache.cache_failure(e) from None
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
    ``attention_min_exact_rows`` of them and stores those rows only; a head with fewer gets a
    summary saying why and no per-token row at all (its few exact rows were never computed, so
    storing them would present NaN as exact); ``true`` computes and stores every query row, flagging the
    non-exact ones (``exact`` false). Summaries use exact rows only in both modes."""
    from plasticity.attention import STATUS_SKIPPED, head_attention_metrics

    auto = task.attention == "auto"
    tokens, summary, sweep = head_attention_metrics(
        q_rows, k_rows, scales=tuple(task.attention_scales), rows="exact" if auto else "all",
        min_exact_rows=task.attention_min_exact_rows)
    if auto:  # the computed rows: exact ones, none for a skipped head
        stored = tokens["exact"] & (summary["status"] != STATUS_SKIPPED)
        tokens = {name: col[stored] for name, col in tokens.items()}
    return {
        "token_attention": tokens,
        "head_attention_summary": {k: [v] for k, v in summary.items()},
        "query_scale_sweep": sweep,
    }
