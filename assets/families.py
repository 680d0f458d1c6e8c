"""Families of checkpoints: every family's trajectory, redrawn when one of its checkpoints is analysed.

* `family_checkpoints` (partitioned by family; reported, not computed): "a checkpoint of this family has
  new results". `head_analysis` reports it for the model's family (`report_checkpoint`) when a run of a
  model with a family (run config, or its Hub branch's ``family_pattern``) ends with results.
* `family_trajectory` (partitioned by family): the trajectory views (sql/trajectories.sql) over every
  warehouse file, as plots, CSVs and a preview. Declarative automation requests a family's partition when
  its `family_checkpoints` partition was updated since the last request, once no run of it is in
  progress, so a checkpoint finishing during a refresh triggers one more.

Going through `family_checkpoints` maps each model to its own family: a dependency of a family on the
models-partitioned `head_metrics` could only map to every model (Dagster has no mapping between two
dynamic partition sets), and would redraw every family whenever any model is analysed.
"""

from pathlib import Path

import dagster as dg

from dagster_project import steps
from dagster_project.metadata import md_preview, png_markdown
from dagster_project.partitions import FAMILIES_PARTITIONS_NAME, families_partitions
from dagster_project.resources import DatasetsResource, WarehouseResource
from warehouse.store import db
from warehouse.store.families import Checkpoint

FAMILY_CHECKPOINTS = "family_checkpoints"
GROUP = "families"
CHECK_CHECKPOINTS_SUCCEEDED = "checkpoints_succeeded"

family_checkpoints = dg.AssetSpec(
    FAMILY_CHECKPOINTS,
    partitions_def=families_partitions,
    group_name=GROUP,
    deps=[dg.AssetDep("head_metrics", partition_mapping=dg.AllPartitionMapping())],
    description="A checkpoint of the family has new results: reported by head_analysis for the model's family "
                "(run config keys family/stage/step, or the Hub branch's family_pattern), with the model, "
                "its stage, step and run id.",
)

# Requested when the family got a new checkpoint result since the last request (not since the last
# materialization: a checkpoint that finishes while the trajectory is being drawn triggers another).
FAMILY_AUTOMATION = (
    dg.AutomationCondition.any_deps_updated().since(
        dg.AutomationCondition.newly_requested() | dg.AutomationCondition.initial_evaluation())
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.in_progress()
).with_label("a checkpoint of the family was analysed")


# Family trajectories refresh on their own (cheap: reads and plots): this sensor is on by default,
# unlike the project's other sensors. The default automation sensor keeps everything else.
family_automation_sensor = dg.AutomationConditionSensorDefinition(
    "family_trajectory_automation",
    target=dg.AssetSelection.assets("family_trajectory"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Redraws a family's trajectory when one of its checkpoints was analysed (family_checkpoints).",
)


def report_checkpoint(context: dg.AssetExecutionContext, checkpoint: Checkpoint | None, model: str,
                      run_id: str) -> None:
    """Report `family_checkpoints` for the model's family (adding the family's partition if new)."""
    if checkpoint is None:
        return
    instance = context.instance
    if not instance.has_dynamic_partition(FAMILIES_PARTITIONS_NAME, checkpoint.family):
        instance.add_dynamic_partitions(FAMILIES_PARTITIONS_NAME, [checkpoint.family])
    context.log_event(dg.AssetMaterialization(
        FAMILY_CHECKPOINTS, partition=checkpoint.family,
        metadata={"model": model, "run_id": run_id, "step": checkpoint.step, "stage": checkpoint.stage or ""},
    ))


@dg.asset(
    partitions_def=families_partitions,
    deps=[family_checkpoints],
    group_name=GROUP,
    kinds={"duckdb", "seaborn"},
    automation_condition=FAMILY_AUTOMATION,
    check_specs=[dg.AssetCheckSpec(CHECK_CHECKPOINTS_SUCCEEDED, asset="family_trajectory",
                                   description="The latest run of every checkpoint shown succeeded (a partial, "
                                               "failed, interrupted or running one is listed).")],
)
def family_trajectory(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                      datasets: DatasetsResource):
    """ap_overall of every layer through the family's checkpoints (latest run of each, from every warehouse
    file): mean over the layer's heads with its 95% t-interval against the training step, and a layer x
    checkpoint heatmap; also the metric of configs/plots/<family>-trajectory.yaml when it names another.
    PNGs and CSVs go to <exports_dir>/families/<family>/."""
    family = context.partition_key
    waits_before = db.LOCK_WAITS.copy()
    paths = [p for p in warehouse.all_paths() if Path(p).exists()]
    if not paths:
        raise dg.Failure(description=f"no warehouse file at {warehouse.path}: analyse a checkpoint of {family} first")
    out_dir = Path(warehouse.exports_dir) / "families" / steps.safe_family(family)
    drawn = steps.render_trajectories(paths, family, out_dir, datasets.plot_configs_dir, warehouse.lock_timeout_s)
    first = drawn[0]
    checkpoints = first.trajectory.checkpoints
    metadata = {
        "family": family,
        "checkpoints": len(checkpoints),
        "steps": dg.MetadataValue.json([int(s) for s in checkpoints["step"]]),
        "runs": dg.MetadataValue.json(dict(zip(checkpoints["model"], checkpoints["run_id"]))),
        "warehouse_files": len(paths),
        "dagster/row_count": len(first.trajectory.layers),
        "folder": dg.MetadataValue.path(str(out_dir)),
        "preview": md_preview(first.result.extra["matrix"].reset_index(), max_rows=40),
        **db.LOCK_WAITS.since(waits_before),  # waits for runs writing a checkpoint's warehouse file
    }
    for out in drawn:
        metadata[f"plot_{out.metric}"] = png_markdown(out.png, f"{family} {out.metric}", out.path)
        metadata[f"file_{out.metric}"] = dg.MetadataValue.path(str(out.path))
    yield dg.MaterializeResult(metadata=metadata)
    failing = checkpoints.loc[checkpoints["status"] != "succeeded", ["model", "stage", "step", "run_id", "status"]]
    yield dg.AssetCheckResult(
        check_name=CHECK_CHECKPOINTS_SUCCEEDED, passed=failing.empty, severity=dg.AssetCheckSeverity.WARN,
        metadata={"checkpoints": len(checkpoints), "not_succeeded": len(failing), "rows": md_preview(failing)},
    )
