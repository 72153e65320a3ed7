"""The device-friendly training loop (epoch indices drawn up front, loss summed on the device, no
per-step host reads) trains bit for bit the weights of the per-batch loop it replaced.

The reference below is that earlier loop, written out: a CPU permutation sliced per batch, two
``randint`` draws per augmented batch, Opacus' Poisson sampler iterated step by step, and a Python
float sum of the batch losses. On the CPU every weight and every history number must be equal,
not close.
"""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from auditml_core import models, seeds, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.privacy import dp_sgd as privacy

SEED = 7


def _data(rng, n=70):
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    return x, y


def _cnn():
    torch.manual_seed(1)
    return models.build_cnn(input_shape=(1, 8, 8), n_classes=3, channels=(3,), hidden=6)


def _reference_shift(xb, max_shift, generator):
    """The per-batch augmentation as it was: draw dy then dx for this batch, then shift."""
    if max_shift <= 0 or len(xb) == 0:
        return xb
    b, c, h, w = xb.shape
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    floor = xb.amin(dim=(1, 2, 3), keepdim=True)
    padded = nn.functional.pad(xb - floor, (max_shift,) * 4) + floor
    out = torch.empty_like(xb)
    for i in range(b):  # an explicit crop per image, not the vectorised gather of auditml_core.epoch
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def _private(model, optimizer, xt, yt, dp, fit_cfg, criterion):
    """DP-SGD wrapping exactly as ``training.fit`` does it (the loop, not the wrapping, is under test here)."""
    return training._make_private(
        model,
        optimizer,
        xt,
        yt,
        dp=dp,
        fit_cfg=fit_cfg,
        epochs=fit_cfg.epochs,
        total_epochs=fit_cfg.epochs,
        history=[],
        seed=SEED,
        resume=None,
        criterion=criterion,
    )


def _reference_fit(model, x, y, fit_cfg, dp=None, stats=None, layout=True):
    """The per-batch loop of auditml_core.training before this change (no validation, no EMA), in the layout
    ``fit`` trains in: channels-last weights without DP (``training.channels_last``), the default under DP
    (``layout=False``: the default layout always, the control that shows the comparison sees the layout)."""
    with training.channels_last(model, layout and dp is None):
        out = _reference_steps(model, x, y, fit_cfg, dp, stats)
    return privacy.unwrap_state_dict(model), out


def _reference_steps(model, x, y, fit_cfg, dp, stats):
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    data_generator = seeds.make_generator("cpu", SEED)
    optimizer = training.make_optimizer(model, fit_cfg)
    run_model, run_opt, run = model, optimizer, None
    criterion = nn.CrossEntropyLoss()
    if dp is not None:
        run = _private(model, optimizer, xt, yt, dp, fit_cfg, criterion)
        run_model, run_opt = run.model, run.optimizer
    losses = []
    for _ in range(fit_cfg.epochs):
        run_model.train()
        if run is not None:
            index = (torch.as_tensor(i, dtype=torch.long) for i in run.loader.batch_sampler)  # drawn step by step
        else:
            order = torch.randperm(len(xt), generator=data_generator)
            index = (order[s : s + fit_cfg.batch_size] for s in range(0, len(xt), fit_cfg.batch_size))
        total, count = 0.0, 0
        for idx in index:
            xb, yb = xt[idx], yt[idx]
            if len(xb) == 0:
                privacy.noise_only_step(run_model, run_opt)
                if stats is not None:
                    stats["empty"] = stats.get("empty", 0) + 1
                continue
            xb = _reference_shift(xb, fit_cfg.augment_shift, data_generator)
            run_opt.zero_grad(set_to_none=True)
            loss = criterion(run_model(xb), yb)
            loss.backward()
            run_opt.step()
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        losses.append(total / max(count, 1))
    if run is not None:
        run.close()
    return losses


def _fit(model, x, y, fit_cfg, dp=None):
    res = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="classification",
        fit_cfg=fit_cfg,
        dp=dp,
        device=torch.device("cpu"),
        seed=SEED,
    )
    return res.state_dict, [h["train_loss"] for h in res.history]


def _assert_identical(a, b):
    (wa, la), (wb, lb) = a, b
    assert la == lb  # float equality: the same sums in the same order
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("shift", [0, 2])
def test_fit_is_bit_identical_to_the_per_batch_loop(rng, shift):
    x, y = _data(rng)
    fit_cfg = FitConfig(epochs=2, batch_size=16, lr=1e-2, augment_shift=shift)  # 70 rows: a short last batch
    _assert_identical(_fit(_cnn(), x, y, fit_cfg), _reference_fit(_cnn(), x, y, fit_cfg))
    with pytest.raises(AssertionError):  # the same steps in the default layout round differently: caught
        _assert_identical(_fit(_cnn(), x, y, fit_cfg), _reference_fit(_cnn(), x, y, fit_cfg, layout=False))


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_dp_fit_is_bit_identical_to_the_per_step_poisson_loop(rng, mode):
    x, y = _data(rng, n=20)
    # batch 2 on 20 rows: q = 0.1, so some of the 20 Poisson batches are empty (noise-only steps)
    fit_cfg = FitConfig(epochs=2, batch_size=2, lr=1e-2, augment_shift=1)
    dp = DPConfig(
        enabled=True,
        target_epsilon=100.0,
        noise_multiplier=1.0,
        reproducible_noise=True,
        grad_sample_mode=mode,
        accountant="rdp",
    )
    stats = {}
    _assert_identical(_fit(_cnn(), x, y, fit_cfg, dp), _reference_fit(_cnn(), x, y, fit_cfg, dp, stats))
    assert stats.get("empty", 0) > 0  # the noise-only step of an empty batch was exercised


def test_index_batches_draw_the_same_poisson_batches_as_stepping_the_sampler():
    dp = DPConfig(enabled=True, target_epsilon=100.0, noise_multiplier=1.0, reproducible_noise=True, accountant="rdp")
    the_plan = privacy.plan(dp, n_samples=50, batch_size=5, max_grad_norm=1.0, epochs=1)
    ds = torch.utils.data.TensorDataset(torch.zeros(50, 2), torch.zeros(50, dtype=torch.long))

    def wrapped():
        sampling, noise = privacy.dp_generators(dp, seed=SEED, noise_device="cpu")
        model = nn.Linear(2, 2)
        return privacy.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            ds,
            plan=the_plan,
            sampling_generator=sampling,
            noise_generator=noise,
        )

    stepped = [list(map(int, i)) for i in wrapped().loader.batch_sampler]
    upfront = [i.tolist() for i in wrapped().index_batches(device="cpu")]
    assert upfront == stepped
    assert len(stepped) == 10 and sum(map(len, stepped)) > 0


def test_the_step_path_reads_nothing_back_from_the_device(rng, monkeypatch):
    """Host reads of a tensor (``float``, ``bool``, ``.item()``, ``.tolist()``) do not grow with the batches.

    On a GPU each such read waits for every queued kernel; one per epoch (the loss) is the budget.
    Reads made inside ``torch.optim`` are not counted: Adam reads its step counter, which torch keeps
    on the CPU (non-capturable Adam), so that read never waits for the device.
    """
    x, y = _data(rng, n=64)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    reads = []
    for name in ("__float__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _original=original, **kw):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/torch/optim/" not in caller:
                reads.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_in_one_epoch(batch_size, dp=None):
        model = _cnn()
        opt = training.make_optimizer(model, FitConfig(lr=1e-2))
        run_model, run_opt = model, opt
        if dp is not None:
            fit_cfg = FitConfig(lr=1e-2, batch_size=batch_size, max_grad_norm=1.0, epochs=1)
            run = _private(model, opt, xt, yt, dp, fit_cfg, nn.CrossEntropyLoss())
            run_model, run_opt = run.model, run.optimizer
            batches = list(run.batches(xt, yt))
        else:
            gen = seeds.make_generator("cpu", SEED)
            batches = [(xt[i], yt[i]) for i in training.shuffled_batches(64, batch_size, gen)]
        reads.clear()
        training.train_one_epoch(run_model, run_opt, batches, task="classification")
        return len(reads), len(batches)

    few, n_few = reads_in_one_epoch(32)
    many, n_many = reads_in_one_epoch(4)
    assert n_many >= 4 * n_few
    assert few == many <= 1, reads  # the loss, read once per epoch
    dp = DPConfig(enabled=True, target_epsilon=100.0, noise_multiplier=1.0, reproducible_noise=True, accountant="rdp")
    few_dp, _ = reads_in_one_epoch(32, dp)
    many_dp, n_dp = reads_in_one_epoch(4, dp)
    assert n_dp >= 8 and few_dp == many_dp <= 1, reads


def test_draw_shifts_equals_per_batch_draws():
    sizes = [5, 0, 3, 7]
    a = seeds.make_generator("cpu", 3)
    b = seeds.make_generator("cpu", 3)
    upfront = training.draw_shifts(sizes, 2, a)
    for size, (dy, dx) in zip(sizes, upfront):
        expected = [torch.randint(0, 5, (size,), generator=b) for _ in range(2)] if size else [torch.zeros(0)] * 2
        assert torch.equal(dy, expected[0].long()) and torch.equal(dx, expected[1].long())
    assert torch.equal(a.get_state(), b.get_state())  # the stream is left where per-batch draws leave it
