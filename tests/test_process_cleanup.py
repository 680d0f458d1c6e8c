"""No process outlives the one that started it: pool workers after a SIGKILL of the run, `plasticity ui`'s
Dagster processes after SIGTERM or SIGINT. Real processes, real signals; /proc tells what still runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from warehouse.run.processes import alive, descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _wait_until(predicate, timeout_s: float, step_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


@contextmanager
def running(argv: list[str], **popen):
    """A started process; it and every process of its `.tree` (filled in by the test) are killed at the end,
    whatever happened."""
    proc = subprocess.Popen(argv, **{"env": ENV, **popen})
    proc.tree = {}
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(proc.tree):
            os.kill(pid, signal.SIGKILL)


def supervised(child_code: str, *child_args: str, stop_timeout_s: float) -> list[str]:
    """A command running `plasticity ui`'s supervisor on a Python child program."""
    runner = (f"import os, sys; from pathlib import Path; from cli.ui import supervise; "
              f"sys.exit(supervise([sys.executable, '-c', {child_code!r}, *{list(child_args)!r}], dict(os.environ), "
              f"Path('.'), stop_timeout_s={stop_timeout_s!r}))")
    return [sys.executable, "-c", runner]


def _slow_dataset(root: Path) -> Path:
    from plasticity.synthetic import SyntheticSpec
    from warehouse.sources.demo_data import write_synthetic_dataset

    spec = SyntheticSpec(model="slow", num_layers=6, num_q_heads=4, num_k_heads=2, head_dim=16, num_examples=12,
                         seq_len=1024, bucket_size=64, sliding_windows={}, seed=2)
    return write_synthetic_dataset(root, spec, with_truth=False)


def test_workers_exit_when_the_run_is_killed(tmp_path):
    data = _slow_dataset(tmp_path / "slow")
    argv = [sys.executable, "-m", "cli.main", "analyze", "--dataset_local_root", str(data),
            "--warehouse", str(tmp_path / "wh.duckdb"), "--output_dir", str(tmp_path / "out"), "--max_workers", "2",
            "--quiet"]
    with running(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        def started_workers():
            # scipy is imported by the warm-up task, which runs after the worker initializer
            found = {p: t for p, t in descendants(proc.pid).items()
                     if "multiprocessing" in _cmdline(p) and "/scipy/" in _maps(p)}
            return found if len(found) >= 2 else None

        proc.tree = _wait_until(started_workers, 90)
        assert proc.tree, f"no worker processes appeared: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        gone = _wait_until(lambda: not alive(proc.tree), 5.0, 0.05)
        assert gone, f"workers still running 5 s after the run was killed: {alive(proc.tree)}"
        print(f"workers gone {time.monotonic() - t0:.2f} s after SIGKILL")


ORPHAN = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import os, sys, time\\n"
        "from warehouse.run import processes\\n"
        "if sys.argv[1] == 'watch':\\n"
        "    processes.watch_parent(os.getppid())\\n"
        "else:\\n"
        "    assert processes.set_parent_death_signal()\\n"
        "print('armed', flush=True)\\n"
        "time.sleep(120)\\n", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "armed"
    print(child.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("mechanism", ["watch", "pdeathsig"])
def test_an_orphaned_child_ends(mechanism, tmp_path):
    """Each mechanism alone: the portable parent watch, and Linux's parent-death signal."""
    if mechanism == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    with running([sys.executable, "-c", ORPHAN, mechanism], stdout=subprocess.PIPE, text=True) as middle:
        child_pid = int(middle.stdout.readline())
        middle.tree = {child_pid: descendants(middle.pid)[child_pid]}
        time.sleep(0.8)
        assert alive(middle.tree)  # still running while its parent lives
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(10)
        assert _wait_until(lambda: not alive(middle.tree), 5.0, 0.05), "the orphan kept running"


# --------------------------------------------------------------------------- plasticity ui

STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ignore_sigint() -> None:  # pragma: no cover -- runs in the child before exec
    """What a non-interactive shell does to a background job (`plasticity ui &`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ui_in_the_background_stops_on_sigterm_with_all_its_processes(tmp_path):
    """The real `plasticity ui` (dagster dev: webserver, daemon, code server), started the way a script's
    `plasticity ui &` is (SIGINT ignored), stopped with SIGTERM. SIGINT takes the same path
    (`test_supervise_stops_on_sigint_even_if_started_ignoring_it`)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    port = _free_port()
    env = {k: v for k, v in ENV.items() if not k.startswith(("DAGSTER_", "PLASTICITY_"))}
    env.update(PLASTICITY_CONFIGS_DIR=str(configs), PLASTICITY_WAREHOUSE=str(tmp_path / "wh.duckdb"),
               PLASTICITY_EXPORTS_DIR=str(tmp_path / "results"), DAGSTER_DISABLE_TELEMETRY="1")
    log = tmp_path / "ui.log"
    argv = [sys.executable, "-m", "cli.main", "ui", "--no-demo", "--port", str(port),
            "--dagster-home", str(tmp_path / "home")]
    with open(log, "wb") as out, running(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_ignore_sigint) as ui:
        def ready() -> bool:
            assert ui.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        assert _wait_until(ready, STARTUP_TIMEOUT_S, 0.5), log.read_text()[-4000:]
        wanted = ("dagster dev", "dagster_webserver", "_daemon", "grpc")

        def full_tree():
            found = descendants(ui.pid)
            commands = " | ".join(_cmdline(p) for p in found)
            return found if all(w in commands for w in wanted) else None

        ui.tree = _wait_until(full_tree, 60, 0.5)  # the webserver, the daemon and the code server are up
        assert ui.tree, {p: _cmdline(p) for p in descendants(ui.pid)}
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert _wait_until(lambda: not alive(ui.tree), 10, 0.1), {p: _cmdline(p) for p in alive(ui.tree)}
        assert "did not stop within" not in log.read_text()  # Dagster shut itself down, nothing was killed
        with pytest.raises((urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)


STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    pids = open(sys.argv[1], "a")
    def sleeper(**kw):
        p = subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"], **kw)
        pids.write(f"{p.pid}\\n"); pids.flush()
    def on_interrupt(signum, frame):
        sleeper()  # started after the stop request: only the process group knows it
    signal.signal(signal.SIGINT, on_interrupt)
    sleeper(start_new_session=True)  # left the process group: only the process tree knows it
    pids.write("ready\\n"); pids.flush()
    while True:
        time.sleep(1)
""")


def test_supervise_kills_what_does_not_stop_in_time(tmp_path):
    """`plasticity ui`'s supervisor with a child that ignores the stop request: after the grace period its
    whole process group and tree are killed, including a process that left the group."""
    pid_file = tmp_path / "pids"
    pid_file.write_text("")
    with running(supervised(STUBBORN, str(pid_file), stop_timeout_s=1.0), cwd=tmp_path, stderr=subprocess.PIPE,
                 text=True) as sup:
        assert _wait_until(lambda: "ready" in pid_file.read_text(), 60, 0.1), sup.stderr.read()
        sup.tree = descendants(sup.pid)
        assert len(sup.tree) == 2  # the child and the sleeper that left the group
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        late = [int(line) for line in pid_file.read_text().split() if line.isdigit()]
        assert len(late) == 2
        gone = _wait_until(lambda: not alive(sup.tree) and all(not Path(f"/proc/{p}/stat").exists()
                                                               or " Z " in Path(f"/proc/{p}/stat").read_text()
                                                               for p in late), 5, 0.05)
        assert gone, (alive(sup.tree), late)
        assert "did not stop within 1s; killing it" in sup.stderr.read()


COOPERATIVE = textwrap.dedent("""
    import subprocess, sys, time
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(helper.pid, flush=True)
    try:
        time.sleep(120)
    except KeyboardInterrupt:  # what dagster dev does on SIGINT: stop its own processes, then exit
        helper.terminate()
        helper.wait()
        print("stopped", flush=True)
""")


def test_supervise_stops_on_sigint_even_if_started_ignoring_it(tmp_path):
    """`plasticity ui &` from a script starts with SIGINT ignored; SIGINT must still stop it, and the child
    must get a SIGINT it acts on (graceful: nothing left to kill)."""
    with running(supervised(COOPERATIVE, stop_timeout_s=30.0), cwd=tmp_path, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint) as sup:
        helper = int(sup.stdout.readline())
        sup.tree = _wait_until(lambda: (lambda t: t if helper in t else None)(descendants(sup.pid)), 10, 0.05)
        assert len(sup.tree) == 2
        sup.send_signal(signal.SIGINT)
        out, err = sup.communicate(timeout=30)
        assert sup.returncode == 0 and out.strip() == "stopped", err
        assert "did not stop within" not in err
        assert _wait_until(lambda: not alive(sup.tree), 5, 0.05)
