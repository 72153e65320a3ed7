"""The federated simulation on an existing Ray cluster (``federated.ray_address``), left running afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from auditml_core.config import load_config
from auditml_core.errors import ConfigError
from federated.launch import processes as launcher
from federated.launch.ray_cluster import RayPlacement
from federated.launch.watchdog import alive
from tests.tiny import TRAIN

ROOT = Path(__file__).resolve().parents[2]


def test_ray_settings_are_validated_and_reach_the_federation_config():
    cfg = load_config(
        None, ["federated.ray_address='10.0.0.5:6379'", "federated.client_cpus=2", "federated.client_gpus=0.5"]
    )
    ray = RayPlacement.from_config(cfg)
    assert ray.existing and ray.environment() == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert ray.federation_config(20) == "num-supernodes=20 client-resources-num-cpus=2 client-resources-num-gpus=0.5"
    private = RayPlacement.from_config(load_config())
    assert not private.existing and private.environment() == {}
    assert private.federation_config(5) == "num-supernodes=5 client-resources-num-cpus=1 client-resources-num-gpus=0"
    for bad in ("federated.ray_address='localhost'", "federated.ray_address='a:99999'", "federated.client_cpus=0"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_an_address_where_no_cluster_answers_is_refused_before_any_process():
    port = launcher.free_port()  # free now: nothing listens there
    with pytest.raises(ConfigError, match=rf"federated.ray_address='127.0.0.1:{port}': no Ray cluster answers there"):
        RayPlacement(address=f"127.0.0.1:{port}").check_reachable()


class RayTestCluster:
    """A Ray cluster of two nodes on this machine (a head and a worker), each with its own temp folder and ports.

    Both are ``ray start --block`` processes started through :class:`federated.launch.processes.Processes` (own
    sessions, parent-death signal, watchdog) and stopped by PID with their process trees.
    """

    def __init__(self, cpus_per_node: int = 1):
        # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.gcs_port = launcher.free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        # RAY_TMPDIR only marks the cluster's processes for the watchdog; each node gets --temp-dir.
        env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_TMPDIR": str(self.root)}
        self.procs = launcher.Processes(self.root / "logs", env)
        self.cpus = cpus_per_node

    def _node(self, name: str, *role: str):
        ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
        argv = [launcher.bin_path("ray"), "start", "--block", "--num-cpus", str(self.cpus)]
        argv += ["--temp-dir", str(self.root / name), "--object-store-memory", str(100 * 2**20)]
        argv += ["--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--metrics-export-port"]
        argv += [str(launcher.free_port()), *(x for p in ports for x in (p, str(launcher.free_port()))), *role]
        return self.procs.start(name, argv)

    def nodes(self) -> int:
        status = subprocess.run(
            [launcher.bin_path("ray"), "status", "--address", self.address], capture_output=True, text=True, timeout=60
        )
        return len(re.findall(r"^\s*1 node_", status.stdout, flags=re.M))

    def _wait_nodes(self, n: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while self.nodes() < n:
            assert time.monotonic() < deadline, (
                f"the Ray cluster did not reach {n} node(s):\n{self.procs.log_tail('h')}"
            )
            time.sleep(1)

    def start(self) -> "RayTestCluster":
        self._node("h", "--head", "--port", str(self.gcs_port), "--include-dashboard", "false")
        self._wait_nodes(1)
        self._node("w", "--address", self.address)
        self._wait_nodes(2)
        return self

    def pids(self, *, workers: bool = True) -> list[int]:
        """The cluster's processes now: the two ``ray start`` processes and everything below them (GCS, raylets,
        agents, log monitors) and, with ``workers``, its Python workers (which Ray itself starts and ends)."""
        roots = [p.pid for p in self.procs.procs.values()]
        found = roots + [d for r in roots for d in launcher.descendants(r)]
        return found if workers else [pid for pid in found if not _is_worker(pid)]

    def actor_logs(self, node: str) -> list[Path]:
        """Worker logs of node ``node`` ("h" or "w") that hosted one of Flower's ClientApp actors."""
        logs = (self.root / node).glob("session_*/logs/worker-*.out")
        return [p for p in logs if ":actor_name:ClientAppActor" in p.read_text(errors="replace")]

    def stop(self) -> None:
        self.procs.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"default_worker.py" in cmdline or b"setup_worker.py" in cmdline or cmdline.startswith(b"ray::IDLE")


def readme_ray_command() -> str:
    text = (ROOT / "README.md").read_text()
    for line in re.findall(r"^python -m pipeline train.mode=federated federated.ray_address=.*$", text, flags=re.M):
        return line.partition(" #")[0].strip()
    raise AssertionError("README.md has no federated.ray_address command")


@pytest.mark.slow
def test_readme_ray_command_on_a_two_node_cluster(tmp_path):
    """A head and a worker node on this machine; the README's command with 20 clients spreads them over both
    nodes, completes, and leaves the cluster exactly as it found it (every process alive, both nodes up)."""
    command = readme_ray_command()
    assert "HOST:6379" in command
    cluster = RayTestCluster().start()
    try:
        before = cluster.pids(workers=False)
        argv = command.replace("HOST:6379", cluster.address).split()[3:]  # after "python -m pipeline"
        extra = [*TRAIN, "federated.n_clients=20", "regressor.fit.batch_size=8", "federated.rounds=2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", *argv, *extra, "--stages", "data,train", "--quiet"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = Path(re.search(r"^run directory: (.+)$", proc.stdout, re.M).group(1))
        run = run if run.is_absolute() else tmp_path / run
        for model in ("regressor", "cnn"):
            record = json.loads((run / "models" / f"{model}.json").read_text())["training"]
            assert record["completed_rounds"] == 2
            for round_ in record["client_rounds"]:  # every one of the 20 clients trained in every round
                assert sorted(c["partition-id"] for c in round_["trained"]) == list(range(20))
        # Both nodes hosted ClientApp actors: the clients were spread over the cluster.
        assert cluster.actor_logs("h") and cluster.actor_logs("w")
        # The run stopped what it started, not the cluster: every process of it is still alive, both nodes answer.
        assert [pid for pid in before if not alive(pid)] == []
        assert cluster.nodes() == 2
    finally:
        pids = cluster.pids()
        cluster.stop()
    assert [pid for pid in pids if alive(pid)] == []  # stopped by PID, trees included
