"""DP-FedAvg as a Flower strategy: Poisson client sampling, update clipping, noise on the sum.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` (flwr 1.42,
``serverapp/strategy/dp_fixed_clipping.py``)? Read against the accountant, it does not fit:

- its inner FedAvg samples a *fixed number* of clients without replacement, and its own
  accountant supports only "no-amplification" accounting for that; Poisson amplification
  would be a false claim;
- it averages the clipped weights over the clients that *replied*, weighted by
  ``num-examples`` unless an accountant forces equal weights, so one client's influence on
  the average is not bounded by ``C / m`` for a fixed ``m``;
- its noise comes from ``np.random.normal``, numpy's global, seedable generator.

So the aggregation here is :func:`auditml_core.privacy.user_level.dp_fedavg_aggregate` (uniform weights,
fixed denominator ``q·N``, CSPRNG-seeded noise), and client selection is Poisson with
rate ``q`` (:func:`auditml_core.privacy.user_level.poisson_sample`). The round bookkeeping stays
:class:`federated.app.strategies.Recording`'s: a round needs ``federated.min_clients`` trained
replies, or all of the sampled clients when fewer were sampled. Under Poisson sampling a round
with no participant is legitimate and still releases (noise only); a round whose sampled clients
all failed is not, and fails the run (it would release noise alone and call the result trained).
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from auditml_core.privacy.user_level import UserDPPlan, dp_fedavg_aggregate, poisson_sample, private_rng
from federated.app.strategies import Recording, RoundFailedError, RoundReplies

log = logging.getLogger(__name__)


class _DPFedAvgCore(FedAvg):
    """FedAvg whose sampling and aggregation are DP-FedAvg's (no recording; see :class:`UserDPFedAvg`)."""

    plan: UserDPPlan

    def _init_user_dp(self, plan: UserDPPlan, rng=None) -> None:
        self.plan, self._rng = plan, rng if rng is not None else private_rng()
        self._current: dict[int, ArrayRecord] = {}
        self.dp_rounds: dict[int, dict[str, int]] = {}  # per round: sampled, aggregated, clipped

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        chosen = poisson_sample(nodes, sample_rate=self.plan.sample_rate, rng=self._rng)
        self._current[server_round] = arrays
        self.dp_rounds[server_round] = {"sampled": len(chosen)}
        log.info(
            "round %d: %d of %d clients sampled (Poisson, q=%g)",
            server_round,
            len(chosen),
            len(nodes),
            self.plan.sample_rate,
        )
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        current = self._current.pop(server_round)
        keys = list(current.keys())
        global_w = [current[k].numpy() for k in keys]
        clients = []
        for msg in replies:
            rec = msg.content[self.arrayrecord_key]
            clients.append([rec[k].numpy() for k in keys])
        new, counts = dp_fedavg_aggregate(
            global_w,
            clients,
            clipping_norm=self.plan.clipping_norm,
            noise_multiplier=self.plan.noise_multiplier,
            expected_clients=self.plan.expected_clients,
            rng=self._rng,
        )
        self.dp_rounds[server_round].update(counts)
        if not all(np.isfinite(w).all() for w in new):
            raise RoundFailedError(
                f"round {server_round}: the DP-FedAvg release is not finite (σ={self.plan.noise_multiplier:g}, "
                f"C={self.plan.clipping_norm:g}, {counts['aggregated']} update(s)); lower client_dp.clipping_norm or "
                "check the clients' updates"
            )
        return ArrayRecord({k: Array(v) for k, v in zip(keys, new)}), MetricRecord(
            {"dp-aggregated": counts["aggregated"], "dp-clipped": counts["clipped"]}
        )


class UserDPFedAvg(Recording, _DPFedAvgCore):
    """DP-FedAvg with the federation's record (replies sorted into trained / refused / failed)."""

    def required_replies(self, record: RoundReplies) -> int:
        """``federated.min_clients``, or every sampled client when Poisson sampling drew fewer (0 sampled: 0)."""
        return min(self.min_clients, len(record.sent_to))


def build_user_dp_strategy(
    plan: UserDPPlan, *, min_clients: int = 1, round_offset: int = 0, client_evaluate: bool = False, rng=None
) -> UserDPFedAvg:
    """The DP-FedAvg strategy for ``plan``; ``rng`` only for tests (default: CSPRNG-seeded, unrecorded).

    ``min_clients``: ``federated.min_clients``, the trained replies a round needs (capped by the number sampled).
    """
    strategy = UserDPFedAvg(
        fraction_train=1.0,  # unused: configure_train samples (Poisson) itself
        min_train_nodes=0,
        min_available_nodes=plan.n_clients,
        fraction_evaluate=1.0 if client_evaluate else 0.0,
        min_evaluate_nodes=plan.n_clients if client_evaluate else 0,
    )
    strategy._init_recording(min_clients=min_clients, round_offset=round_offset)
    strategy._init_user_dp(plan, rng)
    return strategy
