"""The per-site command (``python -m federated.site``) and its process hygiene.

Fast tests check its arguments and refusals. The slow ones start processes: a SuperLink and one site, then
``kill -9`` of the site's SuperNode alone (its ClientApp worker must die with it, parent-death signal), and a
worker whose SuperNode is not its parent (its own check: a killed, unreaped SuperNode is a zombie, which
Flower's monitor counted as alive).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auditml_core.errors import UserError
from federated.launch import processes as launcher
from federated.launch import site

ROOT = Path(__file__).resolve().parents[2]


def _args(*extra: str):
    return site._parser().parse_args(
        ["--superlink", "127.0.0.1:9092", "--partition-id", "1", "--num-partitions", "3", *extra]
    )


def test_the_site_command_builds_the_supernode_of_one_site(tmp_path):
    data = tmp_path / "a b.csv"
    data.write_text("x,y\n1,2\n")
    args = _args("--data", str(data), "--target", "y", "--ledger", str(tmp_path / "ledger"), "--insecure")
    argv = site.supernode_args(args, isolation="process", runtime_port=9999, secret=tmp_path / "s")
    assert argv[:7] == ["--insecure", "--superlink", "127.0.0.1:9092", "--isolation", "process", "--host", "127.0.0.1"]
    assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "s")
    config = argv[argv.index("--node-config") + 1]
    assert config == (
        f'partition-id=1 num-partitions=3 data-path="{data.resolve()}" '
        f'ledger-path="{(tmp_path / "ledger").resolve()}" target="y"'
    )
    from flwr.common.config import parse_config_args  # what flower-supernode does with --node-config

    parsed = parse_config_args([config])
    assert parsed["data-path"] == str(data.resolve()) and parsed["partition-id"] == 1 and parsed["target"] == "y"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "give --root-certificates CA.pem .* or --insecure"),
        (("--insecure", "--root-certificates", "ca.pem"), "or --insecure"),
        (("--insecure", "--auth-supernode-private-key", "k"), "needs --root-certificates"),
        (("--insecure", "--data", "/no/such/file.csv"), "--data /no/such/file.csv does not exist"),
        (("--insecure", "--target", "y"), "give --data too"),
    ],
)
def test_bad_site_options_are_refused_in_one_line(extra, message, capsys):
    with pytest.raises(UserError, match=message):
        site.supernode_args(_args(*extra), isolation="process", runtime_port=1, secret=None)
    assert site.main(["--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2", *extra]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(UserError, match=r"--partition-id 3 is outside \[0, --num-partitions 3\)"):
        site.node_config(partition_id=3, num_partitions=3, data=None)


def test_the_superexec_secret_is_never_on_disk_and_reaches_only_the_child_given_it():
    fd = site.superexec_secret()
    try:
        assert os.fstat(fd).st_nlink == 0  # no name in any file system: nothing is left behind, even after kill -9
        secret = Path(site._fd_path(fd)).read_bytes()
        assert len(secret) == 32
        read = [sys.executable, "-c", f"import sys; sys.stdout.buffer.write(open({site._fd_path(fd)!r}, 'rb').read())"]
        assert subprocess.run(read, pass_fds=(fd,), capture_output=True, check=True).stdout == secret  # the worker
        assert subprocess.run(read, capture_output=True).returncode != 0  # control: a child not given it cannot
        other = site.superexec_secret()
        assert Path(site._fd_path(other)).read_bytes() != secret  # fresh per site
        os.close(other)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - t0


def _worker_of(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"federated.launch.clientapp_worker" in cmdline and f"--parent-pid\0{parent}\0".encode() in cmdline:
                return int(entry.name)
    return None


@pytest.mark.slow
def test_kill_9_of_a_sites_supernode_alone_ends_its_clientapp_worker(tmp_path):
    """The site process is the SuperNode; its worker (a child with PR_SET_PDEATHSIG) dies with it at once."""
    env = launcher.flower_env(tmp_path / "flwr-home")
    env["PYTHONPATH"] = str(ROOT)
    port = launcher.free_port()
    with launcher.Processes(tmp_path / "logs", env) as procs:
        superlink = procs.start("superlink", [launcher.bin_path("flower-superlink"), "--insecure", "--port", str(port)])
        launcher.wait_until_healthy(superlink, port, timeout_s=120, what="superlink", logs=procs, name="superlink")
        node = procs.start(
            "site-0",
            [sys.executable, "-m", "federated.site", "--superlink", f"127.0.0.1:{port}", "--insecure"]
            + ["--partition-id", "0", "--num-partitions", "1"],
        )
        _wait_for(lambda: _worker_of(node.pid) is not None, 60, "the site started no ClientApp worker")
        worker = _worker_of(node.pid)
        log = tmp_path / "logs" / "site-0.log"
        _wait_for(lambda: b"serving the ClientApp tasks" in log.read_bytes(), 120, "the worker never served")
        _wait_for(lambda: b"SuperNode ID:" in log.read_bytes(), 60, "the SuperNode never joined the SuperLink")
        secret_arg = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0--superexec-auth-secret-file\0")[1]
        assert secret_arg.startswith(b"/proc/self/fd/")  # the secret is an inherited descriptor, not a file
        os.kill(node.pid, signal.SIGKILL)  # the SuperNode alone; not reaped yet: a zombie while we look
        took = _wait_for(lambda: not _alive(worker), 5, "the ClientApp worker outlived its SuperNode")
        print(f"worker gone {took:.2f} s after kill -9 of its SuperNode")
        assert node.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.slow
def test_a_worker_whose_supernode_is_not_its_parent_exits_when_it_dies(tmp_path):
    """Without the parent-death signal (the SuperNode is a sibling), the worker's own check ends it, also while
    the killed SuperNode is an unreaped zombie (which Flower's start_parent_process_monitor counts as alive)."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the "SuperNode"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "federated.launch.clientapp_worker", "--runtime-api-address"]
        + [f"127.0.0.1:{launcher.free_port()}", "--insecure", "--parent-pid", str(stand_in.pid)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        log = tmp_path / "worker.log"
        _wait_for(lambda: b"serving the ClientApp tasks" in log.read_bytes(), 120, "the worker never served")
        assert worker.poll() is None
        os.kill(stand_in.pid, signal.SIGKILL)  # not reaped: stays a zombie until wait() below
        took = _wait_for(lambda: worker.poll() is not None, 5, "the worker outlived its (zombie) SuperNode")
        assert worker.returncode == 3 and b"is gone" in log.read_bytes()
        print(f"worker exited {took:.2f} s after its SuperNode became a zombie")
    finally:
        for proc in (worker, stand_in):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        out.close()
