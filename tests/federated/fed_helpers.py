"""Helpers for driving the ServerApp and ClientApp in-process: fabricated Contexts, a Grid without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict

from auditml_core import data as core_data
from auditml_core import seeds
from auditml_core.config import load_config
from auditml_core.teacher import model_specs
from federated.app.run_config import to_run_config
from federated.app.workdir import write_inputs

# Tiny models and few rounds: the in-process federation must stay fast on two cores.
TINY_FED = [
    "cnn.channels=[4]",
    "cnn.hidden=8",
    "regressor.hidden_sizes=[8]",
    "cnn.dp_fit.batch_size=64",
    "federated.n_clients=2",
    "federated.rounds=3",
    "federated.local_epochs=1",  # every model; the defaults (<model>.federated) are longer: tests pass their own
]


def make_cfg(*overrides: str):
    return load_config(None, [*TINY_FED, *overrides])


def digits_datasets():
    """The real (embedded) datasets, prepared with the tiny config."""
    cfg = load_config(None, TINY_FED)
    return core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))


def prepare_work_dir(work: Path, cfg, datasets, *, name: str = "cnn", seed: int = 3, **app) -> dict:
    """Write the inputs a Flower run reads; return its run-config (``model=`` overrides ``app.model``)."""
    key = {"cnn": "images", "regressor": "tabular"}[name]
    spec = model_specs(cfg, datasets)[name]
    write_inputs(work, name=name, dataset=datasets[key], spec=spec)
    return to_run_config(cfg, work_dir=str(work), seed=seed, **{"model": name, "node_wait_s": 2.0, **app})


def client_context(run_config: dict, partition_id: int, n_partitions: int) -> Context:
    return Context(
        run_id=7,
        node_id=100 + partition_id,
        state=RecordDict(),
        run_config=dict(run_config),
        node_config={"partition-id": partition_id, "num-partitions": n_partitions},
    )


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process (no SuperLink, no Ray).

    ``crash_in_round`` makes the grid raise when that training round is sent (a server crash).
    """

    def __init__(self, run_config: dict, n_nodes: int, *, crash_in_round: int = 0):
        from federated.app.components import client as client_app

        self.client_app = client_app
        self.contexts = {100 + i: client_context(run_config, i, n_nodes) for i in range(n_nodes)}
        self.crash_in_round = crash_in_round
        self.sent_rounds: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            config = msg.content.config_records.get("config")
            if msg.metadata.message_type == "train" and config is not None:
                server_round = int(config["server-round"])
                if server_round == self.crash_in_round:
                    raise SystemExit(f"simulated server crash in round {server_round}")
                self.sent_rounds.append(server_round)
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # what Flower's runtime does: an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(reply)
        return replies


def server_context(run_config: dict) -> Context:
    return Context(run_id=7, node_id=0, state=RecordDict(), run_config=dict(run_config), node_config={})
