"""Dagster resources: the DuckDB warehouse, the Hugging Face Hub client, the dataset registry.

None of them holds a secret: the Hub token is read from $HF_TOKEN by
`warehouse.sources.hub` at call time, so it never appears in run config, resource
config, metadata or logs.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import dagster as dg
from pydantic import Field

from dagster_project.registry import DEFAULT_CONFIGS_DIR, PROJECT_ROOT, DatasetEntry, DatasetRegistry
from warehouse.settings.config import DEFAULT_WAREHOUSE as DEFAULT_WAREHOUSE_NAME
from warehouse.settings.config import WAREHOUSE_ENV, choose_warehouse
from warehouse.sources.names import safe_path_component
from warehouse.store import db
from warehouse.store.db import MODEL_PLACEHOLDER
from warehouse.store.export import results_dir

DEFAULT_WAREHOUSE = PROJECT_ROOT / DEFAULT_WAREHOUSE_NAME
DEFAULT_EXPORTS_DIR = PROJECT_ROOT / "results"
DEFAULT_HUB_DIR = PROJECT_ROOT / "data" / "hub"
SNAPSHOT_MARKER = ".plasticity-snapshot.json"


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file and the folder its exports (CSV, PNG) go to.

    One writer at a time: writes go through `warehouse.store.db.writer` (one short
    transaction, waits for the lock with back-off); reads through read-only
    connections. A `path` containing ``{model}`` gives every model its own file
    (e.g. ``/store/warehouses/{model}.duckdb``), so runs of different models
    never share a writer, even on different machines.
    """

    path: str = Field(default=str(DEFAULT_WAREHOUSE),
                      description="DuckDB warehouse file; may contain {model} for one file per model")
    exports_dir: str = Field(default=str(DEFAULT_EXPORTS_DIR),
                             description="CSV exports and plots go to <exports_dir>/<model>/<run_id>/")
    lock_timeout_s: float = Field(default=60.0, description="how long to wait for another process's lock")

    @property
    def per_model(self) -> bool:
        return MODEL_PLACEHOLDER in self.path

    def path_for(self, model: str) -> str:
        """The warehouse file holding `model`."""
        if not self.per_model:
            return self.path
        return self.path.replace(MODEL_PLACEHOLDER, safe_path_component(model, "model name (partition key)"))

    def all_paths(self) -> list[str]:
        """Every existing warehouse file (one, or one per model)."""
        return [str(p) for p in db.model_files(self.path)]

    @contextmanager
    def reader(self, model: str | None = None) -> Iterator:
        with db.reader(self.path_for(model) if model else self.path, self.lock_timeout_s) as con:
            yield con

    @contextmanager
    def writer(self, model: str | None = None) -> Iterator:
        with db.writer(self.path_for(model) if model else self.path, self.lock_timeout_s) as con:
            yield con

    def run_dir(self, model: str, run_id: str) -> Path:
        return results_dir(self.exports_dir, model, run_id)


class HubResource(dg.ConfigurableResource):
    """Hugging Face Hub access for qk-sniffer dataset repos (one branch per model).

    Lists branches with their head commit and downloads a branch pinned to a
    commit into ``<download_dir>/<owner>/<name>/<sha>/``, so every step (on any
    machine sharing that folder) sees exactly the same files. The token comes
    from $HF_TOKEN only; `endpoint` None means $HF_ENDPOINT, else huggingface.co.
    """

    endpoint: Optional[str] = Field(default=None, description="Hub URL; default $HF_ENDPOINT, else huggingface.co")
    download_dir: str = Field(default=str(DEFAULT_HUB_DIR), description="pinned snapshots go here")
    max_workers: Optional[int] = Field(default=None, description="parallel file downloads")

    def list_branches(self, repo_id: str):
        from warehouse.sources import hub

        return hub.list_dataset_branches(repo_id, endpoint=self.endpoint)

    def head_sha(self, repo_id: str, branch: str) -> str:
        from warehouse.sources import hub

        return hub.get_branch(repo_id, branch, endpoint=self.endpoint).sha

    def snapshot_path(self, repo_id: str, sha: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts) or not sha.isalnum():
            raise ValueError(f"bad repo id or sha: {repo_id!r} {sha!r}")
        return Path(self.download_dir) / parts[0] / parts[1] / sha

    def branch_files(self, repo_id: str, branch: str, sha: str, model_dir: str | None = None):
        """The shards of `branch` at commit `sha`, listed, not downloaded (the card is): a streamed run
        downloads them into the snapshot folder as it needs them (`warehouse.run.hub_stream`)."""
        from warehouse.sources import hub_files

        return hub_files.open_branch(repo_id, branch, sha, self.snapshot_path(repo_id, sha), model_dir=model_dir,
                                     endpoint=self.endpoint)

    def snapshot(self, repo_id: str, branch: str, sha: str, model_dir: str | None = None) -> Path:
        """Folder holding the shards of `branch` at commit `sha` (downloaded once; root, not model_dir)."""
        from warehouse.sources import hub

        target = self.snapshot_path(repo_id, sha)
        marker = target / SNAPSHOT_MARKER
        want = {"repo_id": repo_id, "sha": sha, "model_dir": model_dir}
        if marker.is_file():
            try:
                have = json.loads(marker.read_text())
            except ValueError:
                have = {}
            if {k: have.get(k) for k in want} == want:
                return target
        hub.download_branch(repo_id, branch, sha, model_dir=model_dir, local_dir=target,
                            max_workers=self.max_workers, endpoint=self.endpoint)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**want, "branch": branch}))
        os.replace(tmp, marker)
        return target


class DatasetsResource(dg.ConfigurableResource):
    """Where partitions come from: configs/*.yaml (local folders, Hub branches) and the Hub watch file."""

    configs_dir: str = Field(default=str(DEFAULT_CONFIGS_DIR), description="run configs (configs/*.yaml)")
    watch_file: Optional[str] = Field(default=None,
                                      description="Hub repos to watch; default <configs_dir>/dagster/hub_repos.yaml")

    def registry(self) -> DatasetRegistry:
        return DatasetRegistry(self.configs_dir, self.watch_file)

    def entry(self, key: str, repo_hint: str | None = None) -> DatasetEntry:
        return self.registry().get(key, repo_hint)

    @property
    def plot_configs_dir(self) -> Path:
        return Path(self.configs_dir) / "plots"


def default_resources() -> dict:
    """Resources from the environment (PLASTICITY_* variables), else the project's data/results folders."""
    env = os.environ
    return {
        "warehouse": WarehouseResource(
            # the rule of every command (`choose_warehouse`): $PLASTICITY_WAREHOUSE, else data/warehouse.duckdb
            # (here under the project, as Dagster's working folder may be anywhere)
            path=choose_warehouse(None)[0] if os.environ.get(WAREHOUSE_ENV) else str(DEFAULT_WAREHOUSE),
            exports_dir=env.get("PLASTICITY_EXPORTS_DIR") or str(DEFAULT_EXPORTS_DIR),
        ),
        "hub": HubResource(download_dir=env.get("PLASTICITY_HUB_DIR") or str(DEFAULT_HUB_DIR)),
        "datasets": DatasetsResource(
            configs_dir=env.get("PLASTICITY_CONFIGS_DIR") or str(DEFAULT_CONFIGS_DIR),
            watch_file=env.get("PLASTICITY_WATCH_FILE") or None,
        ),
    }
