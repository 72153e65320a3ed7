"""Which device each stage runs on: the user's explicit choice, else CUDA only when the work pays for it.

With ``train.device = "auto"`` a stage goes to CUDA only when a CUDA device is present, the stage
has a CUDA path, and its work is large: both a step's and the whole stage's multiply-accumulates
(forward pass, one sample = :func:`forward_macs`) pass the thresholds below. ``cpu`` or ``cuda``
set explicitly (config or ``--device``) are honoured by every stage that has a CUDA path. Each
stage records its :class:`Placement` (device and reason) in the run's manifest.

Basis of the thresholds, stated honestly: they are not fitted; two measurements bound them.

- On an H200 (issue #11) the *default* digits pipeline was slower on CUDA than on 2 CPU cores in
  every stage it ran there (train, explain, distill). The default CNN's training step is about
  1e7 forward MACs (330k per 8x8 image x batch 32): work of that size belongs on the CPU.
- The same H200 trained 60k 28x28 images with CNN [32, 64] at batch 256 in 0.26 s/epoch, about
  1.1 ms per step (~1e9 forward MACs): that is the order of its fixed per-step cost (kernel launches,
  Python). One CPU core here runs the digits CNN's training step (forward + backward) at roughly
  1e10 MACs/s (3 ms per 1e7-MAC step, measured on a loaded 2-core machine), so a 1e8-MAC step costs
  it ~30 ms, ~25x that GPU floor: the GPU clearly wins from there on.
- CUDA's start-up (context, first kernels, copies) costs on the order of a second per process,
  so a stage whose whole work is under ~1e10 forward MACs (about a second of CPU) stays on the CPU.

Between 1e7 and 1e8 MACs per step the winner was not measured; the CPU is kept there (the
conservative side: the default pipeline). ``scripts/bench_gpu.py`` prints the decisions beside
the per-stage timings, so a GPU run can move these numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from auditml_core.errors import ConfigError

STAGES = ("train", "evaluate", "explain", "distill", "audit")  # the stages that run models
MIN_STEP_MACS = 1e8  # forward multiply-accumulates per step (samples per step x per-sample MACs) for CUDA
MIN_STAGE_MACS = 1e10  # forward multiply-accumulates of the whole stage for CUDA (CUDA start-up ~1 s)


@dataclass(frozen=True)
class Placement:
    """The device one stage runs on, and why."""

    stage: str
    device: str  # "cpu" or "cuda"
    requested: str  # train.device: "auto", "cpu" or "cuda"
    reason: str  # one sentence
    step_macs: float  # forward multiply-accumulates of one step (batch x per-sample MACs)
    stage_macs: float  # forward multiply-accumulates of the whole stage

    def record(self) -> dict[str, Any]:
        """JSON-safe view for the manifest."""
        return asdict(self)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample's forward pass through ``model``'s Linear and Conv2d layers.

    Counted with forward hooks on one zero sample of ``input_shape`` (without the batch axis), on
    the CPU; other layers (activations, pooling, norms) are cheap beside these and not counted.
    """
    total = 0

    def count(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_out = output[0].numel()  # outputs of the one sample
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += per_out * (layer.in_channels // layer.groups) * kh * kw
        elif isinstance(layer, nn.Linear):
            total += per_out * layer.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def choose_device(
    stage: str,
    *,
    requested: str,
    step_macs: float,
    stage_macs: float,
    cuda_path: bool = True,
    cuda_available: bool | None = None,
) -> Placement:
    """Decide where ``stage`` runs.

    Parameters
    ----------
    stage : one of :data:`STAGES`.
    requested : ``train.device``: ``"auto"`` (decide by size), ``"cpu"`` or ``"cuda"`` (explicit overrides).
    step_macs : forward MACs of one step: samples per step x :func:`forward_macs` (largest model of the stage).
    stage_macs : forward MACs of the whole stage (all models, epochs, shadows).
    cuda_path : whether the stage can run on CUDA at all (the explain stage cannot: shap and LIME get CPU arrays).
    cuda_available : defaults to ``torch.cuda.is_available()``.

    Raises
    ------
    ConfigError
        If ``cuda`` is asked for on a machine without CUDA, or ``requested`` is not a valid choice.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={requested!r} is not valid; choose one of: auto, cpu, cuda")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise ConfigError("train.device='cuda' but no CUDA device is available; use --device auto or cpu")

    def place(device: str, reason: str) -> Placement:
        return Placement(stage, device, requested, reason, float(step_macs), float(stage_macs))

    work = f"{step_macs:.2g} MACs per step, {stage_macs:.2g} in all"
    if requested == "cpu":
        return place("cpu", f"train.device=cpu (explicit); {work}")
    if not cuda_path:
        return place("cpu", f"the {stage} stage has no CUDA path (runs on the CPU whatever train.device says); {work}")
    if requested == "cuda":
        return place("cuda", f"train.device=cuda (explicit); {work}")
    if not available:
        return place("cpu", f"auto: no CUDA device; {work}")
    if step_macs < MIN_STEP_MACS:
        return place("cpu", f"auto: small steps ({work}; CUDA from {MIN_STEP_MACS:.0e} per step)")
    if stage_macs < MIN_STAGE_MACS:
        return place("cpu", f"auto: little work in all ({work}; CUDA from {MIN_STAGE_MACS:.0e} in all)")
    return place("cuda", f"auto: large enough for CUDA ({work})")


def stage_placement(
    stage: str,
    *,
    requested: str,
    work: list[tuple[Callable[[], nn.Module], tuple[int, ...], int, int]],
    cuda_path: bool = True,
    cuda_available: bool | None = None,
) -> Placement:
    """:func:`choose_device` for a stage whose work is ``(build model, input shape, samples per step, samples in all)``.

    Each model is built (by the zero-argument callable) under a forked RNG: counting its work
    leaves torch's global generator where it was, so the stage's own draws are unchanged.

    The step size is the largest model's (one slow model decides where the stage is worth running),
    the total sums every model's passes (epochs, shadows and evaluation rows, as the caller counts them).
    """
    step, total = 0.0, 0.0
    for build, input_shape, per_step, in_all in work:
        with torch.random.fork_rng(devices=[]):  # building a model draws its initial weights
            macs = forward_macs(build(), input_shape)
        step = max(step, float(macs) * per_step)
        total += float(macs) * in_all
    return choose_device(
        stage, requested=requested, step_macs=step, stage_macs=total, cuda_path=cuda_path, cuda_available=cuda_available
    )
