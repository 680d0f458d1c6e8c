"""CSV exports of a model's latest run (the upstream toolkit's three files, plus head_errors)."""

import dagster as dg

from dagster_project import steps
from dagster_project.metadata import md_preview
from dagster_project.partitions import TAG_REPO, models_partitions
from dagster_project.resources import DatasetsResource, WarehouseResource


@dg.asset(
    deps=["head_metrics", "head_bucket_plasticity", "head_component_weights", "head_errors"],
    partitions_def=models_partitions,
    group_name="exports",
    kinds={"csv"},
)
def csv_exports(context: dg.AssetExecutionContext, warehouse: WarehouseResource, datasets: DatasetsResource):
    """head_metrics.csv, head_bucket_plasticity.csv, head_component_weights.csv (the upstream columns) and
    head_errors.csv of the model's latest run, in <exports_dir>/<model>/<run_id>/."""
    key = context.partition_key
    wh = warehouse.path_for(key)
    cfg = datasets.entry(key, repo_hint=context.run.tags.get(TAG_REPO)).run_config(warehouse=wh)
    res = steps.export_run(wh, warehouse.exports_dir, key, cfg, warehouse.lock_timeout_s)
    return dg.MaterializeResult(
        metadata={
            "model": key,
            "run_id": res.run_id,
            "folder": dg.MetadataValue.path(str(res.out_dir)),
            "dagster/row_count": sum(res.rows.values()),
            **{f"rows_{table}": n for table, n in res.rows.items()},
            **{f"file_{table}": dg.MetadataValue.path(str(p)) for table, p in res.files.items()},
            "preview": md_preview(res.preview),
        }
    )
