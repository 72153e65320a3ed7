"""One-run auditing with gradient canaries (auditml_core.privacy.canaries): the ε arithmetic against scipy and
exact enumeration, a null that must certify nothing, and the σ/10 mutant DP-SGD must be caught by."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from auditml_core import models, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.privacy import canaries


def _appendix_d(m, r, v, eps, delta):
    """Steinke et al. (2023), Appendix D, written again with scipy's binomial (an independent implementation)."""
    q = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, below / i)
    return min(tail + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (1000, 100, 80, 1.0, 1e-5),
        (1000, 400, 400, 4.0, 1e-5),
        (200, 40, 22, 0.0, 0.0),
        (5000, 1000, 700, 0.5, 1e-3),
        (50, 10, 10, 2.0, 0.0),
        (1000, 1000, 990, 5.3, 1e-5),
        (1000, 200, 0, 1.0, 1e-5),
    ],
)
def test_p_value_matches_scipy(m, r, v, eps, delta):
    got = canaries.one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_appendix_d(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("r", [1, 5, 11])
def test_p_value_without_delta_is_the_randomised_response_tail_by_exact_enumeration(r):
    # ε-DP randomised response answers each of r guesses correctly with probability e^ε/(1+e^ε): enumerate all
    # 2^r outcomes and add the probability of those with >= v correct.
    eps = 0.7
    p = math.exp(eps) / (1 + math.exp(eps))
    for v in range(r + 1):
        exact = sum(p ** sum(o) * (1 - p) ** (r - sum(o)) for o in itertools.product((0, 1), repeat=r) if sum(o) >= v)
        assert canaries.one_run_p_value(m=r, r=r, v=v, epsilon=eps, delta=0.0) == pytest.approx(exact, rel=1e-12)


def test_the_epsilon_bound_is_the_largest_refuted_epsilon():
    m, r, v, delta, conf = 1000, 200, 170, 1e-5, 0.95
    eps = canaries.one_run_epsilon(m=m, r=r, v=v, delta=delta, confidence=conf)
    assert eps > 0
    assert _appendix_d(m, r, v, eps, delta) < 1 - conf <= _appendix_d(m, r, v, eps + 1e-4, delta)
    # chance-level guessing refutes nothing
    assert canaries.one_run_epsilon(m=m, r=r, v=r // 2, delta=delta) == 0.0


def test_what_the_audit_can_certify_at_all():
    # every guess right at the largest guess count, Bonferroni over the fixed guess counts
    cert = canaries.certifiable_epsilon(1000, delta=1e-5)
    level = canaries.confidence_each(0.95, len(canaries.GUESS_SHARES))
    assert cert == pytest.approx(canaries.one_run_epsilon(m=1000, r=1000, v=1000, delta=1e-5, confidence=level))
    assert 3.0 < cert < 6.0  # above the default claim ε = 3: the audit can refute it
    assert canaries.certifiable_epsilon(50, delta=1e-5) < 3.0  # 50 canaries cannot


def test_a_null_certifies_nothing():
    # Scores independent of inclusion (a model that never saw the canaries): a valid 95% bound is positive in
    # at most 5% of audits; P(Binomial(40, 0.05) > 6) < 1%.
    positives = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        audit = canaries.one_run_audit(rng.normal(size=500), rng.random(500) < 0.5, delta=1e-5)
        positives += audit["epsilon_lower_bound"] > 0
        assert audit["epsilon_lower_bound"] < 1.0
    assert positives <= 6


def test_guesses_count_top_as_in_and_bottom_as_out():
    scores = np.arange(10.0)
    included = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    assert canaries.guess_counts(scores, included, k=3) == (6, 6)
    assert canaries.guess_counts(-scores, included, k=3) == (6, 0)
    with pytest.raises(ValueError, match="guesses"):
        canaries.guess_counts(scores, included, k=6)


def _dp_sgd_with_canaries(*, noise_factor, install=True, m=1000):
    """DP-SGD (bk engine) on a small regression with canaries; returns the claimed ε and the canary audit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8)).astype(np.float32)
    torch.manual_seed(0)
    can = canaries.GradientCanaries(m, seed=1)
    net = can.wrap(models.build_regressor(n_features=8, hidden_sizes=(16,), activation="relu"))

    def on_private(private):
        if noise_factor != 1.0:
            canaries.scale_noise(private, noise_factor)
        can.install(private, insert=install)  # insert=False: the canaries' coordinates get only the noise

    result = training.fit(
        net,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=FitConfig(epochs=30, batch_size=100, lr=5e-3, max_grad_norm=1.0),
        # seeded noise: the test is deterministic (the pipeline's noise is secret, and these bounds hold at 95%)
        dp=DPConfig(enabled=True, target_epsilon=3.0, delta=1e-5, accountant="rdp", reproducible_noise=True),
        device=torch.device("cpu"),
        seed=0,
        on_private=on_private,
    )
    return result.privacy["epsilon"], canaries.one_run_audit(can.scores(), can.included, delta=1e-5), can


def test_the_sigma_over_10_mutant_fails_the_audit_and_the_true_noise_passes():
    claimed, honest, can = _dp_sgd_with_canaries(noise_factor=1.0)
    assert claimed <= 3.0 and can.steps == 90 and can.insertions > 0
    assert honest["certifiable_epsilon"] > claimed  # the audit could refute the claim...
    assert honest["epsilon_lower_bound"] <= claimed  # ...and does not: the noise is what the accountant says
    claimed_mutant, mutant, _ = _dp_sgd_with_canaries(noise_factor=0.1)
    assert claimed_mutant == pytest.approx(claimed)  # the mutant records the original ε...
    assert mutant["epsilon_lower_bound"] > claimed  # ...and the audit refutes it: FAILED


def test_a_model_that_never_saw_the_canaries_certifies_nothing():
    _, null, can = _dp_sgd_with_canaries(noise_factor=1.0, install=False)
    assert can.insertions == 0 and can.steps == 90 and np.ptp(can.scores()) > 0  # the noise was read, nothing else
    assert null["epsilon_lower_bound"] == 0.0


def test_scale_noise_rejects_a_negative_factor():
    with pytest.raises(ValueError, match="factor"):
        canaries.scale_noise(object(), -1.0)


@pytest.mark.parametrize(
    "override, key", [("audit.canaries=5", "audit.canaries"), ("audit.mutant_noise=1", "audit.mutant_noise")]
)
def test_the_audit_settings_are_validated(override, key):
    from auditml_core.config import load_config
    from auditml_core.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
    assert load_config(None, ["audit.canaries=0"]).audit.canaries == 0  # off
