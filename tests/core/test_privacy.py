import dataclasses

import numpy as np
import pytest
import torch

from core import models, privacy, training
from core.config import DPConfig, FitConfig
from core.errors import PrivacyBudgetError
from core.training import checkpoint_bytes, read_checkpoint

DP = DPConfig(enabled=True, target_epsilon=3.0, delta=1e-5)
FIT = FitConfig(epochs=4, batch_size=16, lr=0.05, max_grad_norm=1.0)


def _data(rng, n=96):
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0])).astype(np.float32)
    return x, y


def _fit(x, y, *, dp=DP, fit=FIT, **kw):
    torch.manual_seed(0)
    model = models.build_regressor(n_features=4, hidden_sizes=(8,))
    res = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=x[:16],
        y_val=y[:16],
        task="regression",
        fit_cfg=fit,
        dp=dp,
        device=torch.device("cpu"),
        seed=0,
        **kw,
    )
    return model, res


def test_epsilon_within_budget_and_non_decreasing(rng):
    x, y = _data(rng)
    _, res = _fit(x, y)
    eps = [h["epsilon"] for h in res.history if "epsilon" in h]
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert 0.8 * DP.target_epsilon < eps[-1] <= DP.target_epsilon  # σ calibrated to spend (nearly) the whole budget
    rec = res.privacy
    assert rec["total_steps"] == FIT.epochs * privacy.steps_per_epoch(len(x), FIT.batch_size)
    assert rec["accountant"] == "prv" and rec["opacus_version"] and rec["noise_multiplier"] > 0
    assert abs(rec["epsilon"] - eps[-1]) < 1e-9


def test_weights_carry_no_opacus_prefix_and_model_is_plain(rng):
    x, y = _data(rng)
    model, res = _fit(x, y)
    assert not any(k.startswith("_module.") for k in res.state_dict)
    fresh = models.build_regressor(n_features=4, hidden_sizes=(8,))
    fresh.load_state_dict(res.state_dict)  # loads into a plain model
    assert not hasattr(model, "_module")


def test_explicit_noise_that_overspends_is_refused():
    with pytest.raises(PrivacyBudgetError, match="budget dp.target_epsilon=3.0"):
        privacy.plan(
            dataclasses.replace(DP, noise_multiplier=0.3), n_samples=100, batch_size=10, max_grad_norm=1, epochs=10
        )
    ok = privacy.plan(
        dataclasses.replace(DP, noise_multiplier=5.0), n_samples=100, batch_size=10, max_grad_norm=1, epochs=1
    )
    assert ok.planned_epsilon < 3.0


def test_history_counts_against_the_budget():
    first = privacy.plan(DP, n_samples=100, batch_size=10, max_grad_norm=1, epochs=2, total_epochs=4)
    history = [(first.noise_multiplier, first.sample_rate, first.steps)]
    second = privacy.plan(DP, n_samples=100, batch_size=10, max_grad_norm=1, epochs=2, total_epochs=4, history=history)
    assert second.noise_multiplier == first.noise_multiplier  # σ is for the whole run
    assert first.planned_epsilon < second.planned_epsilon <= DP.target_epsilon
    spent = history + [(second.noise_multiplier, second.sample_rate, second.steps)]
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        privacy.plan(DP, n_samples=100, batch_size=10, max_grad_norm=1, epochs=2, total_epochs=4, history=spent)


def test_accountants_agree_roughly():
    hist = [(1.0, 0.1, 100)]
    eps = {a: privacy.epsilon_of(hist, delta=1e-5, accountant=a) for a in ("prv", "rdp")}
    assert eps["prv"] <= eps["rdp"] * 1.05  # PRV is tighter than RDP
    assert privacy.epsilon_of([], delta=1e-5, accountant="prv") == 0.0


def test_resume_from_checkpoint_matches_uninterrupted_run(rng):
    x, y = _data(rng)
    _, full = _fit(x, y)
    # Interrupt after 2 of 4 epochs: keep the checkpoint written after epoch 2.
    seen = []
    _fit(x, y, on_epoch_end=lambda ck: seen.append(checkpoint_bytes(ck)))
    ck = read_checkpoint(seen[1])
    assert ck.epoch == 2 and sum(n for _, _, n in ck.accountant_history) == 2 * privacy.steps_per_epoch(len(x), 16)
    _, resumed = _fit(x, y, resume=ck)
    assert resumed.privacy["epsilon"] == pytest.approx(full.privacy["epsilon"], rel=1e-9)
    assert [h.get("epsilon") for h in resumed.history] == pytest.approx([h.get("epsilon") for h in full.history])
    for k in full.state_dict:
        assert torch.allclose(full.state_dict[k], resumed.state_dict[k], atol=1e-6)


def test_empty_poisson_batches_still_take_noisy_steps(rng):
    x, y = _data(rng, n=24)
    fit = FitConfig(epochs=1, batch_size=1, lr=0.01, max_grad_norm=1.0)
    dp = dataclasses.replace(DP, noise_multiplier=2.0, target_epsilon=50.0)
    model, res = _fit(x, y, dp=dp, fit=fit)
    assert res.privacy["total_steps"] == 24  # every planned step accounted, empty ones included
    assert all(torch.isfinite(p).all() for p in model.parameters())
