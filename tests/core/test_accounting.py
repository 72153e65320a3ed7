"""auditml_core.privacy.accounting gives Opacus' numbers bit for bit, and its caches hit only on identical inputs."""

import dataclasses

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from auditml_core.config import DPConfig
from auditml_core.privacy import accounting
from auditml_core.privacy import dp_sgd as privacy

DELTA = 1e-5
# Two (σ, q) entries: the multi-entry path; cheap enough for stock PRV on two loaded cores (~1 s).
HISTORY = [(2.0, 0.05, 40), (1.5, 0.1, 10)]


def _stock(history, *, delta, accountant):
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@pytest.fixture(autouse=True)
def cold_caches():
    """Each test starts (and leaves) the process's caches empty, so hits and misses are its own."""
    for cached in (accounting.epsilon, accounting.rdp_per_step, privacy._noise_multiplier):
        cached.cache_clear()
    yield
    for cached in (accounting.epsilon, accounting.rdp_per_step, privacy._noise_multiplier):
        cached.cache_clear()


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_is_opacus_epsilon_bit_for_bit(accountant):
    stock = _stock(HISTORY, delta=DELTA, accountant=accountant)
    assert privacy.epsilon_of(HISTORY, delta=DELTA, accountant=accountant) == stock  # cold
    assert privacy.epsilon_of(HISTORY, delta=DELTA, accountant=accountant) == stock  # from the cache
    # The per-step RDP vectors are now warm: a longer history of the same (σ, q) pairs still matches Opacus.
    longer = [*HISTORY[:-1], (HISTORY[-1][0], HISTORY[-1][1], 3 * HISTORY[-1][2])]
    assert privacy.epsilon_of(longer, delta=DELTA, accountant=accountant) == _stock(
        longer, delta=DELTA, accountant=accountant
    )


def test_noise_multiplier_is_opacus_sigma_bit_for_bit():
    kw = {"target_epsilon": 1.0, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}
    stock = get_noise_multiplier(target_delta=DELTA, **kw)
    assert accounting.noise_multiplier(delta=DELTA, **kw) == stock
    with pytest.raises(ValueError, match="too low"):  # Opacus' refusal too
        accounting.noise_multiplier(delta=DELTA, **{**kw, "target_epsilon": 1e-9})


@pytest.mark.slow
def test_noise_multiplier_is_opacus_sigma_under_prv():
    kw = {"target_epsilon": 3.0, "sample_rate": 0.25, "steps": 20, "accountant": "prv"}
    assert accounting.noise_multiplier(delta=DELTA, **kw) == get_noise_multiplier(target_delta=DELTA, **kw)


def test_epsilon_cache_hits_only_the_same_history_delta_and_accountant():
    # RDP: the cache sits above the accountant, so the cheap one tests the key (bit-identity is tested above).
    history = [(1.1, 0.25, 10), (1.1, 0.25, 10)]  # merged into one entry of 20 steps before the lookup
    first = privacy.epsilon_of(history, delta=DELTA, accountant="rdp")
    info = accounting.epsilon.cache_info()
    assert (info.hits, info.misses) == (0, 1)
    again = privacy.epsilon_of([(1.1, 0.25, 20)], delta=DELTA, accountant="rdp")
    assert again == first == accounting.epsilon.__wrapped__(((1.1, 0.25, 20),), delta=DELTA, accountant="rdp")
    assert accounting.epsilon.cache_info().hits == 1
    # Any changed input is a miss with its own value.
    changed = [
        ([(1.1, 0.25, 21)], DELTA, "rdp"),  # one more step
        ([(1.2, 0.25, 20)], DELTA, "rdp"),  # σ
        ([(1.1, 0.2, 20)], DELTA, "rdp"),  # q
        ([(1.1, 0.25, 20)], 1e-6, "rdp"),  # δ
        ([(1.1, 0.25, 20)], DELTA, "gdp"),  # accountant
    ]
    for h, delta, acc in changed:
        misses = accounting.epsilon.cache_info().misses
        eps = privacy.epsilon_of(h, delta=delta, accountant=acc)
        assert accounting.epsilon.cache_info().misses == misses + 1, (h, delta, acc)
        assert eps != first
    assert privacy.epsilon_of([], delta=DELTA, accountant="rdp") == 0.0


def test_a_cached_plan_is_the_uncached_plan_and_a_changed_input_replans():
    dp = DPConfig(enabled=True, target_epsilon=2.0, delta=DELTA, accountant="rdp")
    kw = {"n_samples": 230, "batch_size": 57, "max_grad_norm": 1.0, "epochs": 1, "total_epochs": 10}
    first = privacy.plan(dp, **kw)  # a client's first round: σ searched
    assert privacy._noise_multiplier.cache_info().misses == 1
    history = [(first.noise_multiplier, first.sample_rate, first.steps)]
    second = privacy.plan(dp, history=history, **kw)  # its second round: σ from the cache
    assert privacy._noise_multiplier.cache_info().hits == 1
    # What the uncached path gives: Opacus' own σ search and Opacus' own accountant.
    stock_sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=first.sample_rate, steps=10 * first.steps, accountant="rdp"
    )
    assert first.noise_multiplier == second.noise_multiplier == stock_sigma
    assert second.planned_epsilon == _stock(
        [(stock_sigma, first.sample_rate, 2 * first.steps)], delta=DELTA, accountant="rdp"
    )
    # σ depends on n and the batch only through q = 1 / ceil(n / batch): 260 rows also take 5 steps an epoch.
    hits = privacy._noise_multiplier.cache_info().hits
    assert privacy.plan(dp, **{**kw, "n_samples": 260}).noise_multiplier == stock_sigma
    assert privacy._noise_multiplier.cache_info().hits == hits + 1
    # Each input σ depends on is part of the key: changing one searches again.
    for change in [
        {"n_samples": 300},  # q = 1/6
        {"batch_size": 30},  # q = 1/8
        {"total_epochs": 12},  # rounds x local epochs
    ]:
        misses = privacy._noise_multiplier.cache_info().misses
        other = privacy.plan(dp, **{**kw, **change})
        assert privacy._noise_multiplier.cache_info().misses == misses + 1, change
        assert other.noise_multiplier != first.noise_multiplier
    for other_dp in [dataclasses.replace(dp, target_epsilon=2.5), dataclasses.replace(dp, delta=1e-6)]:
        misses = privacy._noise_multiplier.cache_info().misses
        assert privacy.plan(other_dp, **kw).noise_multiplier != first.noise_multiplier
        assert privacy._noise_multiplier.cache_info().misses == misses + 1
