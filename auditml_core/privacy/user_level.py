"""User-level (client-level) differential privacy: DP-FedAvg's mechanism and its accountant.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018), with the unit of privacy *a whole client's data*:

- each round every client takes part independently with probability ``q`` (Poisson
  sampling of clients, drawn from the OS's CSPRNG and never recorded);
- each participant's model update (its weights minus the global weights) is clipped
  to L2 norm ``C``;
- the server adds Gaussian noise of standard deviation ``σ·C`` to the *sum* of the
  clipped updates and divides by the fixed expected number of participants ``q·N``
  (not by the observed number, which depends on who took part);
- one round is therefore one Poisson-subsampled Gaussian mechanism with noise
  multiplier ``σ`` and sample rate ``q`` under add/remove-one-client adjacency, and
  ``R`` rounds compose as Opacus accounts DP-SGD steps: history ``[(σ, q, R)]``.

This module is numpy and Opacus only (no Flower): the Flower strategy in
``federated/app/user_dp.py`` calls :func:`dp_fedavg_aggregate` and :func:`poisson_sample`.
The ε recorded by :func:`user_privacy_record` is recomputed by Google's dp-accounting
(:func:`auditml_core.privacy.second_accountant.check_epsilon`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from auditml_core import seeds
from auditml_core.config import ClientDPConfig
from auditml_core.errors import PrivacyBudgetError
from auditml_core.privacy.client_noise import (
    ClientNoise,
    clip_probability,
    delta_with_clipping,
    known_sample_epsilon,
    tail_probability,
)
from auditml_core.privacy.dp_sgd import _noise_multiplier, epsilon_of
from auditml_core.privacy.second_accountant import check_epsilon

UNIT_OF_PRIVACY = "a whole client's data (user-level DP: adding or removing one client and everything it holds)"
UNIT_OF_PRIVACY_ZERO_OUT = (
    "a whole client's data (user-level DP, zero-out: replacing everything one client holds by a client that "
    "contributes a zero update; which clients take part is not hidden)"
)


@dataclass(frozen=True)
class UserDPPlan:
    """Every number that defines the user-level ε, fixed before the first round."""

    noise_multiplier: float  # σ: noise std on the sum of clipped updates, in units of clipping_norm
    clipping_norm: float  # C: L2 bound on one client's update per round
    sample_rate: float  # q: per-round participation probability of each client (Poisson)
    rounds: int  # R: rounds the budget covers
    n_clients: int  # N
    delta: float
    target_epsilon: float
    planned_epsilon: float  # ε after all R rounds, amplified by sampling (against whoever does not know the sample)
    accountant: str  # Opacus accountant used for planned_epsilon
    # ε against the server, which draws the sample (and anyone holding the record, which lists it): sampling does
    # not amplify against them, and a client may take part in all R rounds. The budget binds this one.
    known_sample_epsilon: float = 0.0

    @property
    def expected_clients(self) -> float:
        """q·N, the fixed denominator of the noisy average."""
        return self.sample_rate * self.n_clients

    def history(self, rounds: int | None = None) -> list[tuple[float, float, int]]:
        """Opacus accountant history after ``rounds`` rounds (default: all planned rounds)."""
        r = self.rounds if rounds is None else int(rounds)
        return [(self.noise_multiplier, self.sample_rate, r)] if r > 0 else []


def user_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str) -> float:
    """ε of ``rounds`` Poisson-subsampled Gaussian rounds (σ, q) at ``delta`` (Opacus)."""
    if rounds <= 0:
        return 0.0
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta=delta, accountant=accountant)


def plan_user_dp(cfg: ClientDPConfig, *, rounds: int, n_clients: int) -> UserDPPlan:
    """Plan σ for ``rounds`` rounds and refuse a plan over the user-level budget, before any training.

    Parameters
    ----------
    cfg : the ``client_dp`` config section (budget, δ, q, C, optional fixed σ, accountant).
    rounds : federated rounds the budget must cover.
    n_clients : clients in the federation (N).

    Returns
    -------
    UserDPPlan

    With ``sample_rate < 1`` the budget is enforced against the strongest party of the threat model:
    the server draws the client sample (and the record lists it), so against it sampling does not
    amplify and a client sampled in all ``rounds`` rounds has ``ε(σ, q = 1, rounds)``; σ is planned
    for that, and the amplified ε (``planned_epsilon``) is what an outsider holding only the model faces.

    Raises
    ------
    PrivacyBudgetError
        If the fixed ``noise_multiplier`` would exceed ``target_epsilon`` (against the server), no σ
        reaches it, or ``delta`` is not below ``1/n_clients`` (a δ that large allows releasing one client outright).
    """
    if cfg.delta >= 1.0 / n_clients:
        raise PrivacyBudgetError(
            f"client_dp.delta={cfg.delta} is not below 1/federated.n_clients={1.0 / n_clients:.3g}: a δ that large "
            "permits publishing one whole client's data; lower client_dp.delta (e.g. to 0.01/n_clients)"
        )
    if cfg.noise_multiplier > 0:
        sigma = float(cfg.noise_multiplier)
    else:
        try:
            # q = 1: the budget holds against the server, who knows the sample (see above)
            sigma = _noise_multiplier(cfg.target_epsilon, cfg.delta, 1.0, int(rounds), cfg.accountant)
        except ValueError as exc:
            raise PrivacyBudgetError(
                f"no noise multiplier reaches user-level ε={cfg.target_epsilon} at δ={cfg.delta} over {rounds} rounds "
                f"with sample rate {cfg.sample_rate} ({exc}); raise client_dp.target_epsilon or lower the rounds (<model>.federated.rounds)"
            ) from None
    planned = user_epsilon(
        noise_multiplier=sigma, sample_rate=cfg.sample_rate, rounds=rounds, delta=cfg.delta, accountant=cfg.accountant
    )
    known = (
        planned
        if cfg.sample_rate >= 1.0
        else user_epsilon(
            noise_multiplier=sigma, sample_rate=1.0, rounds=rounds, delta=cfg.delta, accountant=cfg.accountant
        )
    )
    if known > cfg.target_epsilon:
        against = (
            ""
            if cfg.sample_rate >= 1.0
            else f" against the server, which draws the client sample so sampling does not amplify ({planned:.3f} "
            "against an outsider)"
        )
        raise PrivacyBudgetError(
            f"the planned federation would spend user-level ε={known:.3f}{against} > client_dp.target_epsilon="
            f"{cfg.target_epsilon} at δ={cfg.delta} (σ={sigma}, q={cfg.sample_rate}, {rounds} rounds); raise "
            "client_dp.noise_multiplier (or set it to 0 to plan it), lower the rounds (<model>.federated.rounds), or raise the budget"
        )
    return UserDPPlan(
        noise_multiplier=sigma,
        clipping_norm=float(cfg.clipping_norm),
        sample_rate=float(cfg.sample_rate),
        rounds=int(rounds),
        n_clients=int(n_clients),
        delta=float(cfg.delta),
        target_epsilon=float(cfg.target_epsilon),
        planned_epsilon=planned,
        accountant=cfg.accountant,
        known_sample_epsilon=known,
    )


# The noise-to-signal ratio (see aggregate_noise) at and above which the noise DP-FedAvg adds over all rounds is at
# least as large as the largest change all the clients together can make: the noise dominates the released weights.
# Measured (docs/privacy.md): the regressor (385 weights) learned at 0.2-1.0 (test R² 0.29-0.35), barely at 2.0
# (0.09), not at 4.5 (the defaults: 5 clients, ε = 3: R² -9447); the CNN (35,914 weights) reached accuracy 0.24 at
# 4.9 (20 clients, ε = 8; chance 0.10, non-private 0.99).
NOISE_DOMINATES = 1.0


def aggregate_noise(plan: UserDPPlan, *, n_parameters: int) -> dict[str, Any]:
    """How loud DP-FedAvg's noise is against the largest signal the clients can send, before any round.

    Each round the server releases the previous model plus ``(Σ clipped updates + N(0, σ²C²·I)) / (q·N)``.
    The noise has standard deviation ``σ·C/(q·N)`` on each of the ``d`` weights, so an L2 norm of about
    ``σ·C·√d/(q·N)``; the clients' average update is at most ``C`` (all of them clipped and aligned). Over
    ``R`` rounds aligned updates add up to ``R·C`` while the noise grows as ``√R``::

        noise_to_signal = σ·√d / (q·N·√R)

    a best case (real updates are shorter than C and not aligned). At or above :data:`NOISE_DOMINATES` the
    noise alone moves the weights farther than all the clients can: the noise dominates what training changes.

    Returns
    -------
    ``{"noise_std_per_weight", "noise_norm_per_round", "signal_norm_max", "noise_to_signal_per_round",
    "noise_to_signal", "n_parameters", "clients_needed", "dominated", "formula"}``; ``clients_needed`` is the
    N at which ``noise_to_signal`` falls to 0.5 with σ, q and R unchanged.
    """
    d = int(n_parameters)
    if d < 1:
        raise ValueError(f"n_parameters={n_parameters}; need >= 1")
    sigma, c, q, n, r = plan.noise_multiplier, plan.clipping_norm, plan.sample_rate, plan.n_clients, max(plan.rounds, 1)
    per_weight = sigma * c / (q * n)
    per_round = sigma * math.sqrt(d) / (q * n)
    ratio = per_round / math.sqrt(r)
    return {
        "noise_std_per_weight": per_weight,
        "noise_norm_per_round": per_weight * math.sqrt(d),
        "signal_norm_max": c,
        "noise_to_signal_per_round": per_round,
        "noise_to_signal": ratio,
        "n_parameters": d,
        "clients_needed": math.ceil(sigma * math.sqrt(d) / (q * math.sqrt(r) * 0.5)),
        "dominated": ratio >= NOISE_DOMINATES,
        "formula": "σ·√d / (q·N·√R): the noise's norm over all rounds against the largest aligned signal R·C",
    }


def noise_warning(name: str, plan: UserDPPlan, noise: Mapping[str, Any]) -> str | None:
    """One line naming the model when DP-FedAvg's noise dominates (:func:`aggregate_noise`), else None."""
    if not noise["dominated"]:
        return None
    return (
        f"{name}: user-level DP will drown the model in noise: noise-to-signal {noise['noise_to_signal']:.3g} >= "
        f"{NOISE_DOMINATES:g} (σ = {plan.noise_multiplier:.3g}, C = {plan.clipping_norm:g}, q = {plan.sample_rate:g}, "
        f"N = {plan.n_clients} clients, {plan.rounds} rounds, {noise['n_parameters']} weights: the noise on each "
        f"weight has std {noise['noise_std_per_weight']:.3g} per round): the noise moves the weights farther than all "
        "the clients together can, so expect a model far below its non-private quality, possibly at chance (the "
        f"report compares it with a trivial predictor). Use at least ~{noise['clients_needed']} clients "
        "(federated.n_clients), a larger client_dp.target_epsilon, more rounds, or a smaller model"
    )


def private_rng() -> np.random.Generator:
    """A generator seeded from the OS's CSPRNG and never recorded: client sampling and noise rest on it.

    256 bits of ``os.urandom`` (:func:`auditml_core.seeds.os_entropy`) go through a 256-bit
    ``SeedSequence`` pool into PCG64's 128-bit state and 127-bit increment. numpy's PCG64 is not
    itself a CSPRNG: a seeded PRNG with a secret full-entropy state, fresh per call (see STYLE:
    the randomness a privacy guarantee rests on is never recorded).
    """
    entropy = int.from_bytes(seeds.os_entropy(32), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, pool_size=8)))


def poisson_sample(ids: Sequence[int], *, sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Each id independently with probability ``sample_rate`` (may be empty: that round still releases noise)."""
    if sample_rate >= 1.0:
        return list(ids)
    keep = rng.random(len(ids)) < sample_rate
    return [i for i, k in zip(ids, keep) if k]


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of a list of arrays taken as one flat vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(update: Sequence[np.ndarray], *, clipping_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``clipping_norm``; returns (clipped arrays, norm before clipping)."""
    norm = l2_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [np.asarray(u, dtype=np.float64) * scale for u in update], norm


def dp_fedavg_aggregate(
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[Sequence[np.ndarray]],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], dict[str, int]]:
    """One DP-FedAvg release: global + (Σ clip(client − global) + N(0, σ²C²)) / (q·N).

    Parameters
    ----------
    global_weights : the weights the clients started from, one array per tensor.
    client_weights : each participant's returned weights, same layout (may be empty).
    clipping_norm : C.
    noise_multiplier : σ; the noise on the sum has standard deviation σ·C per coordinate.
    expected_clients : q·N, the fixed (data-independent) denominator.
    rng : the private generator (:func:`private_rng`).

    Returns
    -------
    (new global weights in the dtypes of ``global_weights``, counts {"aggregated", "clipped"}).
    """
    total = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
    clipped = 0
    for weights in client_weights:
        update = [
            np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64) for w, g in zip(weights, global_weights)
        ]
        bounded, norm = clip_update(update, clipping_norm=clipping_norm)
        clipped += int(norm > clipping_norm)
        for t, b in zip(total, bounded):
            t += b
    std = noise_multiplier * clipping_norm
    new = [
        (np.asarray(g, dtype=np.float64) + (t + rng.normal(0.0, std, size=t.shape)) / expected_clients).astype(
            np.asarray(g).dtype
        )
        for g, t in zip(global_weights, total)
    ]
    return new, {"aggregated": len(client_weights), "clipped": clipped}


def user_privacy_record(
    plan: UserDPPlan,
    *,
    completed_rounds: int,
    sample_level: dict[str, Any] | None = None,
    noise: ClientNoise | None = None,
    n_parameters: int = 0,
    max_participations: int | None = None,
) -> dict[str, Any]:
    """The JSON record of the user-level guarantee: plan, ε spent so far, the independent check, the unit.

    ``sample_level`` is the federation's sample-level DP-SGD summary when that is on too; both
    levels are then stated (they bound different adjacencies and do not add up).

    ``noise`` is the secure-aggregation noise plan (``auditml_core/privacy/client_noise.py``; None: server noise
    without SecAgg+). Under client noise δ gets the SecAgg+ clipping term over all ``N·R``
    uploads of ``n_parameters`` coordinates: ``delta`` is the total, ``delta_accountant`` the part
    the accountant used, ``delta_clip`` the rest. ``max_participations`` (the most rounds any
    client was sampled in) gives ``known_sample``: the un-amplified ε that holds against the
    server and anyone holding the record, which both know who was sampled.
    """
    import opacus

    history = plan.history(completed_rounds)
    spent = epsilon_of(history, delta=plan.delta, accountant=plan.accountant)
    out: dict[str, Any] = {
        **asdict(plan),
        "expected_clients": plan.expected_clients,
        "completed_rounds": int(completed_rounds),
        "epsilon": spent,
        "accountant_history": [list(h) for h in history],
        "opacus_version": opacus.__version__,
        "mechanism": (
            "DP-FedAvg (McMahan et al. 2018): Poisson client sampling with rate q, per-client update clipping to C, "
            "Gaussian noise σ·C on the sum, fixed denominator q·N, uniform client weights"
        ),
        "noise_placement": noise.placement if noise is not None else "server",
        "sampling": "poisson" if plan.sample_rate < 1 else "all clients every round (q = 1, no amplification)",
        "unit_of_privacy": UNIT_OF_PRIVACY,
        "noise_seeded": False,  # CSPRNG-seeded, never recorded
        "delta_accountant": plan.delta,
        "delta_clip": 0.0,
    }
    if noise is not None:
        out.update(_client_noise_terms(plan, noise, n_parameters=n_parameters, epsilon=spent))
    if max_participations is not None:
        out["known_sample"] = _known_sample(plan, max_participations=max_participations, delta=out["delta"])
    if n_parameters > 0:
        out["aggregate_noise"] = aggregate_noise(plan, n_parameters=n_parameters)
    if history:
        out["independent_check"] = check_epsilon(history, delta=plan.delta, recorded_epsilon=spent).to_dict()
    if sample_level is not None:
        out["sample_level"] = {
            "epsilon": sample_level.get("epsilon"),
            "delta": sample_level.get("delta"),
            "unit_of_privacy": sample_level.get("unit_of_privacy"),
        }
    return out


def _client_noise_terms(plan: UserDPPlan, noise: ClientNoise, *, n_parameters: int, epsilon: float) -> dict[str, Any]:
    """What secure-aggregation noise changes in the record: δ's clipping term, the noise plan, under client noise
    the unit of privacy and the mechanism."""
    uploads = plan.n_clients * plan.rounds  # every client uploads every round under SecAgg+ (planned rounds)
    p_clip = clip_probability(noise, n_parameters=n_parameters, uploads=uploads)
    total, term = delta_with_clipping(delta=plan.delta, epsilon=epsilon, clip_prob=p_clip)
    out: dict[str, Any] = {"delta": total, "delta_clip": term}
    out["client_noise"] = {
        **noise.to_dict(),
        "n_parameters": int(n_parameters),
        "uploads_bounded": uploads,
        "clip_probability": p_clip,
        "clip_probability_per_coordinate": tail_probability(noise.clip_sigmas),
        "adjacency": "zero-out (one client's data replaced by a null client with a zero update)",
        "argument": "auditml_core/privacy/client_noise.py (module docstring)",
    }
    if noise.placement == "client":
        out["unit_of_privacy"] = UNIT_OF_PRIVACY_ZERO_OUT
        out["mechanism"] = (
            "DP-FedAvg with distributed noise under SecAgg+: Poisson client sampling with rate q; every client "
            "uploads its update clipped to C (zero if not sampled) plus N(0, σ²C²/t); the server unmasks only "
            "with at least t uploads, so the sum carries noise of std >= σ·C; fixed denominator q·N"
        )
    return out


def _known_sample(plan: UserDPPlan, *, max_participations: int, delta: float) -> dict[str, Any]:
    """The un-amplified ε against whoever knows who was sampled (the server, anyone holding the record)."""
    return {
        "max_participations": int(max_participations),
        "epsilon": known_sample_epsilon(
            noise_multiplier=plan.noise_multiplier,
            participations=int(max_participations),
            delta=plan.delta,
            accountant=plan.accountant,
        ),
        "delta": delta,
        "why": "the server drew the sample and the record lists who trained in which round: against them "
        "sampling does not amplify, and a client is protected by σ over the rounds it took part in",
    }
