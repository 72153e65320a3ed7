"""One epoch and its parts: device choice, loss, optimizer, batch order, augmentation, evaluation.

The primitives under :func:`auditml_core.training.fit` (which re-exports them: callers write
``training.predict``). Nothing here knows about DP beyond the noise-only step of an empty
Poisson batch, which :mod:`auditml_core.privacy.dp_sgd` performs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from auditml_core import allocator
from auditml_core.config import FitConfig
from auditml_core.errors import ConfigError
from auditml_core.privacy import dp_sgd as privacy

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto", *, num_threads: int = 1) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; also sets the process's CPU threads and allocator.

    The allocator keeps freed memory for reuse (:func:`auditml_core.allocator.keep_freed_memory`).

    Raises
    ------
    ConfigError
        If ``cuda`` is asked for on a machine without a usable CUDA device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name!r} is not valid; choose one of: auto, cpu, cuda")
    # One thread per process is fastest for these small models (measured: see PLATFORM.md).
    torch.set_num_threads(num_threads)
    allocator.keep_freed_memory()
    return torch.device(name)


def loss_fn(task: str) -> nn.Module:
    """MSE for regression (on the (N,) output), cross-entropy for classification."""
    return nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()


def _output(model: nn.Module, xb: torch.Tensor, task: str) -> torch.Tensor:
    out = model(xb)
    return out.squeeze(-1) if task == "regression" else out  # (B,) or (B, K)


def make_optimizer(model: nn.Module, fit: FitConfig) -> torch.optim.Optimizer:
    """The optimizer ``fit`` names."""
    if fit.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=fit.lr, momentum=fit.momentum, weight_decay=fit.weight_decay)
    # Not fused=True (~10% less CPU per step here): torch 2.13's fused CPU kernel walks a parameter and its
    # gradient in memory order, so a channels-last weight (training.channels_last) with a default-layout gradient
    # (the ranks' gradient share sets one) is updated with other elements' gradients, silently (measured).
    return torch.optim.Adam(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)


def add_proximal_term(optimizer: torch.optim.Optimizer, model: nn.Module, mu: float) -> None:
    """Add FedProx's gradient ``mu * (w - w_start)`` before every update of ``optimizer``.

    It depends on no training record, so it is added to the gradient rather than the loss:
    under DP-SGD, Opacus' optimizer writes the clipped, noised gradient and then steps this
    (wrapped) optimizer, whose pre-hook adds the term after the noise: post-processing, no
    privacy cost. Per-sample gradients of a loss term would instead be clipped and noised.
    """
    reference = [p.detach().clone() for p in model.parameters()]

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, ref in zip(model.parameters(), reference):
                if p.grad is not None:
                    p.grad.add_(p.detach() - ref, alpha=mu)

    optimizer.register_step_pre_hook(hook)


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator, *, device: torch.device | str | None = None
) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch (no DataLoader: it dominates the cost of these tiny models).

    The permutation is drawn by ``generator`` (on the CPU: the same order on every device) and, when
    ``device`` is given, copied there once per epoch, so indexing device-resident data costs no
    host-to-device copy per batch.
    """
    order = torch.randperm(n, generator=generator)
    if device is not None:
        order = order.to(device)
    yield from torch.split(order, batch_size)


def draw_shifts(
    sizes: Sequence[int], max_shift: int, generator: torch.Generator, *, device: torch.device | str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(dy, dx)`` offsets of :func:`random_shift` for batches of ``sizes``, drawn for a whole epoch at once.

    They are drawn from ``generator`` in exactly the order per-batch calls of :func:`random_shift`
    would draw them (dy then dx of each batch; nothing for an empty batch), so an epoch's
    augmentation is the same whether drawn per batch or up front; then copied to ``device`` in
    one transfer instead of two per batch.

    Returns
    -------
    One ``(dy, dx)`` pair of (B,) int64 tensors per size.
    """
    if max_shift <= 0:
        return [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) for _ in sizes]
    high = 2 * max_shift + 1
    draws = [
        torch.randint(0, high, (b,), generator=generator) if b else torch.zeros(0, dtype=torch.long)
        for b in sizes
        for _ in range(2)
    ]
    flat = torch.cat(draws) if draws else torch.zeros(0, dtype=torch.long)
    if device is not None:
        flat = flat.to(device)
    parts = torch.split(flat, [b for b in sizes for _ in range(2)])
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(sizes))]


def shift_images(xb: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of ``xb`` (B, C, H, W) by ``(dy - max_shift, dx - max_shift)`` pixels.

    ``dy``, ``dx`` (B,) are offsets in [0, 2 * max_shift] on ``xb``'s device (:func:`draw_shifts`).
    Uncovered pixels take the image's own minimum (the background of standardised digits).
    """
    if max_shift <= 0 or len(xb) == 0:
        return xb
    b, _, h, w = xb.shape
    floor = xb.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    padded = nn.functional.pad(xb - floor, (max_shift,) * 4) + floor  # (B, C, H+2s, W+2s)
    rows = (dy[:, None] + torch.arange(h, device=xb.device))[:, None, :, None].expand(
        b, xb.shape[1], h, w + 2 * max_shift
    )
    out = padded.gather(2, rows)  # (B, C, H, W+2s)
    cols = (dx[:, None] + torch.arange(w, device=xb.device))[:, None, None, :].expand(b, xb.shape[1], h, w)
    return out.gather(3, cols)  # (B, C, H, W)


def random_shift(xb: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``xb`` (B, C, H, W) by its own random offset in [-max_shift, max_shift].

    Uncovered pixels take the image's own minimum (the background of standardised digits).
    :func:`fit` draws a whole epoch's offsets at once (:func:`draw_shifts`, same stream); this
    per-batch form is for callers holding one batch.

    A per-record transformation: under DP it touches only the record it augments, so the
    guarantee is unchanged.
    """
    if max_shift <= 0 or len(xb) == 0:
        return xb
    ((dy, dx),) = draw_shifts([len(xb)], max_shift, generator, device=xb.device)
    return shift_images(xb, dy, dx, max_shift)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    *,
    task: str,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    criterion: nn.Module | None = None,
) -> float:
    """One pass over ``batches`` (an iterable of ``(x, y)`` tensors on the model's device).

    Returns the mean training loss. An empty batch (only possible under Poisson sampling) still
    takes its noise-only step (:func:`auditml_core.privacy.dp_sgd.noise_only_step`), as DP-SGD's analysis assumes.

    The step path never waits for the device: the loss is summed on the device (in float64, the
    same arithmetic as a Python float sum) and read once, at the end of the epoch.
    """
    model.train()
    criterion = criterion or loss_fn(task)
    total: torch.Tensor | None = None  # sum of batch loss x batch length, on the device, float64
    count = 0
    for xb, yb in batches:
        if len(xb) == 0:
            privacy.noise_only_step(model, optimizer)
            continue
        if transform is not None:
            xb = transform(xb)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(_output(model, xb, task), yb)
        loss.backward()
        optimizer.step()
        weighted = loss.detach().double() * len(xb)
        total = weighted if total is None else total + weighted
        count += len(xb)
    return float(total) / count if total is not None else 0.0


@torch.no_grad()
def predict(
    model: nn.Module, x: np.ndarray | torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 1024
) -> np.ndarray:
    """Model outputs for ``x``: (N,) for a regressor, (N, K) logits for a classifier."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    outs = [model(xt[i : i + batch_size].to(device)).cpu() for i in range(0, len(xt), batch_size)]
    out = torch.cat(outs) if outs else torch.empty(0)
    return (out.squeeze(-1) if out.ndim == 2 and out.shape[1] == 1 else out).numpy()


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, task: str, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Loss and headline metric (R² on the scale trained on, or accuracy) on one split."""
    out = predict(model, x, device=device)
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        mse = float(np.mean((out - y) ** 2))
        var = float(np.var(y))
        return {"loss": mse, "r2": 1.0 - mse / var if var > 0 else float("nan")}
    logits = torch.as_tensor(out)
    loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(y, dtype=torch.long)))
    return {"loss": loss, "accuracy": float((out.argmax(axis=1) == y).mean())}


def progress_bar(it: range, enabled: bool, desc: str) -> Iterable[int]:
    """``it``, wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
