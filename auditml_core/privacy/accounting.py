"""Opacus' accountants, bit for bit, without paying twice for the same numbers.

A federated DP client asks for ε several times a round (the plan's budget check, the
training's per-epoch row, the privacy record) and every round with the same (σ, q). Opacus'
PRV accountant spends ~95% of a ``get_epsilon`` call on a Rényi-DP bound it uses only to size
its discretisation domain (``compute_safe_domain_size``, Gopi et al. remark 5.6): the RDP of one
Poisson-subsampled Gaussian step at Opacus' 150 default orders, which depends on (q, σ) alone,
is computed there twice per call (for the whole history and for one step). Measured on a
digits CNN client (q = 1/5, σ ≈ 0.9): ~1 s per PRV ε, of which ~0.06 s is the PRV itself.

This module returns the same floats as Opacus 1.6's ``PRVAccountant`` / ``RDPAccountant`` /
``get_noise_multiplier`` (``tests/core/test_accounting.py`` compares them with ``==``):

- :func:`rdp_per_step` computes the per-step RDP vector of (q, σ) once per process, with Opacus'
  own ``compute_rdp`` (``steps=1``; multiplying by the steps afterwards is what ``compute_rdp`` does);
- :func:`epsilon` memoises ε of a whole history (a pure function of the history, δ and accountant);
- :func:`noise_multiplier` is Opacus' bisection over σ, its ε computed as above.

Only the arithmetic is shared; the mechanism, the accountant's definition of ε and every
recorded number are Opacus'. The caches are bounded and hold only numbers derived from
privacy parameters (σ, q, steps, δ), never data.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain
from opacus.accountants.utils import MAX_SIGMA

HistoryKey = tuple[tuple[float, float, int], ...]  # (noise_multiplier, sample_rate, steps) per entry

ORDERS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS)  # the orders Opacus' RDP accountant and PRV domain use

# Sizes: one client process sees a handful of (q, σ) pairs (one per model it trains) and one history
# per round; a σ search visits ~20 σ. Bounded so that a long-lived process does not grow.
RDP_CACHE_SIZE = 256
EPSILON_CACHE_SIZE = 1024
MAX_BISECTION_STEPS = 200  # σ search: ~20 steps reach Opacus' tolerance; a target ε beyond float precision never does


@functools.lru_cache(maxsize=RDP_CACHE_SIZE)
def rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at :data:`ORDERS` (Opacus' ``compute_rdp``, ``steps=1``).

    Read-only: callers multiply it by their step count, as ``compute_rdp`` itself does.
    """
    vec = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS))
    vec.flags.writeable = False
    return vec


def rdp_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """ε of ``history`` by Opacus' RDP accountant (``RDPAccountant.get_epsilon`` at its default orders)."""
    if not history:
        return 0.0
    # The same sum, in the same order, as RDPAccountant.get_privacy_spent (a list summed from 0).
    rdp = sum([rdp_per_step(float(q), float(s)) * int(n) for s, q, n in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _safe_domain_size(history: Sequence[tuple[float, float, int]], *, eps_error: float, delta_error: float) -> float:
    """Opacus' ``compute_safe_domain_size`` with its RDP bounds from :func:`rdp_epsilon`."""
    total_compositions = sum(int(n) for _, _, n in history)
    bound = rdp_epsilon(history, delta=delta_error / 4)
    for s, q, _ in history:
        bound = max(bound, rdp_epsilon([(s, q, 1)], delta=delta_error / (8 * total_compositions)))
    return max(bound, eps_error) + 3


class _PRVAccountant(PRVAccountant):
    """Opacus' PRV accountant whose discretisation domain reuses the per-(q, σ) RDP vectors."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:  # type: ignore[override]
        # As PRVAccountant._get_domain, with compute_safe_domain_size replaced by _safe_domain_size.
        total_self_compositions = sum(num_self_compositions)
        history = [(p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions)]
        size = _safe_domain_size(history, eps_error=eps_error, delta_error=delta_error)
        mesh_size = eps_error / np.sqrt(total_self_compositions * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


def _uncached_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    if accountant == "rdp":
        return rdp_epsilon(history, delta=delta)
    acc = _PRVAccountant() if accountant == "prv" else create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=EPSILON_CACHE_SIZE)
def epsilon(history: HistoryKey, *, delta: float, accountant: str) -> float:
    """ε of a (non-empty, merged) accountant history at ``delta``: Opacus' ``accountant``, memoised.

    ``history`` must be hashable (a tuple of ``(σ, q, steps)`` tuples); :func:`auditml_core.privacy.dp_sgd.epsilon_of`
    merges and converts.
    """
    return _uncached_epsilon(history, delta=delta, accountant=accountant)


def noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Opacus' ``get_noise_multiplier`` (the same bisection, the same σ), each ε from :func:`_uncached_epsilon`.

    Raises
    ------
    ValueError
        If no σ up to Opacus' ``MAX_SIGMA`` reaches ``target_epsilon`` (Opacus' message).
    """
    # Transcribed from opacus.accountants.utils.get_noise_multiplier (1.6): bounds, doubling, bisection.
    # Under PRV each ε here pays the RDP bound once instead of twice (rdp_per_step is shared by its two uses).

    def eps_at(sigma: float) -> float:
        return _uncached_epsilon([(sigma, sample_rate, int(steps))], delta=delta, accountant=accountant)

    eps_high = float("inf")
    sigma_low: float = 0  # ints, as in Opacus (the annotation changes nothing at run time)
    sigma_high: float = 10
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps_at(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    # Opacus' loop runs until ε is within the tolerance of the target; for a huge target (1e300) ε never gets
    # there in floating point and σ stops changing, so it would loop forever. Bounded here: every σ_high
    # visited has ε <= target, so stopping early returns a valid (merely more cautious) σ.
    for _ in range(MAX_BISECTION_STEPS):
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        sigma = (sigma_low + sigma_high) / 2
        if sigma in (sigma_low, sigma_high):  # the interval cannot shrink any further
            break
        eps = eps_at(sigma)
        if eps < target_epsilon:
            sigma_high = sigma
            eps_high = eps
        else:
            sigma_low = sigma
    return float(sigma_high)
