"""Client-side (distributed) noise for DP-FedAvg under secure aggregation, and why the accountant still holds.

With ``client_dp.noise_placement = "client"`` (``federated/app/secagg.py`` runs it) the server never
holds an un-noised update, not even the un-noised sum. Per round ``r``:

1. the server draws ``S_r`` by Poisson sampling (every client independently with probability
   ``q``, from the OS's CSPRNG, never recorded) and tells each client whether it is in ``S_r``;
2. **every** client of the federation takes part in SecAgg+: a sampled one trains and takes
   ``c_i = clip_C(w_i − g)`` (its update clipped to L2 norm ``C``), a non-sampled one
   ``c_i = 0``; each adds ``z_i ~ N(0, s²·I_d)`` with ``s = σ·C/√t`` (:func:`noisy_upload`),
   and uploads ``u_i = c_i + z_i`` only if every coordinate lies within the SecAgg+ range
   ``±R``, ``R = C + k·s`` (:func:`out_of_range`; otherwise it refuses and drops out: SecAgg+
   never clips silently);
3. the server stops *before* it asks for the key shares that unmask the sum unless at least
   ``t`` masked uploads arrived (``t`` = the federation's minimum for releasing a round, at
   least the SecAgg+ reconstruction threshold; see ``federated/app/secagg.py``), and otherwise
   releases ``g' = g + Σ_{i∈A} Q(u_i) / (q·N)`` over the set ``A`` of surviving clients, with
   ``Q`` SecAgg+'s stochastic rounding to steps of ``2R / quantization_range``.

The argument (zero-out adjacency: ``D'`` replaces one client ``x``'s data by a null client
that takes part in every step exactly as ``x`` does, is sampled with the same probability and
whose update is zero; the set of clients is no secret from the server, which talks to each):

- *Conditioning.* Fix everything that does not involve ``x``'s data: the others' sampling,
  their updates, their noise beyond what is used below, the survivor set ``A`` and the earlier
  releases. Assumption (A1): who survives a round does not depend on any client's data nor on
  who was sampled. Then ``|A| ≥ t`` (step 3) and the released sum is
  ``Σ_{A∖x} c_i + 1[x ∈ S_r]·c_x + Z`` with ``Z ~ N(0, |A|·s²·I_d)``; write
  ``Z = Z₀ + Z₁``, ``Z₀ ~ N(0, σ²C²·I_d)`` and ``Z₁ ~ N(0, (|A| − t)·s²·I_d)`` independent of
  ``x``: adding ``Z₁`` and the others' sum is post-processing.
- *One round.* What remains is ``(1 − q)·N(0, σ²C²) + q·N(c_x, σ²C²)`` against ``N(0, σ²C²)``
  with ``‖c_x‖ ≤ C``: exactly the pair the Poisson-subsampled Gaussian accountant bounds for
  add/remove adjacency (Opacus' RDP/PRV, dp-accounting's PLD), noise multiplier ``σ``, rate
  ``q``. Mixing over the conditioning (the same mixture weights in ``D`` and ``D'``, by A1)
  keeps the bound (joint convexity of the hockey-stick divergence).
- *Rounds.* The rounds compose adaptively: the accountant history is ``[(σ, q, R)]``, the same
  as the server-noise path, and the server-side denominator stays ``q·N``.
- *No clipping, no refusal.* Every coordinate of every upload satisfies ``|u_ij| ≤ C + |z_ij|``,
  so the event ``B`` "some coordinate of some upload of the run leaves ``±R``" has probability
  at most ``p = N·R_rounds·d·2Φ(−k)`` (union bound over all clients, rounds, coordinates) in
  every world (:func:`clip_probability`). Outside ``B`` the run is the mechanism above; a
  mechanism that equals an ``(ε, δ)``-DP one except on an event of probability ``≤ p`` is
  ``(ε, δ + (1 + e^ε)·p)``-DP. The record keeps both parts of δ.

What the argument does *not* cover, and the record and report say so:

- the stochastic rounding ``Q``: the server sees ``Σ Q(u_i)``, which depends on the individual
  ``u_i`` (each with only ``s`` of noise) beyond their sum, by less than one rounding step per
  client and coordinate; its step is recorded. It also draws from numpy's global generator.
- an observer who knows ``S_r``: the amplification by sampling needs the sample to be secret.
  The server chose it, and the record lists who trained in which round, so against the server
  and anyone holding the run directory the guarantee is the un-amplified one over the rounds a
  client took part in, ``ε(σ, q = 1, k_x)`` (:func:`known_sample_epsilon`); it is recorded
  next to the amplified one.
- collusion: a sampled client that hands its noise to the server lowers the multiplier the
  server faces to ``σ·√((|A| − c)/t)`` for ``c`` colluders; SecAgg+'s own assumptions
  (honest-but-curious server, fewer than the threshold of a client's share holders colluding).
- what clients send in the clear: row counts and seconds (training loss is withheld under
  client noise), and the Gaussian draws are float64 numpy PCG64, not a floating-point-safe
  discrete sampler (Mironov 2012).
- A1 is an assumption about the deployment: a client whose dropping out depends on its data
  or on being sampled (a slow trainer timing out) changes ``|A|`` with ``x``'s sampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from auditml_core.errors import ConfigError, PrivacyBudgetError
from auditml_core.privacy.dp_sgd import epsilon_of


@dataclass(frozen=True)
class ClientNoise:
    """What each client adds and the SecAgg+ range that keeps it unclipped (see the module docstring)."""

    placement: str  # "client": each client adds noise_std; "server": clients clip only, the server adds σ·C
    min_survivors: int  # t: a round is unmasked only with at least this many uploads
    noise_std: float  # s = σ·C/√t per coordinate per client (0 under server placement)
    server_noise_std: float  # σ·C under server placement, 0 under client placement
    clipping_norm: float  # C
    clip_sigmas: float  # k
    clipping_range: float  # R = C + k·s: SecAgg+'s per-coordinate range

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def plan_client_noise(
    *, placement: str, noise_multiplier: float, clipping_norm: float, min_survivors: int, clip_sigmas: float
) -> ClientNoise:
    """The per-client noise and SecAgg+ range for ``σ``, ``C`` and ``t`` survivors.

    Parameters
    ----------
    placement : "client" (distributed noise) or "server" (clients clip, the server adds σ·C to the sum).
    noise_multiplier : σ of the plan (noise std on the sum in units of C).
    clipping_norm : C.
    min_survivors : t, the fewest uploads a round is unmasked with (>= 1).
    clip_sigmas : k; the per-coordinate clip chance of one upload is at most 2Φ(−k).

    Raises
    ------
    ValueError
        If ``min_survivors`` < 1 or ``placement`` is unknown.
    """
    if min_survivors < 1:
        raise ValueError(f"min_survivors={min_survivors} must be >= 1")
    if placement not in ("client", "server"):
        raise ValueError(f"placement={placement!r} must be 'client' or 'server'")
    s = noise_multiplier * clipping_norm / math.sqrt(min_survivors) if placement == "client" else 0.0
    return ClientNoise(
        placement=placement,
        min_survivors=int(min_survivors),
        noise_std=float(s),
        server_noise_std=float(noise_multiplier * clipping_norm) if placement == "server" else 0.0,
        clipping_norm=float(clipping_norm),
        clip_sigmas=float(clip_sigmas),
        # server placement: a clipped update's coordinates are within ±C; the margin absorbs float rounding
        clipping_range=float(clipping_norm + clip_sigmas * s) if s > 0 else float(clipping_norm) * (1 + 1e-6),
    )


def tail_probability(k: float) -> float:
    """2Φ(−k) = P(|N(0, 1)| > k)."""
    return math.erfc(k / math.sqrt(2.0))


def clip_probability(noise: ClientNoise, *, n_parameters: int, uploads: int) -> float:
    """Union bound on the chance that any coordinate of any of ``uploads`` uploads leaves ``±R``.

    Each coordinate is ``c_ij + z_ij`` with ``|c_ij| <= C``, so it leaves ``±(C + k·s)`` only if
    ``|z_ij| > k·s``: probability ``2Φ(−k)``. Zero under server placement (no noise, ``|c_ij| <= C``).
    """
    if noise.noise_std == 0:
        return 0.0
    return min(1.0, float(uploads) * float(n_parameters) * tail_probability(noise.clip_sigmas))


def delta_with_clipping(*, delta: float, epsilon: float, clip_prob: float) -> tuple[float, float]:
    """(total δ, the clipping term (1 + e^ε)·p): the guarantee of a mechanism equal to an (ε, δ) one except w.p. p."""
    term = (1.0 + math.exp(min(epsilon, 700.0))) * clip_prob
    return delta + term, term


def check_clip_term(*, delta: float, epsilon: float, clip_prob: float) -> None:
    """Refuse a plan whose clipping term would exceed the accountant's δ (raise client_dp.clip_sigmas).

    Raises
    ------
    PrivacyBudgetError
        If ``(1 + e^ε)·p > δ``.
    """
    _, term = delta_with_clipping(delta=delta, epsilon=epsilon, clip_prob=clip_prob)
    if term > delta:
        raise PrivacyBudgetError(
            f"the chance that SecAgg+ would clip a noised upload adds (1 + e^ε)·p = {term:.3g} to δ, more than "
            f"client_dp.delta={delta}; raise client_dp.clip_sigmas"
        )


def noisy_upload(
    global_weights: Sequence[np.ndarray],
    weights: Sequence[np.ndarray] | None,
    *,
    clipping_norm: float,
    noise_std: float,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """One client's upload ``clip_C(weights − global) + N(0, noise_std²)`` (``weights=None``: not sampled, zero update).

    Returns
    -------
    (upload arrays in float64, the update's L2 norm before clipping; 0 when not sampled).
    """
    norm = 0.0
    if weights is None:
        contribution = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
    else:
        update = [
            np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64) for w, g in zip(weights, global_weights)
        ]
        norm = float(np.sqrt(sum(float(np.sum(np.square(u))) for u in update)))
        scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        contribution = [u * scale for u in update]
    if noise_std > 0:
        contribution = [c + rng.normal(0.0, noise_std, size=c.shape) for c in contribution]
    return contribution, norm


def rounding_safe_norm(clipping_norm: float, *, quantization_step: float, n_parameters: int) -> float:
    """The L2 bound a client clips to, under server-placed noise, so its *rounded* upload stays within ``C``.

    SecAgg+ stochastically rounds every uploaded coordinate to a grid of width
    ``quantization_step``: each moves by less than one step, so the L2 norm grows by less than
    ``step·√d``. Clipping to ``C − step·√d`` keeps every rounded upload within ``C``. The
    server's Gaussian noise is then added to a sum whose one-client change is, for every
    outcome of the rounding, at most ``C``; the mechanism is a mixture over those outcomes of
    Gaussian mechanisms of sensitivity ≤ ``C``, and a mixture of pairs that each satisfy the
    (ε, δ) bound satisfies it too (joint convexity of the hockey-stick divergence). So, with
    server placement, the rounding is covered by the accountant's ε.

    Raises
    ------
    ConfigError
        If the slack is not below ``C`` (the quantisation is too coarse for this bound).
    """
    slack = float(quantization_step) * math.sqrt(float(n_parameters))
    if slack >= clipping_norm:
        raise ConfigError(
            f"SecAgg+'s quantisation slack step·√d = {slack:.3g} ({n_parameters} parameters) is not below "
            f"client_dp.clipping_norm={clipping_norm}; raise federated.secagg.quantization_range"
        )
    return float(clipping_norm) - slack


def out_of_range(upload: Sequence[np.ndarray], clipping_range: float) -> int:
    """Coordinates of ``upload`` that SecAgg+ would clip (``|x| > clipping_range``)."""
    return int(sum(int(np.sum(np.abs(u) > clipping_range)) for u in upload))


def known_sample_epsilon(*, noise_multiplier: float, participations: int, delta: float, accountant: str) -> float:
    """ε against an observer who knows the sample: ``participations`` un-amplified Gaussian rounds (q = 1)."""
    if participations <= 0:
        return 0.0
    return epsilon_of([(noise_multiplier, 1.0, int(participations))], delta=delta, accountant=accountant)


__all__ = [
    "ClientNoise",
    "check_clip_term",
    "rounding_safe_norm",
    "clip_probability",
    "delta_with_clipping",
    "known_sample_epsilon",
    "noisy_upload",
    "out_of_range",
    "plan_client_noise",
    "tail_probability",
]
