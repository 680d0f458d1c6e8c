"""The `models` dynamic partitions: one partition per model (a Hub dataset branch or a local dataset).

Partitions are added by the sensors (`hub_branches_sensor`, `local_datasets_sensor`),
by `plasticity ui` (for the local datasets of configs/*.yaml) or by hand in the UI.
A key is the `model` value written to the warehouse; `dagster_project.registry`
maps it to its dataset.
"""

from __future__ import annotations

import dagster as dg

MODELS_PARTITIONS_NAME = "models"
models_partitions = dg.DynamicPartitionsDefinition(name=MODELS_PARTITIONS_NAME)

# One partition per family of checkpoints (`warehouse.store.families`), added with its models by the same
# sensors, by `plasticity ui` and by a model's analysis when its family is new.
FAMILIES_PARTITIONS_NAME = "families"
families_partitions = dg.DynamicPartitionsDefinition(name=FAMILIES_PARTITIONS_NAME)

# Run tags set by the sensors; the shard catalog pins the Hub download to TAG_REVISION.
TAG_REVISION = "plasticity/revision"
TAG_REPO = "plasticity/repo"
TAG_BRANCH = "plasticity/branch"
TAG_TRIGGER = "plasticity/trigger"
