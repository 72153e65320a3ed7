"""The simulation's start-up tuning (issue 12): Ray's runtime-env hook and the simulation's shorter
message polls (the thin Flower components: test_import_cost.py). The whole start-up is measured by
``scripts/bench_flower_floor.py``; the federated runs in test_flower_runs.py go through all of it.
"""

import threading
import time
from queue import Queue

import pytest

from federated.launch import ray_start
from federated.patches import fast_poll


def test_the_hook_drops_env_vars_the_workers_inherit_anyway(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/app:/lib")
    assert ray_start.runtime_env_hook({"env_vars": {"PYTHONPATH": "/app:/lib"}}) is None


@pytest.mark.parametrize(
    "runtime_env",
    [
        {"env_vars": {"PYTHONPATH": "/other"}},  # not what the workers inherit
        {"env_vars": {"PYTHONPATH": "/app:/lib", "EXTRA": "1"}},  # EXTRA is not in this environment
        {"env_vars": {"PYTHONPATH": "/app:/lib"}, "pip": ["x"]},  # more than env vars
        None,
        {},
    ],
)
def test_the_hook_passes_anything_else_through_unchanged(monkeypatch, runtime_env):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("EXTRA", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/app:/lib")
    assert ray_start.runtime_env_hook(runtime_env) == runtime_env


def test_the_hook_keeps_env_vars_for_a_cluster_started_elsewhere(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # its workers do not inherit this environment
    monkeypatch.setenv("PYTHONPATH", "/app")
    env = {"env_vars": {"PYTHONPATH": "/app"}}
    assert ray_start.runtime_env_hook(env) == env


def test_ray_calls_the_hook_by_the_name_the_launcher_gives(monkeypatch):
    from ray._private.worker import _maybe_modify_runtime_env  # what ray.init does with its runtime_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/app")
    env = {"env_vars": {"PYTHONPATH": "/app"}}
    assert _maybe_modify_runtime_env(dict(env), False) == env  # without the hook: unchanged
    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", ray_start.HOOK)
    assert _maybe_modify_runtime_env(dict(env), False) is None


def test_the_simulation_grid_polls_for_replies_more_often():
    from flwr.superlink.grid import InMemoryGrid as FlowerGrid

    class Factory:
        def state(self):
            return None

    grid = FlowerGrid(state_factory=Factory())
    assert fast_poll.wrap_grid(grid) is grid
    assert grid.pull_interval == fast_poll.SIM_PULL_S < 0.1


def test_the_simulation_hands_messages_to_the_clients_more_often(monkeypatch):
    import flwr.server.superlink.fleet.vce.vce_api as vce

    flower_loop = vce.add_messages_to_queue
    monkeypatch.setattr(vce, "add_messages_to_queue", flower_loop)  # restored after the test
    assert fast_poll.patch_simulation_pickup()
    assert vce.add_messages_to_queue is not flower_loop

    class State:
        def __init__(self):
            self.scans, self.pending = 0, {1: ["a"], 2: ["b", "c"]}

        def get_message_ins(self, *, node_id, limit):
            self.scans += 1
            out, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
            return out

    state, queue, stop = State(), Queue(), threading.Event()
    th = threading.Thread(target=vce.add_messages_to_queue, args=(state, queue, {1: 0, 2: 1}, stop))
    th.start()
    time.sleep(0.3)
    stop.set()
    th.join(timeout=2)
    assert not th.is_alive()
    assert sorted(queue.get_nowait() for _ in range(3)) == ["a", "b", "c"]  # Flower's loop: every message, once
    # Flower's loop scans both nodes every 0.1 s: ~6 scans in 0.3 s; this one every SIM_PULL_S
    assert state.scans >= 2 * 0.3 / fast_poll.SIM_PULL_S / 2 > 6
    assert fast_poll.patch_simulation_pickup()  # a second call leaves the patched loop as it is
