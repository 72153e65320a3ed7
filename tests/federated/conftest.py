"""Fixtures: a task identity for fabricated Messages, the embedded datasets prepared once."""

import pytest
from fed_helpers import digits_datasets
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and node ids from the process's task identity, which only Flower sets."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.fixture(scope="session")
def digits_data():
    return digits_datasets()
