"""`plasticity ui`: the Dagster UI on this project, ready for the demo.

1. DAGSTER_HOME: ``--dagster-home``, else $DAGSTER_HOME, else ``.dagster_home/`` in the
   project; a dagster.yaml is written there when missing.
2. The demo dataset (``configs/synthetic-demo.yaml`` -> data/demo/synthetic-demo)
   is generated when missing.
3. Every local dataset of configs/*.yaml whose folder exists gets its partition
   (the demo's is ``synthetic-demo``), and its family (``family`` key) a `families` partition.
4. Then ``dagster dev`` (webserver + daemon + code server, so sensors, schedules
   and queued runs work) runs on 127.0.0.1, or with ``--webserver-only``
   ``dagster-webserver`` alone (runs launch directly; no sensors/schedules), as a
   child in its own process group that this process supervises: SIGINT (Ctrl-C),
   SIGTERM or SIGHUP stop it with every process it started (`supervise`), also
   when `plasticity ui` runs in the background of a script, where SIGINT starts
   out ignored; if this process is killed outright, Linux interrupts the child.

Dagster is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dagster_project.registry import DEMO_MODEL, PROJECT_ROOT
from warehouse.settings.options import add_arguments, option
from warehouse.run.processes import alive, descendants, kill_all, set_parent_death_signal

DEFINITIONS_MODULE = "dagster_project.definitions"
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"

DEFAULT_MAX_CONCURRENT_RUNS = 2

DAGSTER_YAML_DEV = """\
# Written by `plasticity ui` (edit freely; `plasticity ui --max-concurrent-runs N` rewrites it only
# while it is unedited). Runs wait in Dagster's run queue; the daemon that `dagster dev` starts
# launches at most max_concurrent_runs at once and never two runs of one partition (one model, or
# one family) together, so no two runs write one model's warehouse file at the same time. Each run
# computes its heads in its own process pool (max_workers): runs x workers is the CPU load.
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: {max_concurrent_runs}
    dequeue_interval_seconds: 2
    tag_concurrency_limits:
      - key: dagster/partition
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""
# What versions before the family work wrote (recognised as unedited, so it can be rewritten).
_DAGSTER_YAML_DEV_BEFORE = """\
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


@dataclass
class UiOptions:
    host: str = option("127.0.0.1", help="interface the webserver listens on")
    port: int = option(3000, ge=1, le=65535, help="webserver port")
    dagster_home: str | None = option(None, help="Dagster instance folder", accepts="a folder",
                                      default_text="$DAGSTER_HOME, else .dagster_home/ in the project")
    no_demo: bool = option(False, switch=True, help="do not generate the demo dataset")
    webserver_only: bool = option(False, switch=True,
                                  help="run dagster-webserver without the daemon (no sensors, schedules or run queue)")
    prepare_only: bool = option(False, switch=True,
                                help="set up DAGSTER_HOME, the demo dataset and the partitions, then exit")
    stop_timeout_s: float = option(20.0, ge=0, help="on SIGINT/SIGTERM, seconds Dagster gets to shut down "
                                                    "before its processes are killed")
    max_concurrent_runs: int | None = option(
        None, ge=1, help="runs the daemon launches at once (one per model or family at a time); written to "
                         "DAGSTER_HOME/dagster.yaml", default_text=f"{DEFAULT_MAX_CONCURRENT_RUNS}, or what an "
                                                                   "existing dagster.yaml says")


def add_ui_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project with the demo dataset ready")
    add_arguments(p, UiOptions)
    p.set_defaults(func=cmd_ui)
    return p


def dagster_home(flag: str | None) -> Path:
    home = Path(flag or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def dev_instance_yaml(max_concurrent_runs: int = DEFAULT_MAX_CONCURRENT_RUNS) -> str:
    """The dagster.yaml `plasticity ui` writes: the run queue with its limits."""
    return DAGSTER_YAML_DEV.format(max_concurrent_runs=int(max_concurrent_runs))


def _unedited(text: str) -> bool:
    """Whether `text` is a dagster.yaml exactly as some version of `plasticity ui` wrote it."""
    if text == _DAGSTER_YAML_DEV_BEFORE:
        return True
    found = re.search(r"^    max_concurrent_runs: (\d+)$", text, re.M)
    return found is not None and text == dev_instance_yaml(int(found.group(1)))


def write_instance_yaml(home: Path, webserver_only: bool, max_concurrent_runs: int | None = None) -> Path:
    """DAGSTER_HOME/dagster.yaml: written when missing; with `max_concurrent_runs`, rewritten while it is as
    `plasticity ui` wrote it (an edited file is the user's: ValueError asking to edit it there)."""
    path = home / "dagster.yaml"
    if not path.exists():
        path.write_text(DAGSTER_YAML_WEBSERVER_ONLY if webserver_only
                        else dev_instance_yaml(max_concurrent_runs or DEFAULT_MAX_CONCURRENT_RUNS))
    elif max_concurrent_runs is not None and not webserver_only:
        text = path.read_text()
        if text != dev_instance_yaml(max_concurrent_runs):
            if not _unedited(text):
                raise ValueError(f"{path} was edited (or not written by plasticity ui): set max_concurrent_runs "
                                 "under run_coordinator.config there, or remove the file")
            path.write_text(dev_instance_yaml(max_concurrent_runs))
    elif webserver_only and "DefaultRunCoordinator" not in path.read_text():
        print(f"warning: {path} does not set DefaultRunCoordinator; without the daemon, launched runs stay "
              "queued. Use `plasticity ui` (dagster dev) or another DAGSTER_HOME.", file=sys.stderr)
    return path


def prepare(home: Path, *, demo: bool = True, configs_dir: str | None = None) -> list[str]:
    """Demo dataset + partitions of the local datasets in the instance at `home`; returns the partition keys."""
    from dagster import DagsterInstance

    from dagster_project.partitions import FAMILIES_PARTITIONS_NAME, MODELS_PARTITIONS_NAME
    from dagster_project.registry import DatasetRegistry
    from dagster_project.steps import ensure_local_dataset, has_shards

    registry = DatasetRegistry(configs_dir or os.environ.get("PLASTICITY_CONFIGS_DIR") or PROJECT_ROOT / "configs",
                               os.environ.get("PLASTICITY_WATCH_FILE") or None)
    keys, families = [], []
    for entry in registry.local_entries():
        cfg = entry.run_config()
        if demo and entry.key == DEMO_MODEL and not has_shards(Path(entry.local_root), cfg.model_dir):
            print(f"generating the demo dataset in {entry.local_root} ...")
            ensure_local_dataset(entry, cfg)
        if has_shards(Path(entry.local_root), cfg.model_dir):
            keys.append(entry.key)
            if cfg.family is not None and cfg.family not in families:
                families.append(cfg.family)
    with DagsterInstance.from_config(str(home)) as instance:
        for name, wanted in ((MODELS_PARTITIONS_NAME, keys), (FAMILIES_PARTITIONS_NAME, families)):
            present = set(instance.get_dynamic_partitions(name))
            new = [k for k in wanted if k not in present]
            if new:
                instance.add_dynamic_partitions(name, new)
    return keys


def command(args: argparse.Namespace) -> list[str]:
    if args.webserver_only:
        cmd = [sys.executable, "-m", "dagster_webserver"]
    else:
        cmd = [sys.executable, "-m", "dagster", "dev"]
    return cmd + ["-m", DEFINITIONS_MODULE, "-d", str(PROJECT_ROOT), "-h", args.host, "-p", str(args.port)]


def cmd_ui(args: argparse.Namespace) -> int:
    home = dagster_home(args.dagster_home)
    write_instance_yaml(home, args.webserver_only, args.max_concurrent_runs)
    keys = prepare(home, demo=not args.no_demo)
    print(f"DAGSTER_HOME={home}\npartitions: {', '.join(keys) or 'none'}")
    if args.prepare_only:
        return 0
    cmd = command(args)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    print(f"starting: {' '.join(cmd[1:])}\nopen http://{args.host}:{args.port}", flush=True)
    sys.stderr.flush()
    return supervise(cmd, env, cwd=PROJECT_ROOT, stop_timeout_s=args.stop_timeout_s)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _start_child() -> None:
    """In the forked child, before exec: SIGINT from the kernel if this supervisor dies without cleaning
    up (SIGKILL). (SIGINT itself is back to its default in the child even when a script started us in
    the background with SIGINT ignored: we catch it, and exec resets caught signals.)"""
    set_parent_death_signal(signal.SIGINT)


def supervise(cmd: list[str], env: dict, cwd: Path, stop_timeout_s: float = 20.0) -> int:
    """Run `cmd` (Dagster) in its own process group until it exits or we get SIGINT/SIGTERM/SIGHUP.

    On a signal the child gets SIGINT (Dagster's graceful shutdown: it stops its webserver, daemon
    and code servers), then `stop_timeout_s` to finish; whatever of its process tree (as it was when
    the signal came) or its process group is still running after that is killed. Returns the child's
    exit status, or 0 after a requested stop."""
    stop: list[int] = []

    def request_stop(signum, frame) -> None:
        stop.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, preexec_fn=_start_child)
        while proc.poll() is None and not stop:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        tree = descendants(proc.pid)
        if proc.poll() is None:
            print(f"plasticity ui: stopping Dagster (signal {stop[0]}) ...", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                print(f"plasticity ui: Dagster did not stop within {stop_timeout_s:g}s; killing it",
                      file=sys.stderr, flush=True)
        _end_group(proc, tree, stop_timeout_s)
        return 0 if stop else proc.returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_group(proc: subprocess.Popen, tree: dict[int, int], grace_s: float) -> None:
    """Kill what is left of the child's process group and of its tree (snapshot `tree`), then reap it."""
    deadline = time.monotonic() + min(grace_s, 5.0)
    while alive(tree) and time.monotonic() < deadline and proc.poll() is not None:
        time.sleep(0.1)  # children of a stopped Dagster get a moment to exit on their own
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_all(tree)
    proc.wait()
