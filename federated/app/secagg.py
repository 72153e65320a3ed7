"""Secure aggregation (SecAgg+) for the federation: the server learns only the weighted sum of the uploads.

Flower 1.42 ships SecAgg+ only on its *legacy* path: ``SecAggPlusWorkflow``
(``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``) refuses any context but a
``LegacyContext`` and drives a legacy ``flwr.server.strategy`` strategy inside
``DefaultWorkflow``; its client half, ``secaggplus_mod``, reads the ClientApp's reply as a
legacy ``FitRes`` (``compat.recorddict_to_fitres``). This module bridges the two worlds so
that the ClientApp's ``train`` handler and the ServerApp's record stay as they are:

- server: :func:`run_secagg` runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
  with :class:`SecAggFedAvg`, a legacy FedAvg that keeps the same per-round record
  (:class:`federated.app.strategies.RoundReplies`) as the message strategies;
- client: :func:`federated.app.secagg_client.secagg_mod` (on the ``train`` handler) hands SecAgg+
  messages to Flower's ``secaggplus_mod`` and translates between the legacy ``FitIns``/``FitRes``
  records and the handler's ``arrays``/``config``/``metrics`` records. Under
  ``federated.secure_aggregation`` a client refuses any training request that is not part of the
  protocol, so its weights never leave it in the clear.

What each party sees (the record's ``secure_aggregation`` section says the same):
every client uploads ``(n_i / max_n) · weights`` clipped to ``±clipping_range``, stochastically
quantised to ``quantization_range`` levels, and masked with pairwise masks (agreed with its
neighbours by Diffie-Hellman) plus a private mask (mod 2^32). The server can unmask only the
sum; a dropped client's pairwise masks are removed with the secret shares of at least
``threshold`` of its neighbours. The server asks for those shares only when at least
:func:`min_survivors` masked uploads arrived (:class:`GuardedSecAggPlusWorkflow`); with fewer, the
round fails and nothing is unmasked.

With user-level DP (``client_dp.enabled``) every client still takes part in every round, but
only the Poisson-sampled ones (told by ``dp-sampled`` in their instructions) train; each client
uploads its update (weights minus the global weights) clipped to ``C`` (``C − step·√d`` under server
noise, so it stays within ``C`` after rounding), zero when not sampled,
with weight 1 (``max_weight = 1``), so the server unmasks the plain sum. Under
``client_dp.noise_placement = "client"`` each upload carries ``N(0, σ²C²/t)`` and is refused if
any coordinate would leave the SecAgg+ range (derived as ``C + k·σC/√t``); under ``"server"``
the server adds ``N(0, σ²C²)`` to the unmasked sum. Either way the new global model is
``g + sum / (q·N)``. The argument and its assumptions: ``auditml_core/privacy/client_noise.py``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from auditml_core.config import Config, SecAggConfig
from auditml_core.errors import ConfigError, UserError
from auditml_core.privacy.client_noise import ClientNoise, plan_client_noise
from auditml_core.privacy.user_level import UserDPPlan, poisson_sample, private_rng
from federated.app.strategies import RoundFailedError, RoundReplies

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
    def from_config(cls, cfg: SecAggConfig, *, max_weight: float, noise: ClientNoise | None = None) -> "SecAggParams":
        """The workflow's parameters from the config section and the partition sizes.

        Under user-level DP (``noise`` given) every upload has weight 1 (``max_weight = 1``: the
        server unmasks the plain sum) and the clipping range is the one derived for the noise.
        """
        return cls(
            num_shares=1.0 if cfg.num_shares == 0 else int(cfg.num_shares),
            reconstruction_threshold=float(cfg.reconstruction_threshold),
            clipping_range=float(cfg.clipping_range if noise is None else noise.clipping_range),
            quantization_range=int(cfg.quantization_range),
            max_weight=1.0 if noise is not None else float(max_weight),
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

    def workflow(self, *, timeout: float | None, min_uploads: int = 2) -> "GuardedSecAggPlusWorkflow":
        """Flower's SecAgg+ fit workflow with these parameters, unmasking only with ``min_uploads`` uploads."""
        return GuardedSecAggPlusWorkflow(
            min_uploads=min_uploads,
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )


def min_survivors(cfg: Config) -> int:
    """t: the fewest masked uploads a round is unmasked with: ``federated.min_clients`` and SecAgg+'s threshold.

    Every client takes part in every round, so the threshold is the workflow's for all
    ``federated.n_clients`` (:meth:`SecAggParams.shares_and_threshold`).
    """
    params = SecAggParams.from_config(cfg.federated.secagg, max_weight=1.0)
    return max(int(cfg.federated.min_clients), params.shares_and_threshold(cfg.federated.n_clients)[1])


def noise_plan(cfg: Config, plan: UserDPPlan) -> ClientNoise:
    """Who adds which noise under SecAgg+ for the user-level plan (the same on server and clients)."""
    return plan_client_noise(
        placement=cfg.client_dp.noise_placement,
        noise_multiplier=plan.noise_multiplier,
        clipping_norm=plan.clipping_norm,
        min_survivors=min_survivors(cfg),
        clip_sigmas=cfg.client_dp.clip_sigmas,
    )


def secagg_record(
    params: SecAggParams, *, n_clients: int, min_uploads: int | None = None, noise: ClientNoise | None = None
) -> dict[str, Any]:
    """The record's ``secure_aggregation`` section: the parameters and what the server can and cannot see."""
    shares, threshold = params.shares_and_threshold(n_clients)
    extra: dict[str, Any] = {}
    if noise is not None:
        extra = {
            "uploads": "each client's update (weights minus the global weights), with weight 1, "
            + (
                "clipped to C, plus its share of the noise"
                if noise.placement == "client"
                else "clipped to C less step·√d (d parameters) so that it is within C after rounding"
            ),
            "clipping_range_source": (
                f"derived: C + k·s = {noise.clipping_norm} + {noise.clip_sigmas}·{noise.noise_std:.6g}"
                if noise.placement == "client"
                else f"derived: C = {noise.clipping_norm} (a clipped update's coordinates)"
            ),
            "stochastic_rounding": "Flower's quantize: numpy's global generator, one step of "
            f"{params.quantization_step():.3g} at most per coordinate and client "
            + (
                "(not covered by the DP analysis)"
                if noise.placement == "client"
                else "(covered: each client clips to C less step·√d, so every rounded upload is within C)"
            ),
        }
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
        "min_uploads_to_unmask": int(min_uploads if min_uploads is not None else threshold),
        **extra,
        "server_sees": [
            (
                "the weighted average of the surviving clients' weights (the new global model)"
                if noise is None
                else "the sum of the surviving clients' clipped updates"
                + (" with the clients' noise already in it" if noise.placement == "client" else " before its noise")
            ),
            "which clients took part and which dropped out",
            (
                "each client's row count (its aggregation weight) and its training metrics (loss, ε, seconds, "
                "coordinates clipped to the SecAgg+ range)"
                if noise is None
                else "each client's row count and its training metrics (ε, seconds, whether its update was clipped "
                "to C; the training loss is withheld)"
            ),
            "masked, quantised uploads: uniformly random mod 2^32 without the other clients' mask shares",
            *(["which clients it sampled (it draws the sample and each client reports dp-sampled)"] if noise else []),
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


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that asks for the unmasking shares only with ``min_uploads`` masked uploads.

    Flower checks its reconstruction threshold per neighbourhood; the federation's own minimum
    (``federated.min_clients``, and under client noise the ``t`` the noise is sized for) must
    hold *before* anything is unmasked, not after: an honest-but-curious server that halts here
    never holds the shares, so a sum with too little noise is never revealed to it.
    """

    def __init__(self, *, min_uploads: int, **kw):
        super().__init__(**kw)
        self.min_uploads = int(min_uploads)
        self.halted: dict[int, str] = {}  # round (the workflow's) -> why it was not unmasked

    def unmask_stage(self, grid, context, state) -> bool:
        """Halt (return False) before requesting shares when fewer than ``min_uploads`` masked uploads arrived."""
        arrived = len(state.active_node_ids)
        if arrived < self.min_uploads:
            current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            self.halted[current] = (
                f"{arrived} masked upload(s) arrived, fewer than the {self.min_uploads} a round is unmasked with; "
                "no key shares were requested and nothing was unmasked"
            )
            log.error("round %d: %s", current, self.halted[current])
            return False
        return super().unmask_stage(grid, context, state)


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
        plan: UserDPPlan | None = None,
        noise: ClientNoise | None = None,
        rng: np.random.Generator | None = None,
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
        # user-level DP (issue 14): Poisson sample, global weights per round, the DP counts per round
        self.plan, self.noise = plan, noise
        self._rng = rng if rng is not None else private_rng()
        self._current: dict[int, list[np.ndarray]] = {}
        self.dp_rounds: dict[int, dict[str, int]] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        """Send to every client; under user-level DP tell each whether the Poisson sample chose it."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        absolute = server_round + self.round_offset
        self.rounds[absolute] = RoundReplies(round=absolute, sent_to=[int(p.node_id) for p, _ in pairs])
        if self.plan is None:
            return pairs
        nodes = sorted(int(p.node_id) for p, _ in pairs)
        chosen = set(poisson_sample(nodes, sample_rate=self.plan.sample_rate, rng=self._rng))
        self._current[absolute] = parameters_to_ndarrays(parameters)
        self.dp_rounds[absolute] = {"sampled": len(chosen)}
        log.info(
            "round %d: %d of %d clients sampled (Poisson, q=%g)",
            absolute,
            len(chosen),
            len(nodes),
            self.plan.sample_rate,
        )
        return [
            (proxy, FitIns(fitins.parameters, {**fitins.config, "dp-sampled": int(int(proxy.node_id) in chosen)}))
            for proxy, fitins in pairs
        ]

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
        clipped = sum(int(fitres.metrics.get("secagg-clipped", 0)) for _, fitres in results)
        if clipped:  # the unmasked sum would be of clipped weights: a wrong model, so no release
            raise RoundFailedError(
                f"round {absolute}: {clipped} uploaded coordinate(s) lay outside SecAgg+'s range and would be "
                "clipped, so the aggregate would be wrong; raise federated.secagg.clipping_range above the largest "
                "weight magnitude"
            )
        self.aggregated.add(absolute)
        if self.plan is None:
            return results[0][1].parameters, {"secagg-clients": len(results)}
        return self._dp_release(absolute, results)

    def _dp_release(self, absolute: int, results) -> tuple[Parameters, dict[str, Any]]:
        """g + (sum of the uploads [+ the server's noise]) / (q·N); the workflow unmasked sum / len(results)."""
        if self.plan is None or self.noise is None:
            raise RuntimeError("the user-level DP release needs both a plan and a noise plan")
        current = self._current.pop(absolute)
        mean = parameters_to_ndarrays(results[0][1].parameters)  # every upload has weight 1
        total = [np.asarray(m, dtype=np.float64) * len(results) for m in mean]
        if self.noise.server_noise_std > 0:
            total = [t + self._rng.normal(0.0, self.noise.server_noise_std, size=t.shape) for t in total]
        new = [
            (np.asarray(g, dtype=np.float64) + t / self.plan.expected_clients).astype(np.asarray(g).dtype)
            for g, t in zip(current, total)
        ]
        metrics = [fitres.metrics for _, fitres in results]
        counts = {
            "aggregated": sum(int(m.get("dp-sampled", 0)) for m in metrics),  # sampled clients whose update is in
            "survivors": len(results),
            "clipped": sum(int(m.get("dp-clipped", 0)) for m in metrics),
        }
        self.dp_rounds[absolute].update(counts)
        return ndarrays_to_parameters(new), {"secagg-clients": len(results), **counts}


def _short(reason: str, limit: int = 300) -> str:
    return reason if len(reason) <= limit else reason[:limit] + " ..."


def build_secagg_strategy(
    *,
    n_clients: int,
    min_clients: int,
    round_offset: int,
    initial_arrays: ArrayRecord,
    model: str = "",
    plan: UserDPPlan | None = None,
    noise: ClientNoise | None = None,
    rng: np.random.Generator | None = None,
) -> SecAggFedAvg:
    """The legacy FedAvg that :func:`run_secagg` drives, starting from ``initial_arrays``.

    With ``plan`` and ``noise`` (user-level DP) it samples, and releases ``g + sum / (q·N)``;
    ``rng`` only for tests (default: CSPRNG-seeded, unrecorded).
    """
    keys = list(initial_arrays.keys())
    return SecAggFedAvg(
        n_clients=n_clients,
        min_clients=min_clients,
        round_offset=round_offset,
        keys=keys,
        evaluate_fn=None,
        model=model,
        plan=plan,
        noise=noise,
        rng=rng,
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
    min_uploads: int = 2,
) -> None:
    """Run ``num_rounds`` rounds of ``strategy`` under SecAgg+; ``evaluate_fn`` as the message strategies get it.

    ``evaluate_fn(round, arrays)`` runs on the global model after every round (round 0: the initial one).
    A round with fewer than ``min_uploads`` masked uploads is never unmasked and fails the run.
    """
    keys = strategy.keys

    def legacy_evaluate(server_round: int, ndarrays, _config):
        arrays = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in zip(keys, ndarrays)))
        metrics = dict(evaluate_fn(server_round, arrays))
        return float(metrics.get("val_loss", metrics.get("test_loss", 0.0))), metrics

    strategy.evaluate_fn = legacy_evaluate
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    context = LegacyContext(base, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=strategy)
    secagg_round = params.workflow(timeout=timeout, min_uploads=min_uploads)

    def fit_round(grid_: Grid, ctx: LegacyContext) -> None:
        secagg_round(grid_, ctx)
        current = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        absolute = current + strategy.round_offset
        if current in secagg_round.halted:
            raise RoundFailedError(
                f"round {absolute}: {secagg_round.halted[current]}. Check the clients' logs, or lower "
                "federated.min_clients / federated.secagg.reconstruction_threshold (under client noise each client "
                "then adds more noise)"
            )
        if absolute not in strategy.aggregated:  # Flower only logs "Secure aggregation halted."
            replies = strategy.rounds.get(absolute)
            raise RoundFailedError(
                f"round {absolute}: SecAgg+ halted (too few clients answered one of its stages for the reconstruction "
                f"threshold of {params.shares_and_threshold(len(replies.sent_to) if replies else 0)[1]}); the global "
                "model would not change. Check the clients' logs, or lower federated.secagg.reconstruction_threshold"
            )

    DefaultWorkflow(fit_workflow=fit_round)(grid, context)


def max_weight_of(sizes: list[int]) -> float:
    """``max_weight`` for the workflow: the largest client's row count (so every n_i / max_weight <= 1)."""
    return float(max(sizes)) if sizes else 1.0


def check_supported(cfg: Config, *, client_evaluate: bool) -> None:
    """Refuse combinations the SecAgg+ path does not run (raise ConfigError saying what to change)."""
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
    "min_survivors",
    "noise_plan",
    "build_secagg_strategy",
    "GuardedSecAggPlusWorkflow",
    "run_secagg",
    "secagg_record",
]
