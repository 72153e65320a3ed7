"""Ghost clipping (grad_sample_mode="ghost") against Opacus' per-sample engine ("hooks").

The per-sample engine materialises every per-sample gradient; it is the independent reference.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from torch import nn

from auditml_core import models, seeds, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy import ghost_conv

DP = DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=1e3, delta=1e-5, accountant="rdp")


def _cnn(shape, channels=(8, 16)):
    torch.manual_seed(0)
    return models.build_cnn(input_shape=shape, n_classes=10, channels=channels, hidden=16)


def _batch(shape, n=24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _reference_norms(model, x, y):
    gsm = GradSampleModule(copy.deepcopy(model))
    nn.CrossEntropyLoss()(gsm(x), y).backward()
    return [p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in gsm._module.parameters()]


def _ghost_norms(model, x, y):
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=1.0)
    nn.CrossEntropyLoss()(gsm(x), y).backward()
    return [p._norm_sample for p in gsm._module.parameters()]


@pytest.mark.parametrize("path", ["ghost", "materialise", "mixed"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12)])
def test_conv_norm_sampler_matches_per_sample_engine(monkeypatch, path, shape):
    if path != "mixed":  # force one path for every layer; "mixed" is the T² vs d·p rule itself
        monkeypatch.setattr(ghost_conv, "use_ghost", lambda layer, t: path == "ghost")
    model, (x, y) = _cnn(shape), _batch(shape)
    ref, got = _reference_norms(model, x, y), _ghost_norms(model, x, y)
    assert len(ref) == len(got) == 8  # two conv + two linear layers, weight and bias each
    for r, g in zip(ref, got):
        assert g.shape == (len(x),)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_strided_dilated_conv_norms_match():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, stride=2, padding=2, dilation=2), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 3, (6,))
    model(x)  # materialise the lazy layer
    for p in model.parameters():
        p.requires_grad_(True)
    ref, got = _reference_norms(model, x, y), _ghost_norms(model, x, y)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("conv", "pixel"),
    [
        (dict(kernel_size=3, padding=1), True),  # (7·8)² ≤ 9·32·30
        (dict(kernel_size=(3, 2), padding=(2, 0), dilation=(1, 2)), True),  # rectangular, dilated
        (dict(kernel_size=3, stride=2, padding=2, dilation=2), False),  # (9·10)² > 9·32·9: unfolded patches
        (dict(kernel_size=(2, 3), stride=(1, 2), padding="valid"), True),
        (dict(kernel_size=1, padding=1), False),  # (7·8)² > 32·56
        (dict(kernel_size=(1, 3), padding=(0, 1)), True),  # one row offset
        (dict(kernel_size=(3, 1), padding=(1, 0)), True),  # one column offset
    ],
)
def test_conv_ghost_sq_norm_equals_materialised(monkeypatch, conv, pixel):
    # both Gram routes against ‖Σ_t B_i[t] A_i[t]ᵀ‖² from Opacus' per-sample conv gradient, in one
    # block and then one sample a block
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 4, **conv)
    x = torch.randn(5, 32, 5, 6)
    b = torch.randn_like(layer(x))
    t = b.shape[2] * b.shape[3]
    assert ghost_conv.uses_pixel_gram(layer, x.shape, t) == pixel
    ref = compute_conv_grad_sample(layer, [x], b)[layer.weight].reshape(5, -1).square().sum(dim=1)
    for block in (1 << 25, 100):
        monkeypatch.setattr(ghost_conv, "_GHOST_BLOCK_ELEMENTS", block)
        got = ghost_conv.conv_ghost_sq_norm(layer, x, b.reshape(5, 4, -1))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # and each shape through the other route too (the pixel route's windows with stride and padding)
    monkeypatch.setattr(ghost_conv, "uses_pixel_gram", lambda *_: not pixel)
    got = ghost_conv.conv_ghost_sq_norm(layer, x, b.reshape(5, 4, -1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mixed_rule_picks_the_cheaper_path():
    # digits CNN: conv1 on 8x8 (T=64, d·p=9·32) materialises, conv2 on 4x4 (T=16, d·p=288·64) goes ghost
    conv1, conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
    assert not ghost_conv.use_ghost(conv1, 64) and ghost_conv.use_ghost(conv2, 16)


def _private_step(model, engine, x, y, *, steps=1):
    """``steps`` DP-SGD steps on the fixed batch; returns the noised, clipped, scaled gradients and ε."""
    ds = torch.utils.data.TensorDataset(torch.zeros(240, *x.shape[1:]), torch.zeros(240, dtype=torch.long))
    the_plan = privacy.plan(DP, n_samples=len(ds), batch_size=len(x), max_grad_norm=0.5, epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    run = privacy.make_private(
        model,
        opt,
        ds,
        plan=the_plan,
        sampling_generator=seeds.make_generator("cpu", 7),
        noise_generator=seeds.make_generator("cpu", 7),  # the same noise for every engine compared
        grad_sample_mode=engine,
        criterion=nn.CrossEntropyLoss(),
    )
    criterion = run.criterion or nn.CrossEntropyLoss()
    grads = []
    for _ in range(steps):
        run.optimizer.zero_grad(set_to_none=True)
        criterion(run.model(x), y).backward()
        run.optimizer.step()
        grads.append([p.grad.detach().clone() for p in privacy.unwrap(run.model).parameters()])
    eps = run.epsilon()
    run.model._close()
    return grads, eps


def test_full_dp_step_and_accounting_match_per_sample_engine():
    shape = (1, 8, 8)
    model, (x, y) = _cnn(shape), _batch(shape)
    ref, eps_ref = _private_step(copy.deepcopy(model), "hooks", x, y, steps=3)
    got, eps_got = _private_step(copy.deepcopy(model), "ghost", x, y, steps=3)
    for step_ref, step_got in zip(ref, got):
        for r, g in zip(step_ref, step_got):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the noise must not drown the check: clipping differs by far more than the tolerance without it
    assert max(float(g.abs().max()) for g in ref[0]) > 1e-2
    assert eps_got == pytest.approx(eps_ref, rel=1e-12) and eps_ref > 0


@pytest.mark.parametrize("kind", ["cnn", "regressor"])
def test_fit_with_ghost_matches_hooks(rng, kind):
    if kind == "cnn":
        x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 10, size=64)
        task = "classification"
    else:
        x = rng.normal(size=(64, 4)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 0.5, 0.0])).astype(np.float32)
        task = "regression"
    fit_cfg = FitConfig(epochs=2, batch_size=16, lr=0.05, max_grad_norm=1.0)
    out = {}
    for engine in ("hooks", "ghost"):
        if kind == "cnn":
            model = _cnn((1, 8, 8), channels=(4,))
        else:
            torch.manual_seed(0)
            model = models.build_regressor(n_features=4, hidden_sizes=(8,))
        res = training.fit(
            model,
            x_train=x,
            y_train=y,
            x_val=x[:16],
            y_val=y[:16],
            task=task,
            fit_cfg=fit_cfg,
            # reproducible_noise: both engines must see the same sampling and noise to be compared
            dp=dataclasses.replace(DP, grad_sample_mode=engine, reproducible_noise=True),
            device=torch.device("cpu"),
            seed=0,
        )
        out[engine] = res
    for k, w in out["hooks"].state_dict.items():
        torch.testing.assert_close(out["ghost"].state_dict[k], w, rtol=1e-4, atol=1e-5)
    assert out["ghost"].privacy["epsilon"] == pytest.approx(out["hooks"].privacy["epsilon"], rel=1e-12)
    assert not hasattr(model, "_module")


def test_empty_poisson_batches_take_noise_only_steps_under_ghost(rng):
    x = rng.normal(size=(24, 4)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    torch.manual_seed(0)
    model = models.build_regressor(n_features=4, hidden_sizes=(8,))
    res = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=FitConfig(epochs=1, batch_size=1, lr=0.01, max_grad_norm=1.0),
        dp=dataclasses.replace(DP, grad_sample_mode="ghost", noise_multiplier=2.0),
        device=torch.device("cpu"),
        seed=0,
    )
    assert res.privacy["total_steps"] == 24  # every planned step accounted, empty ones included
    assert all(torch.isfinite(p).all() for p in model.parameters())
