"""The private Flower calls we depend on (federated/patches/flower_api.py): present in the pinned Flower, pinned in
pyproject.toml, and a stock fall-back with one warning wherever they cannot be relied on."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest

from federated.patches import fast_poll, flower_api
from federated.patches.flower_api import Call

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_flower_has_every_private_call_we_use():
    """Fails, naming each difference, when the pinned Flower renames or reshapes a call fast_poll or the worker uses."""
    assert flower_api.flower_version().startswith(flower_api.CHECKED_FLWR)
    found = flower_api.problems([*flower_api.FAST_POLL_CALLS, *flower_api.WORKER_CALLS])
    assert found == [], "the pinned Flower changed calls we depend on:\n" + "\n".join(found)
    assert flower_api.unsupported(flower_api.WORKER_CALLS) is None


def test_pyproject_pins_flower_to_the_checked_versions():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (flwr,) = [d for d in deps if re.match(r"flwr\b", d)]
    (checked,) = flower_api.CHECKED_FLWR  # "1.42."
    major, minor = (int(x) for x in checked.rstrip(".").split("."))
    assert flwr.replace(" ", "") == f"flwr[simulation]>={major}.{minor},<{major}.{minor + 1}"


def test_a_changed_or_missing_call_is_named():
    assert Call("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)).problem() is None
    lacking = Call("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn", "period")).problem()
    assert lacking is not None and "lacks parameter(s) ['period']" in lacking
    gone = Call("flwr.supercore.heartbeat", "NoSuchSender").problem()
    assert gone is not None and "flwr.supercore.heartbeat.NoSuchSender is gone" in gone
    assert "is gone" in (Call("flwr.no_such_module", "x").problem() or "")


def test_another_flower_version_falls_back_to_stock_isolation_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(flower_api, "flower_version", lambda: "1.43.0")
    monkeypatch.setattr(flower_api, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="federated.patches.flower_api"):
        assert flower_api.clientapp_isolation("process") == "subprocess"
        assert flower_api.clientapp_isolation("process") == "subprocess"
        assert flower_api.clientapp_isolation("subprocess") == "subprocess"
    (warning,) = [r for r in caplog.records if r.name == "federated.patches.flower_api"]
    assert "flwr 1.43.0" in warning.getMessage() and "--isolation subprocess" in warning.getMessage()


def test_a_changed_worker_call_falls_back_and_the_worker_refuses_to_start(monkeypatch):
    changed = (
        *flower_api.WORKER_CALLS,
        Call("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client", "timeout")),
    )
    monkeypatch.setattr(flower_api, "WORKER_CALLS", changed)
    monkeypatch.setattr(flower_api, "_warned", set())
    assert flower_api.clientapp_isolation("process") == "subprocess"
    from federated.launch import clientapp_worker

    with pytest.raises(SystemExit, match="lacks parameter.*--isolation subprocess"):
        clientapp_worker.main(["--runtime-api-address", "127.0.0.1:1", "--insecure"])


def test_the_poll_patches_leave_another_flower_version_alone(monkeypatch, caplog):
    import importlib.metadata

    import flwr.supernode.start_client_internal as loop

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.43.0" if name == "flwr" else real(name))
    before = loop.time
    with caplog.at_level(logging.WARNING):
        assert fast_poll.patch_supernode() is False
    assert loop.time is before and "left at Flower's 3 s" in caplog.text
