"""`plasticity ui` serves the project: a real dagster-webserver on 127.0.0.1, driven through GraphQL.

The server is started by the `ui` command itself (`--webserver-only`, so no
daemon is needed for the run to launch) with the shipped configs, lists the assets and the demo
partition, and materialises the demo partition through `analyze_model_job` as the UI's button
does, with every setting at its default (part of the defaults matrix, tests/test_defaults_matrix.py).
The whole process group is always killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from warehouse.store import db
from warehouse.sources.demo_data import write_synthetic_dataset

try:
    from tests.test_dagster_assets import EXPECTED_ASSETS
except ImportError:  # pragma: no cover
    from test_dagster_assets import EXPECTED_ASSETS

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90
RUN_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, env: dict, demo: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = tmp / "ui.out", tmp / "ui.err"
        cmd = [sys.executable, "-m", "cli.main", "ui", "--webserver-only", *([] if demo else ["--no-demo"]),
               "--port", str(self.port), "--dagster-home", str(tmp / "dagster_home")]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
                                         start_new_session=True)  # its own process group, killed as one

    def logs(self) -> str:
        return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-6000:]}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`plasticity ui` exited with {self.proc.returncode}\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        pytest.fail(f"webserver not ready after {STARTUP_TIMEOUT_S}s\n{self.logs()}")

    def gql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        assert "errors" not in data, data
        return data["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group we created: webserver + code server
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group (code server, run worker)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


LAUNCH = """
mutation($p: ExecutionParams!) {
  launchRun(executionParams: $p) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""

MATERIALIZATIONS = """
query($key: [String!]!, $part: String!) {
  assetOrError(assetKey: {path: $key}) {
    ... on Asset {
      assetMaterializations(partitions: [$part]) {
        partition runId
        metadataEntries { label ... on IntMetadataEntry { intValue } ... on MarkdownMetadataEntry { mdStr } }
      }
    }
  }
}"""


def test_ui_lists_assets_and_materializes_the_demo_partition(tmp_path, demo_dataset):
    """The UI's "Materialize all" on the shipped demo with the shipped configs (unmodified, so
    `attention: auto`): every step succeeds and the stored rows satisfy their definitions."""
    try:
        from tests.test_defaults_matrix import DEMO, check_exports, check_stored_rows, shipped_configs
    except ImportError:  # pragma: no cover
        from test_defaults_matrix import DEMO, check_exports, check_stored_rows, shipped_configs

    configs = shipped_configs(tmp_path / "configs", {})
    # the shipped config names data/demo/synthetic-demo below the project: here, below tmp_path
    shutil.copytree(demo_dataset, tmp_path / "data" / "demo" / DEMO)
    warehouse = tmp_path / "warehouse.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "PLASTICITY_"))}
    env.update(
        PLASTICITY_CONFIGS_DIR=str(configs), PLASTICITY_WAREHOUSE=str(warehouse),
        PLASTICITY_EXPORTS_DIR=str(tmp_path / "results"), PLASTICITY_HUB_DIR=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
    )
    # `plasticity ui` as a user starts it (its demo step finds the dataset and keeps it); the
    # webserver alone (no daemon), so the launched run starts without a run queue
    server = Server(tmp_path, env, demo=True)
    try:
        server.wait_ready()
        repo = server.gql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
        (node,) = repo["repositoriesOrError"]["nodes"]
        nodes = server.gql("{ assetNodes { assetKey { path } partitionKeys } }")["assetNodes"]
        listed = {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in nodes}
        assert EXPECTED_ASSETS <= set(listed), server.logs()
        assert listed["shard_catalog"] == [DEMO]  # registered by `plasticity ui`
        assert listed["model_comparison_plot"] == []

        params = {
            "selector": {"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"],
                         "jobName": "analyze_model_job"},
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": DEMO}]},
        }
        launched = server.gql(LAUNCH, {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline, status = time.monotonic() + RUN_TIMEOUT_S, None
        while time.monotonic() < deadline:
            status = server.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                                {"id": run_id})["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(1)
        assert status == "SUCCESS", f"run {run_id} ended {status}\n{server.logs()}"
        steps = server.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { stepStats { stepKey status } } } }",
                           {"id": run_id})["runOrError"]["stepStats"]
        assert steps and all(s["status"] == "SUCCESS" for s in steps), steps

        mats = server.gql(MATERIALIZATIONS, {"key": ["head_metrics"], "part": DEMO})
        (mat,) = mats["assetOrError"]["assetMaterializations"]
        assert mat["runId"] == run_id and mat["partition"] == DEMO
        entries = {e["label"]: e for e in mat["metadataEntries"]}
        assert entries["dagster/row_count"]["intValue"] == 16
        assert entries["preview"]["mdStr"].startswith("| layer | q_head")
        plot = server.gql(MATERIALIZATIONS, {"key": ["bucket_heatmap_plot"], "part": DEMO})
        (pmat,) = plot["assetOrError"]["assetMaterializations"]
        assert any(e.get("mdStr", "").startswith("![heatmap](data:image/png;base64,") for e in pmat["metadataEntries"])
        exports = server.gql(MATERIALIZATIONS, {"key": ["csv_exports"], "part": DEMO})
        (emat,) = exports["assetOrError"]["assetMaterializations"]
        counts = {e["label"]: e.get("intValue") for e in emat["metadataEntries"]}
    finally:
        server.stop()
    got = check_stored_rows(warehouse, DEMO, tmp_path / "data" / "demo" / DEMO)
    assert got["statuses"] == ["exact"] and counts["rows_token_attention"] == got["tokens"] > 0
    check_exports(tmp_path / "results" / DEMO / got["run_id"], warehouse, DEMO, got["run_id"])
