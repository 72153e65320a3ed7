"""Process hygiene: everything a federated run starts is stopped, with its whole tree."""

import re
import sys
import time

from federated.launch import processes as launcher
from federated.launch import watchdog


def _alive(pid):
    return launcher.alive(pid)


def test_stop_ends_a_process_and_the_children_it_spawned(tmp_path):
    procs = launcher.Processes(tmp_path, env=launcher.flower_env(tmp_path / "home"))
    # A parent that starts a grandchild in a new session (as Ray's raylet does) and ignores SIGTERM.
    code = (
        "import subprocess, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)"
    )
    parent = procs.start("tree", [sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not launcher.descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = launcher.descendants(parent.pid)
    assert children
    procs.stop(timeout_s=1.0)
    assert not _alive(parent.pid)
    assert not any(_alive(c) for c in children)


def test_flower_env_keeps_flower_to_itself(tmp_path):
    env = launcher.flower_env(tmp_path / "home", ray_tmp=tmp_path / "ray")
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(":")[0] == str(launcher.Path(sys.executable).parent)  # `flwr run` finds flower-superlink


def test_connection_file_is_what_flwr_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    launcher.write_connection(tmp_path, "sim", address="127.0.0.1:5555")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection(None)
    assert (conn.name, conn.address, conn.insecure) == ("sim", "127.0.0.1:5555", True)


_ORPHAN_PARENT = """
import sys, time
from pathlib import Path
from federated.launch import processes as launcher
work = Path(sys.argv[1])
procs = launcher.Processes(work / "logs", env=launcher.flower_env(work / "home"))
# A child that starts a grandchild in a new session (as Ray does): PDEATHSIG covers the child only.
code = ("import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); time.sleep(120)")
procs.start("tree", [sys.executable, "-c", code])
print(procs.token, flush=True)
time.sleep(120)
"""


def test_kill_9_of_the_parent_ends_children_and_reparented_grandchildren(tmp_path):
    import os
    import signal
    import subprocess

    root = launcher.REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=root
    )
    try:
        token = parent.stdout.readline().strip()
        assert token
        deadline = time.monotonic() + 15
        while len(launcher.pids_with_token(token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        run_pids = launcher.pids_with_token(token)
        assert len(run_pids) == 2  # child and grandchild, both marked with the run token
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        t0 = time.monotonic()
        while launcher.pids_with_token(token) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert launcher.pids_with_token(token) == [], "processes of the run outlived its parent"
        assert not any(_alive(p) for p in run_pids)
        log_file = tmp_path / "logs" / "watchdog.log"
        while "killed" not in log_file.read_text() and time.monotonic() - t0 < 10:
            time.sleep(0.1)  # the watchdog sweeps a little longer before it reports
        assert re.search(r"killed [12] process", log_file.read_text())  # the grandchild (PDEATHSIG took the child)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in launcher.pids_with_token(token) if token else []:
            os.kill(pid, signal.SIGKILL)


def test_stop_also_ends_the_watchdog_and_records_the_tree_memory(tmp_path):
    procs = launcher.Processes(tmp_path, env=launcher.flower_env(tmp_path / "home"))
    child = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(1.2)  # at least two samples of the memory sampler
    watchdog = procs.watchdog
    procs.stop(timeout_s=1.0)
    assert not _alive(child.pid) and not _alive(watchdog.pid)
    # The tree held this interpreter and a second one: more than this process alone.
    assert launcher.peak_tree_rss_mb() > launcher.tree_rss_bytes() / 2**20


def test_staged_app_bundles_exactly_what_the_repository_root_does(tmp_path):
    # `flwr run` submits the staged folder (launcher.stage_app): its bundle must be the repository's, byte
    # for byte (same files, same contents), whatever pyproject.toml's fab-include names.
    from flwr.cli.build import build_fab_from_disk

    staged = launcher.stage_app(tmp_path / "app")
    assert build_fab_from_disk(staged) == build_fab_from_disk(launcher.REPO_ROOT)
    assert {p.name for p in staged.iterdir()} == {"pyproject.toml", *launcher.APP_PACKAGES}


def test_markers_also_find_processes_naming_the_runs_folders_in_their_arguments(tmp_path):
    # Ray's agents run with no marker in their environment; what names the run is a path in it (or in arguments).
    import subprocess

    folder = tmp_path / "ray"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    agent = subprocess.Popen([*sleeper, f"--session-dir={folder}/session_1"], env={})  # no marker in its environment
    titled = subprocess.Popen(sleeper, env={"PYTHONPATH": f"/x:{folder}/apps/app"})  # Ray's agents: a path, no marker
    watchdog_like = subprocess.Popen([*sleeper, "federated.launch.watchdog", f"RAY_TMPDIR={folder}"], env={})
    other = subprocess.Popen([*sleeper, f"--session-dir={tmp_path}/other"], env={})
    try:
        found = watchdog.pids_with_markers([f"RAY_TMPDIR={folder}", "AUDITABLE_FED_RUN=abc"])
        assert agent.pid in found and titled.pid in found
        assert watchdog_like.pid not in found and other.pid not in found
    finally:
        for p in (agent, titled, watchdog_like, other):
            p.kill()
            p.wait()
