"""Book-keeping clipping (grad_sample_mode="bk") against Opacus' per-sample engine ("hooks").

The per-sample engine materialises every per-sample gradient and clips them in Opacus'
DPOptimizer; it is the independent reference for the clipped sum, the noised step and ε.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from auditml_core import models, seeds, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.privacy import bk, ghost_conv
from auditml_core.privacy import dp_sgd as privacy

DP = DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=1e3, delta=1e-5, accountant="rdp")
CLIP = 0.5


def _cnn(shape=(1, 8, 8), channels=(8, 16)):
    torch.manual_seed(0)
    return models.build_cnn(input_shape=shape, n_classes=10, channels=channels, hidden=16)


def _regressor():
    torch.manual_seed(0)
    return models.build_regressor(n_features=5, hidden_sizes=(8, 4))


def _data(kind, n=24):
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        return (
            _cnn(),
            torch.randn(n, 1, 8, 8, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            nn.CrossEntropyLoss(),
        )
    x = torch.randn(n, 5, generator=g)
    return _regressor(), x, (x @ torch.arange(5.0)).unsqueeze(1), nn.MSELoss()


def _reference_clipped_sum(model, x, y, loss, clip=CLIP):
    """Σ_i c_i g_i from Opacus' own per-sample engine and DPOptimizer.clip_and_accumulate."""
    gsm = GradSampleModule(copy.deepcopy(model))
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(x)
    )
    loss(gsm(x), y).backward()
    opt.clip_and_accumulate()
    return [p.summed_grad for p in gsm._module.parameters()]


def _per_sample_norms(model, x, y, loss):
    """‖g_i‖ (B,) from Opacus' per-sample engine."""
    gsm = GradSampleModule(copy.deepcopy(model))
    loss(gsm(x), y).backward()
    return torch.cat([p.grad_sample.reshape(len(x), -1) for p in gsm.parameters()], dim=1).norm(dim=1)


def _bk_clipped_sum(model, x, y, loss, clip=CLIP):
    wrapped = bk.BKModule(copy.deepcopy(model))
    loss(wrapped(x), y).backward()
    # autograd computed no unclipped weight gradient (the first layer's output is a leaf of the graph)
    assert all(p.grad is None for p in wrapped.parameters())
    sums = wrapped.clipped_sums(clip)
    return [sums[p] for p in wrapped._module.parameters()]


def test_padded_batch_matches_with_clipped_and_unclipped_samples():
    # A CNN's batch of 21 is padded to a multiple of bk._BATCH_BUCKET (bk._pad_batch). With C at the median
    # per-sample norm, half the samples are not clipped: their terms scale with the number of rows the
    # mean loss averages (a clipped sample's do not), so counting the padding rows would show here.
    model, x, y, loss = _data("cnn", n=21)
    wrapped = bk.BKModule(copy.deepcopy(model))
    out = wrapped(x)
    assert wrapped._rows == len(x) == out.shape[0]  # padded, and the caller sees its own rows only
    assert len(x) % bk._BATCH_BUCKET != 0
    norms = _per_sample_norms(model, x, y, loss)
    clip = float(norms.median())
    assert int((norms < clip).sum()) >= 5 and int((norms > clip).sum()) >= 5
    ref, got = _reference_clipped_sum(model, x, y, loss, clip), _bk_clipped_sum(model, x, y, loss, clip)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert not bk.BKModule(_regressor())._pad  # Linear-only models are not padded


@pytest.mark.parametrize("kind", ["cnn", "regressor"])
@pytest.mark.parametrize("conv_path", ["ghost", "materialise", "grouped", "unfolded", "mixed"])
def test_clipped_sum_matches_per_sample_engine(monkeypatch, kind, conv_path):
    if conv_path != "mixed":  # force one Conv2d path (the weight sum then comes from conv2d_weight or from G)
        monkeypatch.setattr(ghost_conv, "use_ghost", lambda layer, t: conv_path == "ghost")
    _force_materialise_route(monkeypatch, conv_path)
    model, x, y, loss = _data(kind)
    ref, got = _reference_clipped_sum(model, x, y, loss), _bk_clipped_sum(model, x, y, loss)
    assert len(ref) == len(got) == (8 if kind == "cnn" else 6)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the check must bite: some samples are clipped, so the clipped sum differs from the plain one
    plain = copy.deepcopy(model)
    loss(plain(x), y).backward()
    unclipped = [p.grad * len(x) for p in plain.parameters()]
    assert max(float((u - r).abs().max()) for u, r in zip(unclipped, ref)) > 1e-2


def _assert_matches_hooks(model, x, y, loss=None):
    loss = loss or nn.CrossEntropyLoss()
    ref, got = _reference_clipped_sum(model, x, y, loss), _bk_clipped_sum(model, x, y, loss)
    assert len(ref) == len(got) == len(list(model.parameters()))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _force_materialise_route(monkeypatch, conv_path):
    """Materialised per-sample conv gradients from the grouped conv-weight gradient or the unfolded input."""
    if conv_path in ("grouped", "unfolded"):
        monkeypatch.setattr(bk, "_UNFOLD_MAX_PATCH", 0 if conv_path == "grouped" else 10**9)


@pytest.mark.parametrize("conv_path", ["ghost", "grouped", "unfolded"])
def test_strided_dilated_conv_matches(monkeypatch, conv_path):
    # ghost: the clipped weight sum re-weights B (smaller than A here); otherwise from the G_i
    monkeypatch.setattr(ghost_conv, "use_ghost", lambda layer, t: conv_path == "ghost")
    _force_materialise_route(monkeypatch, conv_path)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 5, 3, stride=2, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(125, 3)
    )
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 3, (6,))
    _assert_matches_hooks(model, x, y)


@pytest.mark.parametrize("conv_path", ["grouped", "unfolded", "mixed"])
def test_per_sample_conv_blocks_grouped_and_biasless_layers_match(monkeypatch, conv_path):
    # materialised per-sample gradients in several blocks (the last one short), a grouped conv
    # (Opacus' per-sample route), a conv and a linear without bias, a "valid"-padded conv
    monkeypatch.setattr(bk, "_PER_SAMPLE_CHANNELS", 8)  # 4 input channels: 2 samples a block
    _force_materialise_route(monkeypatch, conv_path)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 4, 3, groups=2, padding="valid"),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3, bias=False),
    )
    x, y = torch.randn(7, 1, 6, 6), torch.randint(0, 3, (7,))
    _assert_matches_hooks(model, x, y)


def test_consecutive_steps_of_varying_batch_size_match(monkeypatch):
    # the per-sample gradient buffer is reused across steps and regrown for a larger (Poisson) batch
    monkeypatch.setattr(ghost_conv, "use_ghost", lambda layer, t: False)  # every conv materialises
    model, x, y, loss = _data("cnn", n=30)
    wrapped = bk.BKModule(copy.deepcopy(model))
    for lo, hi in ((0, 9), (9, 21), (21, 24), (0, 30)):
        ref = _reference_clipped_sum(model, x[lo:hi], y[lo:hi], loss)
        loss(wrapped(x[lo:hi]), y[lo:hi]).backward()
        sums = wrapped.clipped_sums(CLIP)
        for r, p in zip(ref, wrapped._module.parameters()):
            torch.testing.assert_close(sums[p], r, rtol=1e-4, atol=1e-6)
    rows = -(-30 // bk._BATCH_BUCKET) * bk._BATCH_BUCKET  # the largest batch, padded (bk._pad_batch)
    # conv2's (d = 8·9) grouped route writes into the buffer; conv1 (d = 9) is unfolded, with no buffer
    assert {tuple(t.shape) for t in wrapped._scratch.buffers.values()} == {(rows * 16 * 72 * 5 // 4,)}


def test_linear_on_sequences_matches():
    # nn.Linear on (B, T, d): norms from Opacus' Gram identity, bias sums over T
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Flatten(), nn.Linear(15, 3))
    x, y = torch.randn(8, 3, 4), torch.randint(0, 3, (8,))
    _assert_matches_hooks(model, x, y)


def test_in_place_op_on_first_output_falls_back_to_weight_route():
    # the first layer's output is normally a fresh leaf; autograd refuses an in-place op on a leaf,
    # so BK switches (once) to giving that layer's weights a gradient, and the result is unchanged
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    same_math = copy.deepcopy(model)
    same_math[1] = nn.ReLU()  # Opacus' hooks refuse an in-place op after a hooked layer
    ref = _reference_clipped_sum(same_math, x, y, nn.CrossEntropyLoss())
    wrapped = bk.BKModule(copy.deepcopy(model))
    assert wrapped._leaf_first
    for _ in range(2):  # the second step runs the fallback route from the start
        nn.CrossEntropyLoss()(wrapped(x), y).backward()
        assert not wrapped._leaf_first
        sums = wrapped.clipped_sums(CLIP)
        for r, p in zip(ref, wrapped._module.parameters()):
            torch.testing.assert_close(sums[p], r, rtol=1e-4, atol=1e-6)
        wrapped._module.zero_grad(set_to_none=True)


def _private_steps(model, engine, x, y, *, steps, loss, empty_at=None):
    """``steps`` DP-SGD steps on the fixed batch (lr 0.05, SGD); returns per-step parameters and ε."""
    ds = torch.utils.data.TensorDataset(torch.zeros(240, *x.shape[1:]), torch.zeros(240, *y.shape[1:]))
    the_plan = privacy.plan(DP, n_samples=len(ds), batch_size=len(x), max_grad_norm=CLIP, epochs=1)
    run = privacy.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        ds,
        plan=the_plan,
        sampling_generator=seeds.make_generator("cpu", 7),
        noise_generator=seeds.make_generator("cpu", 7),  # the same noise for both engines
        grad_sample_mode=engine,
    )
    params = []
    for step in range(steps):
        if step == empty_at:
            privacy.noise_only_step(run.model, run.optimizer)
        else:
            run.optimizer.zero_grad(set_to_none=True)
            loss(run.model(x), y).backward()
            run.optimizer.step()
        params.append([p.detach().clone() for p in privacy.unwrap(run.model).parameters()])
    eps, history = run.epsilon(), run.history()
    run.close()
    return params, eps, history


@pytest.mark.parametrize("kind", ["cnn", "regressor"])
def test_full_dp_steps_and_accounting_match_hooks(kind):
    model, x, y, loss = _data(kind)
    ref, eps_ref, hist_ref = _private_steps(copy.deepcopy(model), "hooks", x, y, steps=3, loss=loss, empty_at=1)
    got, eps_got, hist_got = _private_steps(copy.deepcopy(model), "bk", x, y, steps=3, loss=loss, empty_at=1)
    for step_ref, step_got in zip(ref, got):
        for r, g in zip(step_ref, step_got):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert hist_got == hist_ref and sum(n for *_, n in hist_ref) == 3  # the empty batch's step is counted
    assert eps_got == eps_ref and eps_ref > 0
    # the empty step moved the weights (noise only), and by noise of the expected size σC/expected batch
    moved = torch.cat([(b - a).flatten() for a, b in zip(got[0], got[1])])
    expected_std = 0.05 * DP.noise_multiplier * CLIP / len(x)
    assert 0.5 * expected_std < float(moved.std()) < 2 * expected_std


def test_refuses_unsupported_trainable_layer():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"unsupported trainable layers: 1 \(GroupNorm\)"):
        bk.BKModule(model)
    # a frozen (or parameter-free) GroupNorm passes through
    for p in model[1].parameters():
        p.requires_grad_(False)
    assert len(bk.BKModule(model)._layers) == 2


def test_fit_with_bk_matches_hooks(rng):
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    fit_cfg = FitConfig(epochs=2, batch_size=16, lr=0.05, max_grad_norm=1.0)
    out = {}
    for engine in ("hooks", "bk"):
        model = _cnn(channels=(4,))
        out[engine] = training.fit(
            model,
            x_train=x,
            y_train=y,
            x_val=x[:16],
            y_val=y[:16],
            task="classification",
            fit_cfg=fit_cfg,
            dp=dataclasses.replace(DP, grad_sample_mode=engine, reproducible_noise=True),
            device=torch.device("cpu"),
            seed=0,
        )
    for k, w in out["hooks"].state_dict.items():
        torch.testing.assert_close(out["bk"].state_dict[k], w, rtol=1e-4, atol=1e-5)
    assert out["bk"].privacy["epsilon"] == out["hooks"].privacy["epsilon"]
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "_module")
