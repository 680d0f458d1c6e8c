"""Runs side by side on a real Dagster instance: the run queue of `plasticity ui`'s dagster.yaml, a real
`dagster-daemon` process, one warehouse file per model.

Three checkpoints of a synthetic family are submitted at once (a backfill of `analyze_model_job`), plus a
second run of the first checkpoint (`dagster job launch`). The daemon launches at most three runs at a time
and never two of one model together; the family's trajectory is then refreshed by declarative automation
(the `family_trajectory_automation` sensor, on by default). Checked: every run succeeded, different models
ran at the same time, the two runs of one model did not, no run or daemon log mentions a lock error, there
is one warehouse file per model, and the trajectory (through `plasticity sql` over the files, and the
asset) holds all three checkpoints. Prints the wall time and the lock waits the runs recorded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from cli.main import main
from cli.ui import _end_group, dev_instance_yaml, prepare
from plasticity.synthetic import FamilySpec, SyntheticSpec
from warehouse.sources.demo_data import write_synthetic_family
from warehouse.run.processes import alive, descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="cleans up the daemon's process tree "
                                                                             "through /proc")

REPO = Path(__file__).resolve().parents[1]
FAMILY = FamilySpec(
    family="qfam", steps=(100, 1000, 10000), stages=("s1", "s1", "s2"), layer_rates=(0.25, -0.25),
    head_scales=(0.2, 0.4),
    base=SyntheticSpec(model="qfam", num_layers=2, num_q_heads=2, num_k_heads=1, head_dim=4, num_examples=2,
                       seq_len=64, bucket_size=16, sliding_windows={}, seed=0))
MODELS = [FAMILY.model(s) for s in FAMILY.steps]
LOCK_WORDS = ("locked by another process", "WarehouseBusy", "Could not set lock", "Conflicting lock")
TIMEOUT_S = 300


@contextmanager
def daemon(env: dict, cwd: Path, log: Path):
    """`dagster-daemon run` on the project in its own process group; stopped (SIGTERM, then whatever is left
    of its process tree killed) at the end, whatever happened."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-m", "dagster_project.definitions",
                                 "-d", str(REPO)], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        tree = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _end_group(proc, tree, 5.0)
        assert not alive(tree), f"left running: {alive(tree)}"


def dagster_cli(*args: str, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dagster", *args, "-m", "dagster_project.definitions",
                             "-d", str(REPO)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(instance) -> tuple[bool, list]:
    runs = instance.get_runs()
    models = [r for r in runs if r.job_name == "analyze_model_job"]
    family = instance.get_latest_materialization_event(dg.AssetKey("family_trajectory"))
    complete = (family is not None and family.asset_materialization.metadata["checkpoints"].value == len(MODELS))
    done = len(models) == len(MODELS) + 1 and all(r.is_finished for r in runs) and complete
    return done, runs


def overlap(a, b) -> bool:
    return a.start_time < b.end_time and b.start_time < a.end_time


def test_three_checkpoints_queued_at_once_run_side_by_side(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    for step, folder in write_synthetic_family(tmp_path / "data", FAMILY, with_truth=False).items():
        (configs / f"{FAMILY.model(step)}.yaml").write_text(
            f"model: {FAMILY.model(step)}\ndataset_local_root: {folder}\nfamily: {FAMILY.family}\nstep: {step}\n"
            f"stage: {FAMILY.stage(step)}\nattention: false\nmax_workers: 1\n")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(dev_instance_yaml(3))
    template = str(tmp_path / "wh" / "{model}.duckdb")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PLASTICITY_WAREHOUSE": template,
           "PLASTICITY_EXPORTS_DIR": str(tmp_path / "results"), "PLASTICITY_CONFIGS_DIR": str(configs),
           "PLASTICITY_HUB_DIR": str(tmp_path / "hub"), "PYTHONPATH": str(REPO)}
    env.pop("PLASTICITY_WATCH_FILE", None)
    assert sorted(prepare(home, demo=False, configs_dir=str(configs))) == sorted(MODELS)

    started = time.monotonic()
    with daemon(env, tmp_path, tmp_path / "daemon.log"):
        submit = [dagster_cli("job", "backfill", "-j", "analyze_model_job", "--partitions", ",".join(MODELS),
                              "--noprompt", env=env, cwd=tmp_path),
                  dagster_cli("job", "launch", "-j", "analyze_model_job", "-o", "shard_catalog", "--tags",
                              json.dumps({"dagster/partition": MODELS[0]}), env=env, cwd=tmp_path)]
        for proc in submit:
            output = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, output
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + TIMEOUT_S
            done, runs = finished(instance)
            while not done and time.monotonic() < deadline:
                time.sleep(1.0)
                done, runs = finished(instance)
            wall = time.monotonic() - started
            assert done, [(r.tags.get("dagster/partition"), r.job_name, r.status.value) for r in runs]
            records = {r.dagster_run.run_id: r for r in instance.get_run_records()}
            logs = "\n".join(str(e.message) + str(e.dagster_event and e.dagster_event.event_specific_data)
                             for r in runs for e in instance.all_logs(r.run_id))
            waits = [(e.asset_materialization.metadata["lock_waits"].value,
                      e.asset_materialization.metadata["lock_wait_s"].value)
                     for key in ("head_metrics", "family_trajectory")
                     for e in [rec.event_log_entry for rec in instance.fetch_materializations(
                         dg.AssetKey(key), limit=100).records]]
            family_event = instance.get_latest_materialization_event(dg.AssetKey("family_trajectory"))

    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.job_name, r.status) for r in runs]
    model_runs = [records[r.run_id] for r in runs if r.job_name == "analyze_model_job"]
    by_model: dict[str, list] = {}
    for rec in model_runs:
        by_model.setdefault(rec.dagster_run.tags["dagster/partition"], []).append(rec)
    assert sorted(by_model) == sorted(MODELS) and len(by_model[MODELS[0]]) == 2
    assert not overlap(*by_model[MODELS[0]]), "two runs of one model ran at the same time"
    assert any(overlap(a, b) for a in model_runs for b in model_runs
               if a.dagster_run.tags["dagster/partition"] != b.dagster_run.tags["dagster/partition"]), \
        "no two models ran at the same time"
    daemon_log = (tmp_path / "daemon.log").read_text()
    for word in LOCK_WORDS:
        assert word not in logs and word not in daemon_log, word
    assert sorted(p.name for p in (tmp_path / "wh").glob("*.duckdb")) == sorted(f"{m}.duckdb" for m in MODELS)

    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(["sql", "SELECT step, layer, n_heads, mean_ap FROM family_layer_trajectory ORDER BY step, layer",
                     "--warehouse", template, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(int(r["step"]), int(r["layer"]), int(r["n_heads"])) for r in rows] == [
        (s, layer, 2) for s in FAMILY.steps for layer in range(2)]
    meta = family_event.asset_materialization.metadata
    assert meta["steps"].value == list(FAMILY.steps) and meta["warehouse_files"].value == 3
    first = min(rec.start_time for rec in records.values())
    timeline = ", ".join(f"{rec.dagster_run.tags.get('dagster/partition')} {rec.start_time - first:.0f}-"
                         f"{rec.end_time - first:.0f}s" for rec in sorted(records.values(), key=lambda r: r.start_time))
    print(f"\nqueued family test: {len(runs)} runs ({timeline}), "
          f"wall {wall:.1f}s from submission to the complete trajectory; "
          f"lock waits recorded by {len(waits)} materializations: {sum(w[0] for w in waits)} waits, "
          f"{sum(w[1] for w in waits):.3f}s")
