"""Opacus' ε against an implementation we did not write (Google's dp-accounting)."""

from __future__ import annotations

import logging
import math

import pytest

from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy.second_accountant import check_epsilon, independent_epsilons
from pipeline.report import privacy as privacy_report

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


def test_rdp_orders_dp_accounting_cannot_evaluate_are_recorded_not_printed(caplog, capfd):
    # σ = 5, q = 0.5: dp-accounting cannot evaluate the RDP orders 1.1-1.9 and logs one "failed to converge"
    # warning per order (eleven lines in a default DP run); at δ = 0.1 the best remaining order, 2.0, is
    # next to a dropped one, so its RDP ε may be loose.
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from pipeline.report.privacy import independent_check

    history, delta = [(5.0, 0.5, 600)], 0.1
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(5.0))
    with caplog.at_level(logging.WARNING):
        rdp_privacy_accountant.RdpAccountant().compose(event)  # positive control: the library itself warns
    assert "failed to converge" in caplog.text
    caplog.clear()
    rec = {"accountant_history": [list(h) for h in history], "delta": delta, "epsilon": 6.0}
    with caplog.at_level(logging.DEBUG):
        chk = independent_check(rec)  # the report's replay: check_epsilon on the recorded history
    assert "failed to converge" not in caplog.text + "".join(capfd.readouterr())
    check = chk["checks"][0]
    assert check["rdp_orders_excluded"] == [1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
    assert check["rdp_optimal_order"] == 2.0 and check["rdp_may_be_loose"]
    assert check["pld_epsilon"] <= check["rdp_epsilon"]  # still an upper bound
    # The report's caveat for the check says so.
    assert "may be loose" in privacy_report.check_caveat("cnn", chk)
    # Other absl warnings still pass (only the non-convergence lines are dropped, only during the call).
    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("failed to converge elsewhere")
    assert "elsewhere" in caplog.text
    # Null: a history every order of which converges records nothing and adds no sentence.
    plain = check_epsilon([(50.0, 1.0, 10)], delta=1e-5, recorded_epsilon=0.2)
    assert plain.rdp_orders_excluded == [] and not plain.rdp_may_be_loose
    assert privacy_report._rdp_looseness([plain.to_dict() | {"who": "model"}]) == ""
