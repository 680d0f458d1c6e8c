"""The Dagster code location: `dagster dev -m dagster_project.definitions` (or `plasticity ui`).

Executor: in-process. The only heavy step, `head_analysis`, runs its own
process pool over the heads of a model (processes that only compute) and is
the single writer of the warehouse in its run; the other steps take seconds,
so one process per run keeps DuckDB's one-writer rule trivially and saves a
Python start-up per step. See docs/scaling.md for running on more machines.
"""

from __future__ import annotations

import importlib
import importlib.util

import dagster as dg

from assets import analysis, catalog, exports, families, plots
from dagster_project.jobs import analyze_model_job
from dagster_project.partitions import models_partitions
from dagster_project.resources import default_resources
from dagster_project.schedules import build_schedule
from dagster_project.sensors import build_sensors

OWN_ASSETS = [
    catalog.shard_catalog,
    catalog.head_samples,
    analysis.head_analysis,
    exports.csv_exports,
    *plots.per_model_plots,
    plots.model_comparison_plot,
]
# partitioned by family, not by model: in no model's job
FAMILY_ASSETS = [families.family_checkpoints, families.family_trajectory]


def _optional_module(name: str):
    """assets.attention (attention patterns; docs/method.md#attention-patterns) when that module exists."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _extra_assets_and_checks():
    module = _optional_module("assets.attention")
    if module is None:
        return [], []
    own_keys = {k for a in OWN_ASSETS for k in a.keys}
    assets = [a for a in dg.load_assets_from_modules([module])
              if not (isinstance(a, dg.AssetsDefinition) and set(a.keys) & own_keys)]
    checks = list(dg.load_asset_checks_from_modules([module]))
    return assets, checks


EXTRA_ASSETS, EXTRA_CHECKS = _extra_assets_and_checks()
ALL_ASSETS = [*OWN_ASSETS, *EXTRA_ASSETS, *FAMILY_ASSETS]


def _job_selection() -> dg.AssetSelection:
    """Every asset partitioned by model, plus unpartitioned ones (the comparison)."""
    keys = []
    for a in ALL_ASSETS:
        if isinstance(a, dg.AssetsDefinition) and a.partitions_def in (None, models_partitions):
            keys.extend(a.keys)
    return dg.AssetSelection.assets(*keys)


job = analyze_model_job(_job_selection())

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=EXTRA_CHECKS,
    jobs=[job],
    sensors=[*build_sensors(job), families.family_automation_sensor],
    schedules=[build_schedule(job)],
    resources=default_resources(),
    executor=dg.in_process_executor,
)
