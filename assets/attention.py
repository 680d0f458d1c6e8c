"""Attention patterns: the validation report and two plots of a model's latest run.

The attention tables (token_attention, head_attention_summary, query_scale_sweep) are
written by the per-head analysis step (`head_analysis`, unless the run config has
``attention: false``), in the same transactions as ``head_metrics``; these assets depend
on that step through ``head_metrics`` and only read the warehouse (read-only
connections). A run analysed without attention has no attention rows: the assets then
log why and materialize nothing, so the rest of the job is unaffected. When no head's
attention is estimable from the capture (a sparse capture), the report still says so and the
class plot shows it; the scale plot has nothing to draw and materializes nothing.
"""

import dagster as dg

from dagster_project import steps
from dagster_project.metadata import md_preview, png_markdown
from dagster_project.partitions import models_partitions
from dagster_project.resources import WarehouseResource
from warehouse.store import db

# written by head_analysis (assets/analysis.py) together with head_metrics
ANALYSIS_ASSET = "head_attention_summary"
ATTENTION_TABLES = ("token_attention", "head_attention_summary", "query_scale_sweep")
GROUP = "attention"


def _row_counts(warehouse: WarehouseResource, model: str, run_id: str) -> dict:
    from warehouse.present.attention_plots import ESTIMABLE_SQL

    p = {"m": model, "r": run_id}
    with db.reader(warehouse.path_for(model), warehouse.lock_timeout_s) as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t} WHERE model = $m AND run_id = $r", p).fetchone()[0]
                  for t in ATTENTION_TABLES}
        counts["estimable_heads"] = con.execute(
            f"SELECT count(*) FROM head_attention_summary h WHERE model = $m AND run_id = $r AND {ESTIMABLE_SQL}",
            p).fetchone()[0]
    return counts


def _latest_with_attention(context, warehouse: WarehouseResource, *, estimable: bool = False):
    """(model, run id, row counts) of the partition's latest run, or None (logged) without attention rows
    (or, with ``estimable``, without a head whose attention the capture gives)."""
    model = context.partition_key
    run_id = steps.latest_run(warehouse.path_for(model), model, warehouse.lock_timeout_s)["run_id"]
    counts = _row_counts(warehouse, model, run_id)
    if counts["head_attention_summary"] == 0:
        context.log.info(f"run {run_id} of {model} has no attention rows (analysed with `attention: false`?); "
                         "nothing to materialize")
        return None
    if estimable and counts["estimable_heads"] == 0:
        context.log.info(f"no head of run {run_id} of {model} is estimable from this capture (too few query rows "
                         "see every key; see the attention validation report); nothing to plot")
        return None
    return model, run_id, counts


@dg.asset(
    deps=[ANALYSIS_ASSET],
    partitions_def=models_partitions,
    group_name=GROUP,
    kinds={"duckdb"},
    output_required=False,
)
def attention_validation_report(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
    """The attention validation report of the model's latest run: reconstruction
    checks, positional / token patterns, uniformity, per-head classes, query-side variation
    and the query-scale sweep, each marked PASS / WARN / FAIL. Also written to
    <exports_dir>/<model>/<run_id>/attention_validation.txt."""
    from warehouse.present.validation import model_report

    found = _latest_with_attention(context, warehouse)
    if found is None:
        return
    model, run_id, counts = found
    res = model_report(warehouse.path_for(model), model, run_id, timeout_s=warehouse.lock_timeout_s)
    path = warehouse.run_dir(model, run_id) / "attention_validation.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(res.text, encoding="utf-8")
    if res.failed:
        context.log.warning(f"{res.counts['failures']} attention check(s) failed for {model} run {run_id}")
    yield dg.MaterializeResult(metadata={
        "model": model,
        "run_id": run_id,
        "heads": res.n_heads,
        **{k: int(v) for k, v in res.counts.items()},
        "dagster/row_count": counts["head_attention_summary"],
        **{f"rows_{t}": int(counts[t]) for t in ATTENTION_TABLES},
        "estimable_heads": int(counts["estimable_heads"]),
        "file": dg.MetadataValue.path(str(path)),
        "report": dg.MetadataValue.md(f"```\n{res.text}```"),
    })


def _plot_metadata(model: str, run_id: str, out, preview, counts: dict) -> dict:
    return {
        "model": model,
        "run_id": run_id,
        "dagster/row_count": len(out.data),
        **{f"rows_{t}": int(counts[t]) for t in ATTENTION_TABLES},
        "estimable_heads": int(counts["estimable_heads"]),
        "file": dg.MetadataValue.path(str(out.path)),
        "plot": png_markdown(out.png, out.kind, out.path),
        "preview": md_preview(preview),
    }


@dg.asset(
    deps=[ANALYSIS_ASSET],
    partitions_def=models_partitions,
    group_name=GROUP,
    kinds={"seaborn"},
    output_required=False,
)
def attention_scale_plot(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
    """Mean entropy, max_attn and k_eff against the query scale (the query-scale intervention
    sweep) for the 3 highest- and 3 lowest-gain heads of the model's latest run."""
    from warehouse.present.attention_plots import plot_scale_sweep

    found = _latest_with_attention(context, warehouse, estimable=True)
    if found is None:
        return
    model, run_id, counts = found
    out = plot_scale_sweep(warehouse.path_for(model), model, run_id,
                           warehouse.run_dir(model, run_id) / "plots" / "attention_scale_plot.png",
                           timeout_s=warehouse.lock_timeout_s)
    preview = out.data.pivot_table(index=["head", "gain", "scale"], columns="metric", values="value",
                                   sort=False).reset_index()
    yield dg.MaterializeResult(metadata={
        **_plot_metadata(model, run_id, out, preview, counts),
        "heads": ", ".join(dict.fromkeys(out.data["head"])),
    })


@dg.asset(
    deps=[ANALYSIS_ASSET],
    partitions_def=models_partitions,
    group_name=GROUP,
    kinds={"seaborn"},
    output_required=False,
)
def attention_class_plot(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
    """Per layer, how many heads of the model's latest run attend sharply, medium or
    uniformly (entropy_ratio <= 0.5, in between, >= 0.95), as stacked bars."""
    from warehouse.present.attention_plots import plot_attention_classes

    found = _latest_with_attention(context, warehouse)
    if found is None:
        return
    model, run_id, counts = found
    out = plot_attention_classes(warehouse.path_for(model), model, run_id,
                                 warehouse.run_dir(model, run_id) / "plots" / "attention_class_plot.png",
                                 timeout_s=warehouse.lock_timeout_s)
    yield dg.MaterializeResult(metadata=_plot_metadata(model, run_id, out, out.data, counts))
