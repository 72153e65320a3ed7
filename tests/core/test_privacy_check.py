"""Opacus' ε against an implementation we did not write (Google's dp-accounting)."""

from __future__ import annotations

import math

import pytest

from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy.second_accountant import check_epsilon, independent_epsilons

pytest.importorskip("dp_accounting")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 1000)],  # a textbook DP-SGD run
        [(4.09, 0.2, 200)],  # the project's CNN at ε≈3 (README figures)
        [(2.0, 0.05, 300), (2.0, 0.05, 150), (3.0, 0.1, 40)],  # resumed, then another σ and q
    ],
)
def test_opacus_epsilon_lies_between_pld_and_rdp(history, accountant):
    recorded = privacy.epsilon_of(history, delta=1e-5, accountant=accountant)
    check = check_epsilon(history, delta=1e-5, recorded_epsilon=recorded)
    assert check.agrees, check
    assert check.pld_epsilon <= check.rdp_epsilon * 1.0001


def test_a_false_epsilon_is_flagged():
    history = [(1.1, 0.01, 1000)]
    pld, rdp = independent_epsilons(history, delta=1e-5)
    assert not check_epsilon(history, delta=1e-5, recorded_epsilon=pld * 0.5).agrees  # understated
    assert not check_epsilon(history, delta=1e-5, recorded_epsilon=rdp * 1.5).agrees  # overstated beyond RDP


def test_full_batch_gaussian_matches_the_analytic_formula():
    # q = 1, one step: the Gaussian mechanism, whose exact δ(ε) is known (Balle & Wang 2018).
    sigma, eps = 2.0, 1.0
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    delta = phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)
    pld, _ = independent_epsilons([(sigma, 1.0, 1)], delta=delta)
    assert pld == pytest.approx(eps, abs=2e-3)


def test_unbounded_mechanisms_are_refused():
    with pytest.raises(ValueError, match="positive and finite"):
        independent_epsilons([(float("inf"), 0.1, 10)], delta=1e-5)
    with pytest.raises(ValueError, match="positive and finite"):
        independent_epsilons([(0.0, 0.1, 10)], delta=1e-5)
