"""Flower strategies chosen by ``federated.strategy``, each taught to keep the federation's record.

:class:`Recording` is mixed into Flower's own FedAvg / FedProx / FedAdam. Before the
strategy aggregates a round it sorts the replies into trained, refused (a client out of
privacy budget says so and sends no weights) and failed (the ClientApp raised, or no
reply came), keeps every client's metrics and ε for the record, and lets the round go on
while at least ``federated.min_clients`` clients trained; otherwise the run fails (naming
the privacy budget when clients refused), never returning an unchanged model as trained. Rounds are numbered from the
start of the whole training (``round_offset``), so a resumed run continues the numbering
and FedAdam's bias correction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from auditml_core.errors import ConfigError, PrivacyBudgetError, UserError

log = logging.getLogger(__name__)


class RoundFailedError(UserError):
    """Too few clients trained in a round to go on."""


@dataclass
class RoundReplies:
    """What came back in one training round."""

    round: int
    sent_to: list[int] = field(default_factory=list)  # node ids
    trained: list[dict[str, Any]] = field(default_factory=list)  # per client: metrics (+ node id, privacy record)
    refused: list[dict[str, Any]] = field(default_factory=list)  # per client: metrics + reason
    failed: list[dict[str, Any]] = field(default_factory=list)  # per node: node id, reason


class Recording:
    """Mixin for a Flower message strategy: record each round's replies, enforce ``min_clients``."""

    min_clients: int = 1
    round_offset: int = 0
    rounds: dict[int, RoundReplies]

    def _init_recording(self, *, min_clients: int, round_offset: int) -> None:
        self.min_clients, self.round_offset, self.rounds = min_clients, round_offset, {}
        self.known_nodes: set[int] = set()  # every node sent a round so far: one missing later is a failure
        self.sent: dict[int, list[Message]] = {}  # round -> its messages (the grid gives them ids as it pushes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        messages = list(super().configure_train(absolute, arrays, config, grid))  # type: ignore[misc]
        record = RoundReplies(round=absolute, sent_to=[m.metadata.dst_node_id for m in messages])
        # A site back under a new node id (federated.app.site.AdmittedSites) is not missing: its old id is retired.
        retired = set(getattr(grid, "replaced_nodes", ()))
        # Listed but not sent this round (Poisson sampling left it out) is not missing either.
        listed = {int(n) for n in grid.get_node_ids()}
        for node in sorted(self.known_nodes - set(record.sent_to) - listed - retired):
            # The SuperLink no longer lists it (its SuperNode died or lost its connection).
            record.failed.append({"node_id": int(node), "reason": "node not connected when the round started"})
        self.known_nodes.update(record.sent_to)
        self.rounds[absolute] = record
        self.sent[absolute] = messages
        return messages

    def required_replies(self, record: RoundReplies) -> int:
        """Trained replies a round needs to go on: ``federated.min_clients``."""
        return self.min_clients

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.round_offset
        record = self.rounds.setdefault(absolute, RoundReplies(round=absolute))
        trained: list[Message] = []
        answered = set()
        addressed = node_of_reply(self.sent.pop(absolute, []))
        for msg in replies:
            node = addressed(msg)
            answered.add(node)
            if msg.has_error():
                record.failed.append({"node_id": node, "reason": _short(msg.error.reason)})
                continue
            metrics = {k: _number(v) for k, v in msg.content["metrics"].items()}
            status = msg.content.config_records.get("status")
            if metrics.get("refused"):
                record.refused.append({**metrics, "node_id": node, "reason": str(status["refused"]) if status else ""})
                continue
            entry = {**metrics, "node_id": node}
            if status is not None and "privacy" in status:
                entry["privacy"] = json.loads(str(status["privacy"]))
            record.trained.append(entry)
            trained.append(msg)
        for node in record.sent_to:
            if node not in answered:
                record.failed.append({"node_id": node, "reason": "no reply before the round timeout"})
        for f in record.failed:
            log.warning("round %d: node %d failed: %s", absolute, f["node_id"], f["reason"])
        if len(trained) < self.required_replies(record):
            if record.failed:
                raise RoundFailedError(
                    f"round {absolute}: {len(trained)} client(s) trained, {len(record.failed)} failed, {len(record.refused)} "
                    f"refused; fewer than federated.min_clients={self.min_clients}. First failure: {record.failed[0]['reason']}"
                )
            # Only refusals: going on would return an unchanged model that looks trained.
            raise PrivacyBudgetError(
                f"round {absolute}: {len(trained)} client(s) trained and {len(record.refused)} refused because their "
                f"privacy budget (dp.target_epsilon) is spent; fewer than federated.min_clients={self.min_clients}, so "
                "the run stops instead of returning an unchanged model. Raise dp.target_epsilon or lower the "
                f"model's rounds (<model>.federated.rounds). First refusal: {record.refused[0]['reason'] if record.refused else 'none'}"
            )
        # Flower samples the round's nodes in a random order (Python's unseeded `random`): sum the updates in client
        # order instead, so that the float sums, and with them a seeded run, do not change between runs.
        trained.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))
        return super().aggregate_train(absolute, trained)  # type: ignore[misc]


def node_of_reply(sent: Iterable[Message]) -> Callable[[Message], int]:
    """The node a reply answers for: its sender, or for an error the SuperLink wrote in a dead node's place
    ("Node Unavailable", sent from the SuperLink's own node id) the node the answered message went to."""
    to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}

    def node(reply: Message) -> int:
        src = int(reply.metadata.src_node_id)
        return to.get(reply.metadata.reply_to_message_id, src) if reply.has_error() else src

    return node


def _number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) else [float(v) for v in value]


def _short(reason: str, limit: int = 600) -> str:
    """The informative tail of a (Ray) traceback: the last lines name the exception."""
    lines = [ln for ln in str(reason).splitlines() if ln.strip()]
    text = " | ".join(lines[-3:])
    return text[-limit:]


class RecordingFedAvg(Recording, FedAvg):
    """FedAvg (McMahan et al., 2017) with the federation's record."""


class RecordingFedProx(Recording, FedProx):
    """FedProx (Li et al., 2020): FedAvg plus ``proximal-mu`` sent to clients for their proximal term."""


class RecordingFedAdam(Recording, FedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the server over the averaged client update."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Server optimizer moments, for the checkpoint."""
        out = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self, name) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`optimizer_state`."""
        for name in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
            setattr(self, name, moments or None)


STRATEGIES: dict[str, Callable[..., Recording]] = {
    "fedavg": lambda **kw: RecordingFedAvg(**kw),
    "fedprox": lambda *, proximal_mu, **kw: RecordingFedProx(proximal_mu=proximal_mu, **kw),
    "fedadam": lambda *, server_lr, **kw: RecordingFedAdam(eta=server_lr, **kw),
}


def build_strategy(
    name: str,
    *,
    n_clients: int,
    min_clients: int,
    round_offset: int = 0,
    proximal_mu: float = 0.0,
    server_lr: float = 0.01,
    client_evaluate: bool = False,
) -> Recording:
    """The strategy ``federated.strategy`` names, sampling every client each round.

    Raises
    ------
    ConfigError
        For an unknown strategy name.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"federated.strategy={name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    common: dict[str, Any] = {
        # Every client trains every round (cross-silo): the per-client ε is then the same
        # composition for everyone, and a missing client is a failure, not a sampling choice.
        # The server waits for all n_clients before the first round (server_app._wait_for_nodes); later rounds
        # go to whoever is connected, so a SuperNode that died is recorded as failed and the run goes on while
        # min_clients train (Flower's sampling would otherwise wait forever for the dead node).
        "fraction_train": 1.0,
        "min_train_nodes": min_clients,
        "min_available_nodes": min_clients,
        "fraction_evaluate": 1.0 if client_evaluate else 0.0,
        "min_evaluate_nodes": n_clients if client_evaluate else 0,
    }
    extra = {"proximal_mu": proximal_mu} if name == "fedprox" else {"server_lr": server_lr} if name == "fedadam" else {}
    strategy = STRATEGIES[name](**common, **extra)
    strategy._init_recording(min_clients=min_clients, round_offset=round_offset)
    return strategy
