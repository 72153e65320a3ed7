"""Secure aggregation (SecAgg+) for the federation: the server learns only the weighted sum of the uploads.

Flower 1.42 ships SecAgg+ only on its *legacy* path: ``SecAggPlusWorkflow``
(``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``) refuses any context but a
``LegacyContext`` and drives a legacy ``flwr.server.strategy`` strategy inside
``DefaultWorkflow``; its client half, ``secaggplus_mod``, reads the ClientApp's reply as a
legacy ``FitRes`` (``compat.recorddict_to_fitres``). This module bridges the two worlds so
that the ClientApp's ``train`` handler and the ServerApp's record stay as they are:

- server: :func:`run_secagg` runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
  with :class:`SecAggFedAvg`, a legacy FedAvg that keeps the same per-round record
  (:class:`federated.strategies.RoundReplies`) as the message strategies;
- client: :func:`secagg_mod` (on the ``train`` handler) hands SecAgg+ messages to Flower's
  ``secaggplus_mod`` and translates between the legacy ``FitIns``/``FitRes`` records and the
  handler's ``arrays``/``config``/``metrics`` records. Under ``federated.secure_aggregation``
  a client refuses any training request that is not part of the protocol, so its weights
  never leave it in the clear.

What each party sees (the record's ``secure_aggregation`` section says the same):
every client uploads ``(n_i / max_n) · weights`` clipped to ``±clipping_range``, stochastically
quantised to ``quantization_range`` levels, and masked with pairwise masks (agreed with its
neighbours by Diffie-Hellman) plus a private mask (mod 2^32). The server can unmask only the
sum; a dropped client's pairwise masks are removed with the secret shares of at least
``threshold`` of its neighbours.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from core.config import Config, SecAggConfig
from core.errors import ConfigError, UserError
from federated.strategies import RoundFailedError, RoundReplies

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32  # mask space (Flower's default and largest; a power of two)
SECAGG_KEY = "federated.secure_aggregation"  # the run-config key both apps read


class SecAggRefusal(UserError):
    """A client under secure aggregation was asked for its update outside the protocol."""


# ------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class SecAggParams:
    """The SecAgg+ parameters of one federation, as the workflow gets them."""

    num_shares: int | float  # Flower's convention: float = fraction of the sampled clients
    reconstruction_threshold: float  # fraction of num_shares
    clipping_range: float
    quantization_range: int
    max_weight: float  # the largest client's row count: n_i / max_weight <= 1

    @classmethod
    def from_config(cls, cfg: SecAggConfig, *, max_weight: float) -> "SecAggParams":
        """The workflow's parameters from the config section and the partition sizes."""
        return cls(
            num_shares=1.0 if cfg.num_shares == 0 else int(cfg.num_shares),
            reconstruction_threshold=float(cfg.reconstruction_threshold),
            clipping_range=float(cfg.clipping_range),
            quantization_range=int(cfg.quantization_range),
            max_weight=float(max_weight),
        )

    def shares_and_threshold(self, n_sampled: int) -> tuple[int, int]:
        """(num_shares, threshold) the workflow will use for ``n_sampled`` clients (its own rules, mirrored)."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * n_sampled)
            if shares < n_sampled and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = n_sampled
        else:
            shares = self.num_shares
        return shares, max(round(self.reconstruction_threshold * shares), 2)

    def quantization_step(self) -> float:
        """Width of one quantisation level of an uploaded coordinate."""
        return 2 * self.clipping_range / self.quantization_range

    def workflow(self, *, timeout: float | None) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ fit workflow with these parameters."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )


def secagg_record(params: SecAggParams, *, n_clients: int) -> dict[str, Any]:
    """The record's ``secure_aggregation`` section: the parameters and what the server can and cannot see."""
    shares, threshold = params.shares_and_threshold(n_clients)
    return {
        "protocol": "SecAgg+ (Bell et al. 2020), Flower's SecAggPlusWorkflow + secaggplus_mod",
        "num_shares": shares,
        "reconstruction_threshold": threshold,
        "dropouts_tolerated_per_neighbourhood": shares - threshold,
        "clipping_range": params.clipping_range,
        "quantization_range": params.quantization_range,
        "modulus_range": MODULUS_RANGE,
        "max_weight": params.max_weight,
        "quantization_step": params.quantization_step(),
        "server_sees": [
            "the weighted average of the surviving clients' weights (the new global model)",
            "which clients took part and which dropped out",
            "each client's row count (its aggregation weight) and its training metrics (loss, ε, seconds, "
            "coordinates clipped to the SecAgg+ range)",
            "masked, quantised uploads: uniformly random mod 2^32 without the other clients' mask shares",
        ],
        "server_cannot_see": ["any single client's model weights or update"],
        "assumptions": [
            "honest-but-curious server: it relays the clients' public keys, so an actively malicious server "
            "could substitute keys (no PKI) and unmask one client",
            f"fewer than {threshold} clients of a neighbourhood collude with the server",
            "the sum itself is not private: with no DP, the global model still carries what the clients learned",
        ],
    }


# ------------------------------------------------------------------------------------ server


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg under SecAgg+ that keeps the federation's per-round record.

    Under ``SecAggPlusWorkflow`` every ``FitRes`` this strategy receives carries the *same*
    parameters, the already unmasked weighted average (``unmask_stage`` overwrites them), so
    :meth:`aggregate_fit` returns that average and records each client's metrics.
    """

    def __init__(
        self,
        *,
        n_clients: int,
        min_clients: int,
        round_offset: int,
        keys: list[str],
        evaluate_fn,
        model: str = "",
        **kw,
    ):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,  # client-side evaluation replies are not legacy records
            min_fit_clients=n_clients,
            min_available_clients=n_clients,
            min_evaluate_clients=0,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda r: {
                "server-round": r + round_offset,
                "param-keys": json.dumps(list(keys)),
                **({"model": model} if model else {}),  # which model of the run (issue 12: one run, every model)
            },
            accept_failures=True,
            **kw,
        )
        self.min_clients, self.round_offset, self.keys = min_clients, round_offset, list(keys)
        self.rounds: dict[int, RoundReplies] = {}
        self.aggregated: set[int] = set()  # rounds SecAgg+ completed (it halts a round silently otherwise)

    def configure_fit(self, server_round, parameters, client_manager):
        """Sample every client; open the round's record."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        absolute = server_round + self.round_offset
        self.rounds[absolute] = RoundReplies(round=absolute, sent_to=[int(p.node_id) for p, _ in pairs])
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        """The unmasked average (identical in every result), with the round's replies recorded."""
        absolute = server_round + self.round_offset
        record = self.rounds.setdefault(absolute, RoundReplies(round=absolute))
        answered = set()
        for proxy, fitres in results:
            node = int(proxy.node_id)
            answered.add(node)
            metrics = {k: v for k, v in fitres.metrics.items() if k != "privacy"}
            entry = {**metrics, "node_id": node}
            if "privacy" in fitres.metrics:
                entry["privacy"] = json.loads(str(fitres.metrics["privacy"]))
            record.trained.append(entry)
        reasons = [_short(str(getattr(f, "args", [f])[0])) for f in failures]
        for node in record.sent_to:
            if node not in answered:
                record.failed.append(
                    {"node_id": node, "reason": "dropped out of SecAgg+ (error or no reply); its masks were removed"}
                )
        if reasons:
            log.warning("round %d: %d SecAgg+ failure(s): %s", absolute, len(reasons), "; ".join(reasons))
            record.failed.extend({"node_id": -1, "reason": r} for r in reasons if not record.failed)
        if len(results) < self.min_clients:
            raise RoundFailedError(
                f"round {absolute}: {len(results)} client(s) completed SecAgg+, fewer than federated.min_clients="
                f"{self.min_clients}; {len(record.failed)} dropped out"
            )
        self.aggregated.add(absolute)
        return results[0][1].parameters, {"secagg-clients": len(results)}


def _short(reason: str, limit: int = 300) -> str:
    return reason if len(reason) <= limit else reason[:limit] + " ..."


def build_secagg_strategy(
    *, n_clients: int, min_clients: int, round_offset: int, initial_arrays: ArrayRecord, model: str = ""
) -> SecAggFedAvg:
    """The legacy FedAvg that :func:`run_secagg` drives, starting from ``initial_arrays``."""
    keys = list(initial_arrays.keys())
    return SecAggFedAvg(
        n_clients=n_clients,
        min_clients=min_clients,
        round_offset=round_offset,
        keys=keys,
        evaluate_fn=None,
        model=model,
        initial_parameters=ndarrays_to_parameters([initial_arrays[k].numpy() for k in keys]),
    )


def run_secagg(
    grid: Grid,
    strategy: SecAggFedAvg,
    *,
    params: SecAggParams,
    num_rounds: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
    run_config: dict[str, Any],
    timeout: float | None,
) -> None:
    """Run ``num_rounds`` rounds of ``strategy`` under SecAgg+; ``evaluate_fn`` as the message strategies get it.

    ``evaluate_fn(round, arrays)`` runs on the global model after every round (round 0: the initial one).
    """
    keys = strategy.keys

    def legacy_evaluate(server_round: int, ndarrays, _config):
        arrays = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in zip(keys, ndarrays)))
        metrics = dict(evaluate_fn(server_round, arrays))
        return float(metrics.get("val_loss", metrics.get("test_loss", 0.0))), metrics

    strategy.evaluate_fn = legacy_evaluate
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    context = LegacyContext(base, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=strategy)
    secagg_round = params.workflow(timeout=timeout)

    def fit_round(grid_: Grid, ctx: LegacyContext) -> None:
        secagg_round(grid_, ctx)
        absolute = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]) + strategy.round_offset
        if absolute not in strategy.aggregated:  # Flower only logs "Secure aggregation halted."
            replies = strategy.rounds.get(absolute)
            raise RoundFailedError(
                f"round {absolute}: SecAgg+ halted (too few clients answered one of its stages for the reconstruction "
                f"threshold of {params.shares_and_threshold(len(replies.sent_to) if replies else 0)[1]}); the global "
                "model would not change. Check the clients' logs, or lower federated.secagg.reconstruction_threshold"
            )

    DefaultWorkflow(fit_workflow=fit_round)(grid, context)


# ------------------------------------------------------------------------------------ client


def secagg_enabled(run_config: dict[str, Any]) -> bool:
    """Whether this run's config turns secure aggregation on."""
    return bool(run_config.get(SECAGG_KEY, False))


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Client mod on ``train``: Flower's ``secaggplus_mod`` when the run-config asks for secure aggregation.

    Off, it refuses SecAgg+ messages (the two apps disagree) and passes everything else on. On,
    it refuses any training request outside the protocol: the update must never leave in the clear.
    """
    in_protocol = RECORD_KEY_CONFIGS in msg.content.config_records
    if not secagg_enabled(ctxt.run_config):
        if in_protocol:
            raise ConfigError(
                f"the server runs SecAgg+ but this client's run-config has {SECAGG_KEY}=false; run both with the same config"
            )
        return call_next(msg, ctxt)
    if not in_protocol:
        raise SecAggRefusal(
            f"{SECAGG_KEY}=true, but the server asked for this client's update outside SecAgg+; refusing to send it "
            "in the clear"
        )
    return secaggplus_mod(msg, ctxt, _legacy_adapter(call_next))


def _legacy_adapter(call_next):
    """Wrap the ``train`` handler: legacy FitIns in, legacy FitRes out (what ``secaggplus_mod`` expects)."""

    def handler(msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        keys = [str(k) for k in json.loads(str(fitins.config["param-keys"]))]
        arrays = ArrayRecord(
            OrderedDict((k, Array(np.asarray(v))) for k, v in zip(keys, parameters_to_ndarrays(fitins.parameters)))
        )
        config = ConfigRecord({k: v for k, v in fitins.config.items() if k != "param-keys"})
        original = msg.content
        msg.content = RecordDict({"arrays": arrays, "config": config})  # the handler's own record layout
        try:
            reply = call_next(msg, ctxt)
        finally:
            msg.content = original
        return Message(_to_fitres_record(reply.content, keys, ctxt.run_config), reply_to=msg)

    return handler


def _to_fitres_record(content: RecordDict, keys: list[str], run_config: dict[str, Any]) -> RecordDict:
    """The handler's reply (``arrays``, ``metrics``, optional ``status``) as a legacy FitRes record."""
    metrics = {k: v for k, v in content["metrics"].items()}
    if "arrays" not in content:  # a client out of privacy budget: under SecAgg+ it drops out of the round
        status = content.config_records.get("status")
        raise SecAggRefusal(str(status["refused"]) if status is not None else "the client sent no weights")
    arrays = content["arrays"]
    weights = [arrays[k].numpy() for k in keys]
    clip = float(run_config.get("federated.secagg.clipping_range", SecAggConfig.clipping_range))
    metrics["secagg-clipped"] = int(sum(int(np.sum(np.abs(w) > clip)) for w in weights))
    status = content.config_records.get("status")
    if status is not None and "privacy" in status:
        metrics["privacy"] = str(status["privacy"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters(weights),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def max_weight_of(sizes: list[int]) -> float:
    """``max_weight`` for the workflow: the largest client's row count (so every n_i / max_weight <= 1)."""
    return float(max(sizes)) if sizes else 1.0


def check_supported(cfg: Config, *, client_evaluate: bool) -> None:
    """Refuse combinations the SecAgg+ path does not run (raise ConfigError saying what to change)."""
    if cfg.client_dp.enabled:
        raise ConfigError(
            "federated.secure_aggregation=true with client_dp.enabled=true is not built yet; turn one of them off"
        )
    if client_evaluate:
        raise ConfigError(
            "app.client-evaluate=true is not supported with federated.secure_aggregation=true (the legacy SecAgg+ "
            "workflow sends evaluation in another record format); set app.client-evaluate=false"
        )


__all__ = [
    "SecAggFedAvg",
    "SecAggParams",
    "SecAggRefusal",
    "check_supported",
    "max_weight_of",
    "build_secagg_strategy",
    "run_secagg",
    "secagg_enabled",
    "secagg_mod",
    "secagg_record",
]
