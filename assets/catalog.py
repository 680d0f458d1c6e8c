"""Shard catalog -> bucket statistics -> head samples: the SQL side of the warehouse, per model."""

from typing import Optional

import dagster as dg
from pydantic import Field

from dagster_project import quality, steps
from dagster_project.metadata import check_result, md_preview
from dagster_project.partitions import TAG_REPO, TAG_REVISION, models_partitions
from dagster_project.resources import DatasetsResource, HubResource, WarehouseResource
from warehouse.sources.layout import LayoutError

CATALOG_CHECKS = ("shard_schema_valid", "shard_widths_consistent")
HEAD_SAMPLE_CHECKS = ("every_query_head_has_key_head", "query_key_widths_match")


class CatalogConfig(dg.Config):
    """Run config of the shard catalog step."""

    revision: Optional[str] = Field(
        default=None,
        description="Hub commit sha to pin this model's download to. Default: the sensor's "
                    f"`{TAG_REVISION}` run tag, else the branch head at run time. Ignored for local folders.",
    )


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "shard_catalog", group_name="catalog", kinds={"duckdb", "parquet"},
            description="Every lXXhYY{q,k}/data.parquet shard of the model: schema-checked and profiled "
                        "(rows, width, sliding window, examples, position range, error). Table `shards`.",
            metadata={"dagster/table_name": "shards"},
        ),
        dg.AssetSpec(
            "bucket_statistics", group_name="catalog", kinds={"duckdb"},
            description="Observed position range and row count of every bucket of every shard "
                        "(sql/shard_buckets.sql). Table `shard_buckets`.",
            metadata={"dagster/table_name": "shard_buckets"},
        ),
    ],
    partitions_def=models_partitions,
    check_specs=[dg.AssetCheckSpec(name, asset="shard_catalog", description=quality.CHECKS[name].description)
                 for name in CATALOG_CHECKS],
)
def shard_catalog(context: dg.AssetExecutionContext, config: CatalogConfig, warehouse: WarehouseResource,
                  hub: HubResource, datasets: DatasetsResource):
    """Resolve the partition's dataset (download a Hub branch pinned to its sha), profile its shards."""
    key = context.partition_key
    wh = warehouse.path_for(key)
    entry = datasets.entry(key, repo_hint=context.run.tags.get(TAG_REPO))
    cfg = entry.run_config(warehouse=wh)
    sha = config.revision or (context.run.tags.get(TAG_REVISION) if entry.is_hub else None)
    root, sha, files = steps.open_dataset(entry, cfg, hub, sha)
    context.log.info(f"model {key}: {entry.describe()} at {sha or 'local files'} -> {root}"
                     + (" (streamed)" if files is not None else ""))
    try:
        res = steps.build_shard_catalog(entry, cfg, root, sha, wh, warehouse.lock_timeout_s, hub_files=files)
    except LayoutError as exc:  # the run stops before any work, saying what to set
        raise dg.Failure(description=str(exc)) from None
    common = {"model": key, "revision": res.revision, "source": entry.describe()}
    yield dg.MaterializeResult(
        asset_key="shard_catalog",
        metadata={
            **common,
            "dagster/row_count": res.n_shards,
            "query_shards": res.n_query,
            "key_shards": res.n_key,
            "bad_shards": res.n_bad,
            "layout": f"{res.num_layers} layers x {res.num_q_heads} q heads / {res.num_k_heads} k heads",
            "layout_source": res.layout_source,
            "bucket_scheme": res.bucket_scheme or "unknown (buckets only checked to increase with position)",
            "dataset_problems": res.n_problems,
            "profiled_shards": res.n_profiled,
            **({"profiles": "streamed from the Hub: head_analysis profiles each shard as it downloads it (once per "
                            "run) and records the complete catalog and head_samples"} if res.streamed else {}),
            "dataset_root": dg.MetadataValue.path(str(res.root)),
            "preview": md_preview(res.shards[["layer", "head", "kind", "n_rows", "dim", "sliding_window",
                                              "n_examples", "n_buckets", "error"]]),
        },
    )
    buckets = res.shards[["layer", "head", "kind", "n_buckets", "min_bucket", "max_bucket", "min_position",
                          "max_position"]]
    yield dg.MaterializeResult(
        asset_key="bucket_statistics",
        metadata={**common, "dagster/row_count": res.n_bucket_rows, "preview": md_preview(buckets)},
    )
    with warehouse.reader(key) as con:
        for name in CATALOG_CHECKS:
            yield check_result(quality.evaluate(con, name, key), "shard_catalog")


@dg.asset(
    deps=["shard_catalog", "bucket_statistics"],
    partitions_def=models_partitions,
    group_name="catalog",
    kinds={"duckdb", "sql"},
    metadata={"dagster/table_name": "head_samples"},
    check_specs=[dg.AssetCheckSpec(name, asset="head_samples", description=quality.CHECKS[name].description)
                 for name in HEAD_SAMPLE_CHECKS],
)
def head_samples(context: dg.AssetExecutionContext, warehouse: WarehouseResource, datasets: DatasetsResource):
    """Every query head paired with its key head (GQA, in SQL) and the sample sizes the analysis will draw."""
    key = context.partition_key
    wh = warehouse.path_for(key)
    entry = datasets.entry(key, repo_hint=context.run.tags.get(TAG_REPO))
    cfg = entry.run_config(warehouse=wh)
    res = steps.refresh_head_samples(key, cfg, wh, warehouse.lock_timeout_s)
    yield dg.MaterializeResult(
        metadata={
            "model": key,
            "dagster/row_count": res.n_heads,
            "heads_missing_key_shard": res.n_missing_key,
            "heads_that_cannot_run": res.n_plan_problems,
            "gqa_group_size": res.group_size,
            "max_tokens_per_head": cfg.max_tokens_per_head,
            "sampled_query_rows": res.q_sample_rows,
            "sampled_key_rows": res.k_sample_rows,
            "preview": md_preview(res.preview),
        }
    )
    with warehouse.reader(key) as con:
        for name in HEAD_SAMPLE_CHECKS:
            yield check_result(quality.evaluate(con, name, key), "head_samples")
