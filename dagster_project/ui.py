"""`plasticity ui`: the Dagster UI on this project, ready for the demo.

1. DAGSTER_HOME: ``--dagster-home``, else $DAGSTER_HOME, else ``.dagster_home/`` in the
   project; a dagster.yaml is written there when missing.
2. The demo dataset (``configs/synthetic-demo.yaml`` -> data/demo/synthetic-demo)
   is generated when missing.
3. Every local dataset of configs/*.yaml whose folder exists gets its partition
   (the demo's is ``synthetic-demo``).
4. Then this process becomes ``dagster dev`` (webserver + daemon, so sensors,
   schedules and queued runs work) on 127.0.0.1, or with ``--webserver-only``
   ``dagster-webserver`` alone (runs launch directly; no sensors/schedules).

Dagster is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dagster_project.registry import DEMO_MODEL, PROJECT_ROOT

DEFINITIONS_MODULE = "dagster_project.definitions"
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"

DAGSTER_YAML_DEV = """\
# Written by `plasticity ui` (edit freely). Runs are queued and launched by the
# daemon that `dagster dev` starts; one model analysis at a time, since each one
# already uses every CPU through its own process pool.
telemetry:
  enabled: false
run_queue:
  max_concurrent_runs: 4
  tag_concurrency_limits:
    - key: plasticity/job
      value: analyze
      limit: 1
"""

DAGSTER_YAML_WEBSERVER_ONLY = """\
# Written by `plasticity ui --webserver-only` (edit freely). No daemon runs, so
# runs launch directly instead of being queued.
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
"""


def add_ui_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project with the demo dataset ready")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--dagster-home", default=None,
                   help="Dagster instance folder (default $DAGSTER_HOME, else .dagster_home/ in the project)")
    p.add_argument("--no-demo", action="store_true", help="do not generate the demo dataset")
    p.add_argument("--webserver-only", action="store_true",
                   help="run dagster-webserver without the daemon (no sensors, schedules or run queue)")
    p.add_argument("--prepare-only", action="store_true",
                   help="set up DAGSTER_HOME, the demo dataset and the partitions, then exit")
    p.set_defaults(func=cmd_ui)
    return p


def dagster_home(flag: str | None) -> Path:
    home = Path(flag or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def write_instance_yaml(home: Path, webserver_only: bool) -> Path:
    path = home / "dagster.yaml"
    if not path.exists():
        path.write_text(DAGSTER_YAML_WEBSERVER_ONLY if webserver_only else DAGSTER_YAML_DEV)
    elif webserver_only and "DefaultRunCoordinator" not in path.read_text():
        print(f"warning: {path} does not set DefaultRunCoordinator; without the daemon, launched runs stay "
              "queued. Use `plasticity ui` (dagster dev) or another DAGSTER_HOME.", file=sys.stderr)
    return path


def prepare(home: Path, *, demo: bool = True, configs_dir: str | None = None) -> list[str]:
    """Demo dataset + partitions of the local datasets in the instance at `home`; returns the partition keys."""
    from dagster import DagsterInstance

    from dagster_project.partitions import MODELS_PARTITIONS_NAME
    from dagster_project.registry import DatasetRegistry
    from dagster_project.steps import ensure_local_dataset, has_shards

    registry = DatasetRegistry(configs_dir or os.environ.get("PLASTICITY_CONFIGS_DIR") or PROJECT_ROOT / "configs",
                               os.environ.get("PLASTICITY_WATCH_FILE") or None)
    keys = []
    for entry in registry.local_entries():
        cfg = entry.run_config()
        if demo and entry.key == DEMO_MODEL and not has_shards(Path(entry.local_root), cfg.model_dir):
            print(f"generating the demo dataset in {entry.local_root} ...")
            ensure_local_dataset(entry, cfg)
        if has_shards(Path(entry.local_root), cfg.model_dir):
            keys.append(entry.key)
    with DagsterInstance.from_config(str(home)) as instance:
        present = set(instance.get_dynamic_partitions(MODELS_PARTITIONS_NAME))
        new = [k for k in keys if k not in present]
        if new:
            instance.add_dynamic_partitions(MODELS_PARTITIONS_NAME, new)
    return keys


def command(args: argparse.Namespace) -> list[str]:
    if args.webserver_only:
        cmd = [sys.executable, "-m", "dagster_webserver"]
    else:
        cmd = [sys.executable, "-m", "dagster", "dev"]
    return cmd + ["-m", DEFINITIONS_MODULE, "-d", str(PROJECT_ROOT), "-h", args.host, "-p", str(args.port)]


def cmd_ui(args: argparse.Namespace) -> int:
    home = dagster_home(args.dagster_home)
    write_instance_yaml(home, args.webserver_only)
    keys = prepare(home, demo=not args.no_demo)
    print(f"DAGSTER_HOME={home}\npartitions: {', '.join(keys) or 'none'}")
    if args.prepare_only:
        return 0
    cmd = command(args)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    print(f"starting: {' '.join(cmd[1:])}\nopen http://{args.host}:{args.port}", flush=True)
    sys.stderr.flush()
    os.chdir(PROJECT_ROOT)
    os.execve(sys.executable, cmd, env)  # this process becomes the Dagster server (signals reach it directly)
    return 0  # pragma: no cover
