"""FedProx's proximal term for local training, without changing the training core.

FedProx (Li et al., 2020) adds ``mu/2 * ||w - w_global||^2`` to each client's loss. Its
gradient, ``mu * (w - w_global)``, depends on no training record, so adding it to the
gradient right before each optimizer update is the same as adding the term to the loss
for plain SGD/Adam, and under DP-SGD it is added after clipping and noise, which costs
no privacy (it is post-processing of the private gradient).

:func:`pipeline.training.fit` builds its optimizer internally and has no loss hook, so
this module registers a *global* optimizer step pre-hook for the duration of one
``fit`` call and acts only on the parameters of the model it was given. Opacus'
``DPOptimizer.step`` overwrites ``p.grad`` with the private gradient before it calls the
wrapped optimizer's ``step``, whose pre-hook then adds the proximal gradient once.
The cleaner seam is a ``proximal_mu``/``reference_state`` argument of
``training.fit``; until the core has it, this is the one place that does it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook


@contextlib.contextmanager
def proximal_term(model: nn.Module, *, mu: float) -> Iterator[None]:
    """While active, every optimizer step on ``model``'s parameters adds ``mu * (w - w_start)`` to the gradient.

    ``w_start`` is a copy of the parameters when the context is entered (the global model).
    ``mu = 0`` does nothing.
    """
    if mu <= 0:
        yield
        return
    reference = {id(p): p.detach().clone() for p in model.parameters()}

    def add_proximal_gradient(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    ref = reference.get(id(p))
                    if ref is not None and p.grad is not None:
                        p.grad.add_(p.detach() - ref.to(p.device), alpha=mu)

    handle = register_optimizer_step_pre_hook(add_proximal_gradient)
    try:
        yield
    finally:
        handle.remove()
