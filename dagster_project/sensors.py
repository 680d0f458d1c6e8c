"""Sensors that add model partitions and request runs.

* `hub_branches_sensor`: lists the branches (and head commits) of every Hub
  dataset repo in the watch file; a new branch becomes a partition, and a new
  branch or a moved sha requests a run whose tags pin the sha.
* `local_datasets_sensor`: the local folders of configs/*.yaml; a new folder or
  changed shards (size + Parquet footer fingerprint) request a run.

A model with a family (its run config, or the repo's ``family_pattern`` for a Hub
branch) also adds its family to the `families` partitions.

Both are off by default (turn them on in the UI, Automation tab).
"""

import json
from dataclasses import dataclass, field

import dagster as dg

from dagster_project.partitions import (
    FAMILIES_PARTITIONS_NAME, MODELS_PARTITIONS_NAME, TAG_BRANCH, TAG_REPO, TAG_REVISION, TAG_TRIGGER,
    families_partitions, models_partitions,
)
from dagster_project.registry import DatasetRegistry
from dagster_project.resources import DatasetsResource, HubResource


@dataclass
class Updates:
    """What one sensor tick found: partitions to add, runs to request, the new cursor."""

    new_partitions: list[str] = field(default_factory=list)
    new_families: list[str] = field(default_factory=list)
    run_requests: list[dg.RunRequest] = field(default_factory=list)
    cursor: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seen: int = 0

    def add_family(self, entry, existing_families: set[str]) -> None:
        """The entry's family as a new `families` partition, when it has one not registered yet."""
        try:
            checkpoint = entry.checkpoint()
        except (ValueError, LookupError) as exc:  # a bad config or branch name: that model's run says so too
            self.problems.append(f"{entry.key}: {exc}")
            return
        if checkpoint is not None and checkpoint.family not in existing_families | set(self.new_families):
            self.new_families.append(checkpoint.family)


def _load_cursor(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def hub_updates(registry: DatasetRegistry, hub: HubResource, existing: set[str], cursor: dict[str, str],
                existing_families: frozenset[str] = frozenset()) -> Updates:
    from warehouse.sources.hub import HubError

    out = Updates(cursor=dict(cursor))
    for repo in registry.watched:
        try:
            branches = hub.list_branches(repo.repo_id)
        except HubError as exc:
            out.problems.append(str(exc))
            continue
        for ref in branches:
            if not repo.wants(ref.name):
                continue
            out.seen += 1
            entry = registry.entry_for_branch(repo, ref.name)
            key = entry.key
            if key not in existing and key not in out.new_partitions:
                out.new_partitions.append(key)
            out.add_family(entry, set(existing_families))
            cursor_key = f"{repo.repo_id}@{ref.name}"
            if cursor.get(cursor_key) == ref.sha:
                continue
            out.cursor[cursor_key] = ref.sha
            out.run_requests.append(dg.RunRequest(
                partition_key=key,
                run_key=f"{key}@{ref.sha}",
                tags={TAG_REVISION: ref.sha, TAG_REPO: repo.repo_id, TAG_BRANCH: ref.name,
                      TAG_TRIGGER: "hub_branches_sensor"},
            ))
    return out


def local_updates(registry: DatasetRegistry, existing: set[str], cursor: dict[str, str],
                  existing_families: frozenset[str] = frozenset()) -> Updates:
    from warehouse.sources.catalog import scan_shards
    from warehouse.sources.revision import stat_fingerprint

    out = Updates(cursor=dict(cursor))
    for entry in registry.local_entries():
        try:
            cfg = entry.run_config()
            scan = scan_shards(entry.local_root, cfg.model_dir)
        except (FileNotFoundError, ValueError) as exc:
            out.problems.append(f"{entry.key}: {exc}")
            continue
        out.seen += 1
        if entry.key not in existing:
            out.new_partitions.append(entry.key)
        out.add_family(entry, set(existing_families))
        # a cheap change detector (sizes and times): it only decides when to start a run; the run
        # hashes every byte for its revision
        fingerprint = stat_fingerprint(scan.base, scan.paths)
        if cursor.get(entry.key) == fingerprint:
            continue
        out.cursor[entry.key] = fingerprint
        out.run_requests.append(dg.RunRequest(
            partition_key=entry.key,
            run_key=f"{entry.key}@{fingerprint}",
            tags={TAG_REVISION: fingerprint, TAG_TRIGGER: "local_datasets_sensor"},
        ))
    return out


def _result(context, updates: Updates, what: str) -> dg.SensorResult:
    for problem in updates.problems:
        context.log.warning(problem)
    skip = None
    if not updates.run_requests and not updates.new_partitions and not updates.new_families:
        skip = f"no new or moved {what} ({updates.seen} seen)"
        if updates.problems:
            skip += f"; {len(updates.problems)} problem(s): {updates.problems[0]}"
    requests = [definition.build_add_request(keys) for definition, keys in
                ((models_partitions, updates.new_partitions), (families_partitions, updates.new_families)) if keys]
    return dg.SensorResult(
        run_requests=updates.run_requests,
        dynamic_partitions_requests=requests,
        cursor=json.dumps(updates.cursor, sort_keys=True),
        skip_reason=skip,
    )


def build_sensors(job) -> list[dg.SensorDefinition]:
    @dg.sensor(job=job, minimum_interval_seconds=15 * 60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="New branches or moved commits of the watched Hub dataset repos "
                           "(configs/dagster/hub_repos.yaml) -> new partitions + pinned runs.")
    def hub_branches_sensor(context: dg.SensorEvaluationContext, hub: HubResource, datasets: DatasetsResource):
        registry = datasets.registry()
        if not registry.watched:
            return dg.SkipReason(f"no Hub repos to watch in {registry.watch_file}")
        existing = set(context.instance.get_dynamic_partitions(MODELS_PARTITIONS_NAME))
        families = frozenset(context.instance.get_dynamic_partitions(FAMILIES_PARTITIONS_NAME))
        updates = hub_updates(registry, hub, existing, _load_cursor(context.cursor), families)
        return _result(context, updates, "Hub branches")

    @dg.sensor(job=job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="New or changed local datasets of configs/*.yaml -> partitions + runs.")
    def local_datasets_sensor(context: dg.SensorEvaluationContext, datasets: DatasetsResource):
        registry = datasets.registry()
        existing = set(context.instance.get_dynamic_partitions(MODELS_PARTITIONS_NAME))
        families = frozenset(context.instance.get_dynamic_partitions(FAMILIES_PARTITIONS_NAME))
        updates = local_updates(registry, existing, _load_cursor(context.cursor), families)
        return _result(context, updates, "local datasets")

    return [hub_branches_sensor, local_datasets_sensor]
