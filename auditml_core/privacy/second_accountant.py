"""A second opinion on every ε: Google's ``dp-accounting`` recomputes what Opacus' accountant reported.

Opacus (PRV by default) computes the ε this project records. An auditor should not
have to trust one implementation, so the same history — (σ, sample rate, steps) of
the Poisson-subsampled Gaussian mechanism, add/remove-one adjacency — is replayed
through an independent implementation: dp-accounting's privacy-loss-distribution
(PLD) accountant, which is tight up to its discretisation, and its RDP accountant,
which is an upper bound. A correct record lies between them (up to the PLD's
discretisation error); :func:`check_epsilon` says whether it does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any, Iterable, Sequence

PLD_DISCRETISATION = 1e-4  # dp-accounting's value discretisation interval (smaller: tighter and slower)
RELATIVE_TOLERANCE = 0.02  # how far the recorded ε may sit outside [PLD, RDP] before it is flagged


@dataclass(frozen=True)
class EpsilonCheck:
    """The recorded ε against dp-accounting's PLD (tight) and RDP (upper bound) values."""

    recorded_epsilon: float
    pld_epsilon: float  # dp-accounting PLD accountant
    rdp_epsilon: float  # dp-accounting RDP accountant (upper bound)
    delta: float
    agrees: bool  # pld·(1 − tol) ≤ recorded ≤ rdp·(1 + tol)
    implementation: str  # "dp-accounting <version>"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for records and the report."""
        return asdict(self)


def _events(history: Iterable[Sequence[float]]):
    import dp_accounting

    for sigma, q, steps in history:
        if int(steps) <= 0:
            continue
        inner = dp_accounting.GaussianDpEvent(float(sigma))
        event = inner if float(q) >= 1.0 else dp_accounting.PoissonSampledDpEvent(float(q), inner)
        yield dp_accounting.SelfComposedDpEvent(event, int(steps))


def independent_epsilons(history: Iterable[Sequence[float]], *, delta: float) -> tuple[float, float]:
    """(PLD ε, RDP ε) of an accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` at ``delta``.

    Raises
    ------
    ValueError
        If ``delta`` is not in (0, 1) or a noise multiplier is not positive and finite.
    """
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    history = [tuple(h) for h in history]
    for sigma, _, _ in history:
        if not (0.0 < float(sigma) < float("inf")):
            raise ValueError(
                f"noise multiplier {sigma} must be positive and finite: no ε bounds an unbounded mechanism"
            )
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    rdp = rdp_privacy_accountant.RdpAccountant()
    for event in _events(history):
        pld.compose(event)
        rdp.compose(event)
    return float(pld.get_epsilon(delta)), float(rdp.get_epsilon(delta))


def check_epsilon(history: Iterable[Sequence[float]], *, delta: float, recorded_epsilon: float) -> EpsilonCheck:
    """Recompute ε of ``history`` independently and compare it with ``recorded_epsilon``."""
    pld_eps, rdp_eps = independent_epsilons(history, delta=delta)
    agrees = pld_eps * (1 - RELATIVE_TOLERANCE) <= recorded_epsilon <= rdp_eps * (1 + RELATIVE_TOLERANCE)
    return EpsilonCheck(
        recorded_epsilon=float(recorded_epsilon),
        pld_epsilon=pld_eps,
        rdp_epsilon=rdp_eps,
        delta=float(delta),
        agrees=bool(agrees),
        implementation=f"dp-accounting {version('dp-accounting')}",
    )
