"""The job the sensors and the schedule launch: the whole flow for one model partition."""

from __future__ import annotations

import dagster as dg

ANALYZE_MODEL_JOB = "analyze_model_job"


def analyze_model_job(selection: dg.AssetSelection) -> dg.UnresolvedAssetJobDefinition:
    """Catalog -> head samples -> analysis -> CSVs -> plots for one model, then the cross-model comparison.

    Partitioned by `models` (inferred from the selected assets).
    """
    return dg.define_asset_job(
        ANALYZE_MODEL_JOB,
        selection=selection,
        description="Shard catalog, head samples, per-head analysis, CSV exports and plots of one model "
                    "(one partition), and the refreshed cross-model comparison.",
        tags={"plasticity/job": "analyze"},
    )
