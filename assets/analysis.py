"""Per-head analysis of one model: head metrics, bucket plasticity, component weights (and errors).

One step per model. Inside it, `warehouse.run.pipeline.analyze_dataset` fans the
GQA groups of heads out to a process pool (`max_workers`); the workers read
shards through their own in-memory DuckDB connections and only compute; this
step's process is the only writer, flushing finished heads in short
transactions, so a crash keeps every committed head and a re-run resumes.
A model with a family reports `family_checkpoints` for it (assets/families.py).
"""

import time
from typing import Optional

import dagster as dg
from pydantic import Field

from assets.families import report_checkpoint
from dagster_project import quality, steps
from dagster_project.metadata import check_result, md_preview
from dagster_project.partitions import TAG_REPO, models_partitions
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from warehouse.store import db
from warehouse.settings.config import describe
from warehouse.store.families import checkpoint_of

RESULT_ASSETS = {
    "head_metrics": "Per-head metrics (head_metrics.csv; docs/method.md#tables): positional R2, MAE ratios, normality, "
                    "ap_overall and its standard error.",
    "head_bucket_plasticity": "Plasticity of every (q_bucket, k_bucket) cell of every head, with its pair count.",
    "head_bucket_summary": "AP_j of every (head, q_bucket) with its example-jackknife standard error and 95% interval.",
    "head_component_weights": "Per-component positional R2 and the normalised weights (sum 1 per head).",
    "head_errors": "Heads that could not be analysed, with the file and the problem.",
    "token_attention": "Attention patterns: per captured query, entropy, max_attn, k_eff, query norm and key coverage "
                       "of its rebuilt attention (empty when the run has attention off).",
    "head_attention_summary": "Attention patterns: per-head attention summary, sharp/medium/uniform class, local bias, "
                              "query-side variation, reconstruction checks, query-scale gain.",
    "query_scale_sweep": "Attention patterns: per-head means of the attention metrics with q scaled by each sweep scale.",
}
RESULT_CHECKS = {
    "head_metrics": ("ap_overall_in_unit_interval", "no_duplicate_rows_head_metrics"),
    "head_bucket_plasticity": ("plasticity_in_unit_interval", "no_duplicate_rows_head_bucket_plasticity"),
    "head_bucket_summary": ("no_duplicate_rows_head_bucket_summary",),
    "head_component_weights": ("weights_sum_to_one", "no_duplicate_rows_head_component_weights"),
    "head_errors": ("no_duplicate_rows_head_errors",),
    "token_attention": ("no_duplicate_rows_token_attention",),
    "head_attention_summary": ("no_duplicate_rows_head_attention_summary",),
    "query_scale_sweep": ("no_duplicate_rows_query_scale_sweep",),
}


class AnalysisConfig(dg.Config):
    """Run config of the per-head analysis step (none of these change a number)."""

    fresh: bool = Field(default=False, description="Recompute every head instead of resuming the run.")
    # descriptions from the config-key declarations (warehouse/settings/config.py); unset = the dataset config's value
    max_workers: Optional[int] = Field(default=None, description=describe("max_workers", "the dataset config's"))
    attention: Optional[str] = Field(default=None, description=describe("attention", "the dataset config's"))


@dg.multi_asset(
    specs=[
        dg.AssetSpec(name, description=desc, group_name="analysis", kinds={"python", "duckdb"},
                     deps=["head_samples"], metadata={"dagster/table_name": name})
        for name, desc in RESULT_ASSETS.items()
    ],
    partitions_def=models_partitions,
    check_specs=[dg.AssetCheckSpec(name, asset=table, description=quality.CHECKS[name].description)
                 for table, names in RESULT_CHECKS.items() for name in names],
)
def head_analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, warehouse: WarehouseResource,
                  hub: HubResource, datasets: DatasetsResource):
    """Analyse every head of the model's dataset (the revision the shard catalog recorded)."""
    key = context.partition_key
    waits_before = db.LOCK_WAITS.copy()
    wh = warehouse.path_for(key)
    entry = datasets.entry(key, repo_hint=context.run.tags.get(TAG_REPO))
    cfg = entry.run_config(warehouse=wh, max_workers=config.max_workers, attention=config.attention,
                           lock_timeout_s=warehouse.lock_timeout_s)
    sha = steps.catalog_revision(wh, key, warehouse.lock_timeout_s) if entry.is_hub else None
    root, sha, files = steps.open_dataset(entry, cfg, hub, sha)

    done, errors, last_log = [0], [0], [time.monotonic()]

    def on_outcome(outcome) -> None:
        done[0] += 1
        if outcome.error:
            errors[0] += 1
            context.log.warning(f"l{outcome.layer}h{outcome.q_head}: {outcome.error['problem']}: "
                                f"{outcome.error['message']}")
        if time.monotonic() - last_log[0] > 10:
            context.log.info(f"{done[0]} head(s) computed, {errors[0]} with errors")
            last_log[0] = time.monotonic()

    context.log.info(f"analysing {key} with {cfg.workers()} worker process(es), {'fresh' if config.fresh else 'resuming'}")
    summary = steps.run_analysis(entry, cfg, root, sha, fresh=config.fresh, on_outcome=on_outcome, hub_files=files)
    context.log.info(f"run {summary.run_id}: {summary.n_done} head(s) with results, {summary.n_errors} with errors, "
                     f"{summary.n_skipped} already done, {summary.seconds:.1f}s")
    if summary.n_heads and summary.n_done == 0:
        raise dg.Failure(
            description=f"every head of {key} failed ({summary.n_errors} errors); see table head_errors "
                        f"(model={key!r}, run_id={summary.run_id!r})",
            metadata={"run_id": summary.run_id, "n_errors": summary.n_errors},
        )
    if summary.n_done:  # the family's trajectory now has (new) results of this checkpoint
        report_checkpoint(context, checkpoint_of(cfg), key, summary.run_id)
    tables = steps.result_counts_and_previews(wh, key, summary.run_id,
                                              lock_timeout_s=warehouse.lock_timeout_s)
    common = {
        "model": key, "run_id": summary.run_id, "revision": summary.revision, "status": summary.status,
        "heads": summary.n_heads, "heads_with_results": summary.n_done, "heads_with_errors": summary.n_errors,
        "heads_computed_now": summary.n_computed, "seconds": round(summary.seconds, 2),
        **db.LOCK_WAITS.since(waits_before),  # waits for another process's lock on this model's warehouse
    }
    for name in RESULT_ASSETS:
        n_rows, preview = tables[name]
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={**common, "dagster/row_count": n_rows, "preview": md_preview(preview)},
        )
    with warehouse.reader(key) as con:
        for table, names in RESULT_CHECKS.items():
            for name in names:
                yield check_result(quality.evaluate(con, name, key, summary.run_id), table)
