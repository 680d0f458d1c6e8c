"""Periodic re-analysis of every registered model (weekly, Monday 04:00 UTC; off by default).

Each run re-resolves its dataset: a Hub partition downloads the branch head
of the day (a moved branch gets a new run id), a local one re-fingerprints its
files. Unchanged data gives the same run id, so finished heads are skipped and
only the exports, plots and comparison are refreshed.
"""

import dagster as dg

from dagster_project.partitions import MODELS_PARTITIONS_NAME, TAG_TRIGGER

REANALYSIS_CRON = "0 4 * * 1"


def build_schedule(job) -> dg.ScheduleDefinition:
    @dg.schedule(cron_schedule=REANALYSIS_CRON, job=job, execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Weekly re-analysis of every model partition (Mondays 04:00 UTC).")
    def weekly_reanalysis_schedule(context: dg.ScheduleEvaluationContext):
        keys = context.instance.get_dynamic_partitions(MODELS_PARTITIONS_NAME)
        if not keys:
            return dg.SkipReason("no model partitions registered yet")
        stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        return [dg.RunRequest(partition_key=k, run_key=f"{k}@{stamp}", tags={TAG_TRIGGER: "weekly_reanalysis"})
                for k in sorted(keys)]

    return weekly_reanalysis_schedule
