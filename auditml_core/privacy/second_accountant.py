"""A second opinion on every ε: Google's ``dp-accounting`` recomputes what Opacus' accountant reported.

Opacus (PRV by default) computes the ε this project records. An auditor should not
have to trust one implementation, so the same history — (σ, sample rate, steps) of
the Poisson-subsampled Gaussian mechanism, add/remove-one adjacency — is replayed
through an independent implementation: dp-accounting's privacy-loss-distribution
(PLD) accountant, which is tight up to its discretisation, and its RDP accountant,
which is an upper bound. dp-accounting's PLD is a pessimistic (upper) estimate, so a
record at or above it is certified not to understate ε; :func:`check_epsilon` says whether
the record lies in [PLD, RDP·(1 + tolerance)] (no tolerance below: an understatement is
never accepted; a slight overstatement is safe).

The history replayed need not be the recorded one: :func:`derived_history` rebuilds the
steps and sample rate of a central DP-SGD training from the number of records, the batch
size and the epochs, so a record whose history understates them is caught too.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any, Iterable, Iterator, Sequence

PLD_DISCRETISATION = 1e-4  # dp-accounting's value discretisation interval (smaller: tighter and slower)
RELATIVE_TOLERANCE = 0.02  # how far above the RDP bound the recorded ε may sit (overstating is safe); none below PLD


@dataclass(frozen=True)
class EpsilonCheck:
    """The recorded ε against dp-accounting's PLD (tight) and RDP (upper bound) values."""

    recorded_epsilon: float
    pld_epsilon: float  # dp-accounting PLD accountant
    rdp_epsilon: float  # dp-accounting RDP accountant (upper bound)
    delta: float
    agrees: bool  # pld ≤ recorded ≤ rdp·(1 + tol): never below the PLD upper estimate
    implementation: str  # "dp-accounting <version>"
    # RDP orders dp-accounting could not evaluate ("failed to converge": it drops them from its minimum). The
    # RDP ε stays an upper bound, but when the best remaining order is next to a dropped one it may be loose.
    rdp_orders_excluded: list[float] = field(default_factory=list)
    rdp_optimal_order: float | None = None  # the order that gave rdp_epsilon
    rdp_may_be_loose: bool = False  # a neighbour of rdp_optimal_order was excluded: the RDP ε may overstate

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


@dataclass(frozen=True)
class _Replay:
    pld_epsilon: float
    rdp_epsilon: float
    rdp_optimal_order: float | None
    rdp_orders_excluded: list[float]
    rdp_may_be_loose: bool


class _NotConverged(logging.Filter):
    """Drops dp-accounting's "failed to converge" lines: the replay reads the excluded orders from the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in str(record.msg)


@contextlib.contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence only dp-accounting's non-convergence warnings, only during this call (absl logs through "absl")."""
    logger, flt = logging.getLogger("absl"), _NotConverged()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _replay(history: Iterable[Sequence[float]], *, delta: float) -> _Replay:
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
    with _quiet_rdp():
        for event in _events(history):
            pld.compose(event)
            rdp.compose(event)
        rdp_eps, order = rdp.get_epsilon_and_optimal_order(delta)
    orders = [float(o) for o in rdp.orders]
    # An order whose RDP is inf after composition is one dp-accounting dropped (it could not compute it).
    excluded = [o for o, v in zip(orders, rdp.rdp) if not math.isfinite(float(v))] if history else []
    loose = False
    if excluded and order is not None and float(order) in orders:
        i = orders.index(float(order))
        loose = any(orders[j] in excluded for j in (i - 1, i + 1) if 0 <= j < len(orders))
    return _Replay(
        pld_epsilon=float(pld.get_epsilon(delta)),
        rdp_epsilon=float(rdp_eps),
        rdp_optimal_order=None if order is None else float(order),
        rdp_orders_excluded=excluded,
        rdp_may_be_loose=bool(loose),
    )


def independent_epsilons(history: Iterable[Sequence[float]], *, delta: float) -> tuple[float, float]:
    """(PLD ε, RDP ε) of an accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` at ``delta``.

    Raises
    ------
    ValueError
        If ``delta`` is not in (0, 1) or a noise multiplier is not positive and finite.
    """
    r = _replay(history, delta=delta)
    return r.pld_epsilon, r.rdp_epsilon


def check_epsilon(history: Iterable[Sequence[float]], *, delta: float, recorded_epsilon: float) -> EpsilonCheck:
    """Recompute ε of ``history`` independently and compare it with ``recorded_epsilon``.

    dp-accounting's warnings about RDP orders it cannot evaluate are not printed: the orders it
    dropped, and whether dropping them may have loosened the RDP bound, are in the result.
    """
    r = _replay(history, delta=delta)
    agrees = r.pld_epsilon <= recorded_epsilon <= r.rdp_epsilon * (1 + RELATIVE_TOLERANCE)
    return EpsilonCheck(
        recorded_epsilon=float(recorded_epsilon),
        pld_epsilon=r.pld_epsilon,
        rdp_epsilon=r.rdp_epsilon,
        delta=float(delta),
        agrees=bool(agrees),
        implementation=f"dp-accounting {version('dp-accounting')}",
        rdp_orders_excluded=r.rdp_orders_excluded,
        rdp_optimal_order=r.rdp_optimal_order,
        rdp_may_be_loose=r.rdp_may_be_loose,
    )


def derived_history(
    *, n_records: int, batch_size: int, epochs: int, noise_multiplier: float
) -> list[tuple[float, float, int]]:
    """The history a central DP-SGD training must have spent, from its data and schedule, not from its record.

    Each epoch is ⌈n/B⌉ steps of Poisson sampling at rate q = 1/⌈n/B⌉ (Opacus' ``DPDataLoader``
    convention, whose expected batch q·n is at most B); all ``epochs`` run under DP (no early stop).

    Raises
    ------
    ValueError
        If ``n_records``, ``batch_size`` or ``epochs`` is not a positive integer.
    """
    if min(int(n_records), int(batch_size), int(epochs)) <= 0:
        raise ValueError(f"n={n_records}, batch={batch_size}, epochs={epochs}: each must be a positive integer")
    per_epoch = -(-int(n_records) // int(batch_size))  # ceil without float rounding
    return [(float(noise_multiplier), 1.0 / per_epoch, per_epoch * int(epochs))]
