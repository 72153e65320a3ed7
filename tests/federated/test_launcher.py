"""Process hygiene: everything a federated run starts is stopped, with its whole tree."""

import sys
import time

from federated import launcher


def _alive(pid):
    return launcher._alive(pid)


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
