"""Seaborn plots as assets: per-model curves, heatmap, component bars; a cross-model comparison.

Options come from configs/plots/<model>-plasticity.yaml, -heatmap.yaml,
-components.yaml (and model-comparison.yaml) when present, the same files
`plasticity plot --config` reads; bucket type and size default to the dataset
card's (as the catalog step recorded them in table `models`). Each materialization shows the plot, a markdown table of what it shows
and the number of rows plotted.
"""

from pathlib import Path

import dagster as dg

from dagster_project import steps
from dagster_project.metadata import md_preview, png_markdown
from dagster_project.partitions import models_partitions
from dagster_project.resources import DatasetsResource, WarehouseResource

PER_MODEL_PLOTS = {
    # asset name: (plot kind, source table, description)
    "plasticity_curves_plot": ("curves", "head_bucket_plasticity",
                               "Per-bucket plasticity AP_j of every head (faint) and the mean over heads (bold); "
                               "heads coloured by layer or by curve shape when the plot config asks for it; bands: "
                               "the stored 95% intervals of each head's AP_j (few heads) or the conservative "
                               "interval of the mean (metadata `intervals` says which)."),
    "bucket_heatmap_plot": ("heatmap", "head_bucket_plasticity",
                            "Query bucket x key bucket plasticity, aggregated over heads (mean or median)."),
    "component_weights_plot": ("components", "head_component_weights",
                               "Mean share of linear positional information per query dimension (the head's own "
                               "basis; each head normalised to sum 1 first), with 95% bootstrap intervals of the "
                               "mean over heads."),
}


# Redraw when any model's head metrics update (eager, except that models never analysed yet do not block it).
COMPARISON_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


def _metadata(out: steps.PlotOutput, extra: dict) -> dict:
    res = out.result
    return {
        **extra,
        "dagster/row_count": res.n_rows,
        "heads": res.n_heads,
        "file": dg.MetadataValue.path(str(out.path)),
        "plot_config": str(out.config_file) if out.config_file else "defaults",
        "plot": png_markdown(out.png, out.kind, out.path),
        "preview": md_preview(res.summary),
        **({"intervals": res.extra["bands"] or "none"} if "bands" in res.extra else {}),
    }


def _per_model_plot(name: str, kind: str, table: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, deps=[table], partitions_def=models_partitions, group_name="plots",
              kinds={"seaborn"}, description=description)
    def _plot(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
              datasets: DatasetsResource) -> dg.MaterializeResult:
        key = context.partition_key
        wh = warehouse.path_for(key)
        defaults = steps.plot_defaults(wh, key, warehouse.lock_timeout_s)
        run = steps.latest_run(wh, key, warehouse.lock_timeout_s)
        out_path = warehouse.run_dir(key, run["run_id"]) / "plots" / f"{name}.png"
        out = steps.render_plot(kind, wh, out_path, datasets.plot_configs_dir, key, defaults,
                                warehouse.lock_timeout_s)
        return dg.MaterializeResult(metadata=_metadata(out, {"model": key, "run_id": run["run_id"]}))

    return _plot


per_model_plots = [_per_model_plot(name, *spec) for name, spec in PER_MODEL_PLOTS.items()]


@dg.asset(
    deps=["head_metrics"],
    group_name="plots",
    kinds={"seaborn"},
    automation_condition=COMPARISON_AUTOMATION,
)
def model_comparison_plot(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                          datasets: DatasetsResource) -> dg.MaterializeResult:
    """ap_overall by layer, one line per model (latest run of every model in the warehouse), with error bars of
    the stored 95% intervals (each head's, or the conservative interval of each layer mean)."""
    out_path = Path(warehouse.exports_dir) / "model_comparison.png"
    out = steps.render_plot("compare", warehouse.all_paths(), out_path, datasets.plot_configs_dir, None, None,
                            warehouse.lock_timeout_s)
    runs = out.source.get("runs", {})
    return dg.MaterializeResult(metadata=_metadata(out, {"models": len(runs), "runs": dg.MetadataValue.json(runs)}))
