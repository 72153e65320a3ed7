import dataclasses
import json
import types

import numpy as np
import pytest
import torch

from auditml_core import models, seeds, training
from auditml_core.config import DPConfig, FitConfig, load_config
from auditml_core.errors import ConfigError, PrivacyBudgetError
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.training import checkpoint_bytes, read_checkpoint

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


SEEDED = dataclasses.replace(DP, reproducible_noise=True)


def _same_weights(a, b):
    return all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_reproduction_attack_fails_by_default_and_succeeds_only_when_opted_in(rng):
    """The issue-10 attack: retrain with everything the run directory publishes (data, config, seed, init)."""
    x, y = _data(rng)
    released, replayed = _fit(x, y)[1], _fit(x, y)[1]
    assert not _same_weights(released, replayed)  # secret CSPRNG-seeded sampling and noise: no replay
    assert released.privacy["noise_source"] == "os-csprng"
    seeded_a, seeded_b = _fit(x, y, dp=SEEDED)[1], _fit(x, y, dp=SEEDED)[1]
    assert _same_weights(seeded_a, seeded_b)  # the opt-out reproduces bit for bit
    assert seeded_a.privacy["noise_source"] == "seeded"
    # Both spend the same, fully accounted budget: the noise source changes who can replay, not ε.
    assert released.privacy["epsilon"] == pytest.approx(seeded_a.privacy["epsilon"], rel=1e-12)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("dp", [DP, SEEDED], ids=["default", "reproducible"])
def test_no_artifact_holds_the_secret_noise_state(rng, monkeypatch, dp):
    """Checkpoints and records of a default DP run hold neither the secret seeds nor the DP generators' states.

    The reproducible run is the positive control: there the detector must find the generator states.
    """
    secrets_drawn, generators = [], []
    real_secret, real_generators = seeds.os_entropy, privacy.dp_generators

    def spy_secret(n_bytes):
        secrets_drawn.append(real_secret(n_bytes))
        return secrets_drawn[-1]

    def spy_generators(*args, **kwargs):
        pair = real_generators(*args, **kwargs)
        generators.append((pair, [g.get_state().clone() for g in pair]))
        return pair

    monkeypatch.setattr(seeds, "os_entropy", spy_secret)
    monkeypatch.setattr(privacy, "dp_generators", spy_generators)
    x, y = _data(rng)
    blobs = []
    _, res = _fit(x, y, dp=dp, on_epoch_end=lambda ck: blobs.append(checkpoint_bytes(ck)))
    ((pair, initial),) = generators
    dp_states = [*initial, *(g.get_state() for g in pair)]  # at creation and after the last step
    record_text = json.dumps(res.summary())
    found = 0
    for blob in blobs:
        ck = read_checkpoint(blob)
        found += any(torch.equal(t, s) for t in _tensors(dataclasses.asdict(ck)) for s in dp_states)
        for secret in secrets_drawn:  # no 8-byte run of the drawn entropy, raw, reversed or as MT19937 words
            for i in range(0, len(secret) - 7, 8):
                assert secret[i : i + 8] not in blob and secret[i : i + 8][::-1] not in blob
                words = secret[i : i + 4] + bytes(4) + secret[i + 4 : i + 8] + bytes(4)  # torch's uint64 words
                assert words not in blob
    for secret in secrets_drawn:
        for i in range(0, len(secret) - 7, 8):
            chunk = secret[i : i + 8]
            assert chunk.hex() not in record_text and str(int.from_bytes(chunk, "little")) not in record_text
    if dp.reproducible_noise:
        # seeded: the states are in the checkpoints, as documented; the last one holds the final states
        assert not secrets_drawn and found >= 1 and read_checkpoint(blobs[-1]).dp_generator_states is not None
    else:
        # sampling + noise: each a whole MT19937 state drawn from the OS, neither stored
        assert [len(b) for b in secrets_drawn] == [2492, 2492] and found == 0
        # positive control of the byte search: it finds the drawn entropy in the generator's own state
        s0 = secrets_drawn[0]
        assert s0[0:4] + bytes(4) + s0[4:8] + bytes(4) in initial[0].numpy().tobytes()
        assert all(read_checkpoint(b).dp_generator_states is None for b in blobs)


@pytest.mark.parametrize("dp", [DP, SEEDED], ids=["default", "reproducible"])
def test_resume_from_checkpoint_continues_the_accounting(rng, dp):
    x, y = _data(rng)
    _, full = _fit(x, y, dp=dp)
    # Interrupt after 2 of 4 epochs: keep the checkpoint written after epoch 2.
    seen = []
    _fit(x, y, dp=dp, on_epoch_end=lambda ck: seen.append(checkpoint_bytes(ck)))
    ck = read_checkpoint(seen[1])
    assert ck.epoch == 2 and sum(n for _, _, n in ck.accountant_history) == 2 * privacy.steps_per_epoch(len(x), 16)
    _, resumed = _fit(x, y, dp=dp, resume=ck)
    assert resumed.privacy["epsilon"] == pytest.approx(full.privacy["epsilon"], rel=1e-9)
    assert [h.get("epsilon") for h in resumed.history] == pytest.approx([h.get("epsilon") for h in full.history])
    assert all(torch.isfinite(v).all() for v in resumed.state_dict.values())
    if dp.reproducible_noise:  # the seeded generators' states travel with the checkpoint: same weights
        for k in full.state_dict:
            assert torch.allclose(full.state_dict[k], resumed.state_dict[k], atol=1e-6)
    else:  # a resumed default run draws fresh secret randomness for its remaining steps
        assert not _same_weights(full, resumed)


def _noise_run(model, *, sigma, clip, y, generators, **kw):
    """DP-SGD on 64 zero records of ``model``'s input width, batch 16, σ = ``sigma``, C = ``clip``."""
    the_plan = privacy.plan(
        dataclasses.replace(DP, noise_multiplier=sigma, target_epsilon=1e3),
        n_samples=64,
        batch_size=16,
        max_grad_norm=clip,
        epochs=1,
    )
    n_in = next(model.parameters()).shape[1]
    return privacy.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        torch.utils.data.TensorDataset(torch.zeros(64, n_in), y),
        plan=the_plan,
        sampling_generator=generators[0],
        noise_generator=generators[1],
        criterion=torch.nn.CrossEntropyLoss() if kw.get("grad_sample_mode") == "ghost" else None,
        **kw,
    )


def test_noise_is_floating_point_safe_and_calibrated():
    """Opacus' 4-Gaussian noise recipe is on, and one noise-only step moves weights by N(0, (σC/B)²)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 100)  # 20 100 parameters: the std estimate is within ~1%
    before = [p.detach().clone() for p in model.parameters()]
    sampling, noise = privacy.dp_generators(DP, seed=0, noise_device="cpu")
    run = _noise_run(model, sigma=2.0, clip=0.5, y=torch.zeros(64, 100), generators=(sampling, noise))
    assert run.optimizer.secure_mode is True and run.optimizer.generator is noise
    privacy.noise_only_step(run.model, run.optimizer)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    expected = 2.0 * 0.5 / run.optimizer.expected_batch_size  # σ·C / expected batch (mean loss reduction)
    assert float(step.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(step.mean())) < 4 * expected / len(step) ** 0.5
    run.close()


@pytest.mark.parametrize("engine", ["bk", "hooks", "ghost"])
def test_noise_drawn_at_once_has_opacus_distribution(engine):
    """``privacy._add_noise_at_once`` (one Opacus ``_generate_noise`` call for every tensor) against
    Opacus' own per-tensor draws: same N(0, σ²C²) by scipy's normal, its floating-point-safe call, and
    no draws shared between tensors."""
    from opacus.optimizers.optimizer import _generate_noise
    from scipy import stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(150, 100), torch.nn.Linear(100, 60))  # 4 tensors, 21 160 coords
    generators = (seeds.make_generator("cpu", 0), seeds.make_generator("cpu", 1))
    y = torch.zeros(64, dtype=torch.long)
    run = _noise_run(model, sigma=1.5, clip=0.4, y=y, generators=generators, grad_sample_mode=engine)
    opt, std = run.optimizer, 1.5 * 0.4
    params = opt.params
    for p in params:
        p.summed_grad = torch.zeros_like(p)
    state = opt.generator.get_state()
    opt.add_noise()
    ours = torch.cat([p.grad.flatten() for p in params])
    # the same call, replayed: one floating-point-safe draw over all the coordinates, split in order
    replay = torch.Generator().set_state(state)
    flat = _generate_noise(std=std, reference=torch.empty(len(ours)), generator=replay, secure_mode=True)
    assert torch.equal(ours, flat)
    # against scipy's N(0, σC) and against Opacus' own per-tensor noise (2 x 21 160 draws)
    opacus = torch.cat([_generate_noise(std, torch.empty(p.shape), replay, True).flatten() for p in params])
    a, b = ours.double().numpy(), opacus.double().numpy()
    assert stats.kstest(a / std, "norm").pvalue > 1e-3 and stats.ks_2samp(a, b).pvalue > 1e-3
    assert np.std(a) == pytest.approx(std, rel=0.03) and abs(stats.kurtosis(a)) < 0.15
    # each tensor's noise is its own: the leading coordinates of two tensors are uncorrelated
    first, second = params[0].grad.flatten()[:5000].numpy(), params[2].grad.flatten()[:5000].numpy()
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.06
    with pytest.raises(ValueError):  # Opacus' guard against noising the same sum twice still holds
        opt.add_noise()
    run.close()


def test_noise_at_once_with_mixed_dtypes_draws_per_tensor():
    """Parameters of two dtypes: Opacus' own per-tensor draws, each sum noised once in its dtype."""
    from opacus.optimizers import DPOptimizer

    params = [torch.nn.Parameter(torch.zeros(3000, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(4000))]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=8,
        secure_mode=True,
    )
    opt.add_noise = types.MethodType(privacy._add_noise_at_once, opt)
    for p in params:
        p.summed_grad = torch.zeros_like(p)
    opt.add_noise()
    for p in params:
        assert p.grad.dtype == p.dtype and float(p.grad.std()) == pytest.approx(1.0, rel=0.06)
    with pytest.raises(ValueError):
        opt.add_noise()


def test_noise_generator_lives_on_the_parameters_device():
    for dp in (DP, SEEDED):
        sampling, noise = privacy.dp_generators(dp, seed=3, noise_device=torch.device("cpu"))
        assert sampling.device.type == "cpu" and noise.device.type == "cpu"
    if torch.cuda.is_available():
        _, noise = privacy.dp_generators(DP, seed=3, noise_device="cuda")
        assert noise.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dp_training_runs_on_cuda(rng):
    x, y = _data(rng)
    torch.manual_seed(0)
    model = models.build_regressor(n_features=4, hidden_sizes=(8,))
    res = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=FIT,
        dp=DP,
        device=torch.device("cuda"),
        seed=0,
    )
    assert res.privacy["epsilon"] <= DP.target_epsilon and all(torch.isfinite(v).all() for v in res.state_dict.values())


def test_a_noise_generator_on_another_device_is_refused():
    """The CUDA crash of issue 11, caught before any step: a stand-in generator claims to be on CUDA."""
    model = torch.nn.Linear(3, 1)  # CPU parameters
    plan_ = privacy.plan(
        dataclasses.replace(DP, noise_multiplier=5.0), n_samples=10, batch_size=5, max_grad_norm=1.0, epochs=1
    )
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))  # no CUDA needed to name the device
    with pytest.raises(ValueError, match="make_generator"):
        privacy.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.utils.data.TensorDataset(torch.zeros(10, 3), torch.zeros(10)),
            plan=plan_,
            sampling_generator=seeds.make_generator("cpu", 0),
            noise_generator=on_cuda,
        )


def test_secure_mode_is_gone_and_the_opt_out_is_a_config_key():
    with pytest.raises(ConfigError, match="secure_mode"):
        load_config(None, ["dp.secure_mode=true"])
    assert load_config(None, []).dp.reproducible_noise is False
    assert load_config(None, ["dp.reproducible_noise=true"]).dp.reproducible_noise is True


def test_empty_poisson_batches_still_take_noisy_steps(rng):
    x, y = _data(rng, n=24)
    fit = FitConfig(epochs=1, batch_size=1, lr=0.01, max_grad_norm=1.0)
    dp = dataclasses.replace(DP, noise_multiplier=2.0, target_epsilon=50.0)
    model, res = _fit(x, y, dp=dp, fit=fit)
    assert res.privacy["total_steps"] == 24  # every planned step accounted, empty ones included
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_concurrent_privacy_engines_leave_the_warning_filters_as_they_were(monkeypatch):
    """The audit builds its DP shadows' PrivacyEngines in threads; catch_warnings saves and restores the process's
    filter list, so two threads inside it at once restore each other's filter for good unless they take turns.
    The engine is slowed down so that the threads overlap inside it every time; the control drops the lock."""
    import contextlib
    import itertools
    import threading
    import time
    import warnings

    import opacus

    from auditml_core.privacy import dp_sgd

    real = opacus.PrivacyEngine
    entered = itertools.count()

    def slow_engine(*args, **kwargs):
        # Every other thread reaches catch_warnings meanwhile, and the k-th to get here leaves after the ones before
        # it: without turns the first (which saved the list without the filter) never restores last, so the control
        # leaks every time (with one sleep for all, the exits' order was left to the scheduler: under load the
        # control once did not leak)
        time.sleep(0.1 + 0.03 * next(entered))
        return real(*args, **kwargs)

    monkeypatch.setattr(opacus, "PrivacyEngine", slow_engine)
    plan = dp_sgd.PrivacyPlan(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.1,
        steps=10,
        delta=1e-5,
        target_epsilon=10.0,
        planned_epsilon=0.0,
        accountant="rdp",
        noise_source="os-csprng",
        grad_sample_mode="hooks",
    )

    def leaked() -> bool:
        before = list(warnings.filters)
        threads = [threading.Thread(target=dp_sgd._privacy_engine, args=(plan, ())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        changed = list(warnings.filters) != before
        warnings.filters[:] = before
        return changed

    assert not leaked()
    monkeypatch.setattr(dp_sgd, "_WARNING_FILTERS", contextlib.nullcontext())  # the control: no turns
    assert leaked()
