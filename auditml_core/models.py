"""Model factory: the tabular MLP regressor, the CNN classifier and the fixed-feature ("scatter") classifier.

Both are built only from ``nn`` modules (no normalisation layers, no functional
activations) so that they are valid for Opacus as they are and shap's
DeepExplainer can propagate through every layer. A model is described by a
JSON-safe spec, so weights can be reloaded without unpickling any code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is unknown; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def build_regressor(*, n_features: int, hidden_sizes: tuple[int, ...], activation: str = "relu") -> nn.Sequential:
    """An MLP ``(N, n_features) -> (N, 1)``."""
    if n_features < 1:
        raise ValueError(f"n_features={n_features}; the regressor needs at least one feature")
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def build_cnn(
    *,
    input_shape: tuple[int, int, int],
    n_classes: int,
    channels: tuple[int, ...] = (32, 64),
    kernel_size: int = 3,
    hidden: int = 64,
    activation: str = "relu",
) -> nn.Sequential:
    """A CNN ``(N, C, H, W) -> (N, n_classes)`` logits: [conv -> act -> pool] blocks, then a linear head.

    It adapts to the input: a block pools (2x2) only while both sides are at least 2 pixels,
    so 8x8, 16x16 and 28x28 inputs with 1 or 3 channels all work.
    """
    c, h, w = input_shape
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}; a classifier needs at least two classes")
    layers: list[nn.Module] = []
    for out_c in channels:
        layers += [nn.Conv2d(c, out_c, kernel_size, padding=kernel_size // 2), _activation(activation)]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out_c
    layers.append(nn.Flatten())
    width = c * h * w
    if hidden:
        layers += [nn.Linear(width, hidden), _activation(activation)]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def gabor_bank(*, kernel_size: int, orientations: int, wavelengths: tuple[float, ...]) -> torch.Tensor:
    """A fixed, data-independent bank of oriented Gabor filters ``(2 * W * O, 1, k, k)``.

    For each wavelength ``W`` and orientation ``O``: an even (cosine) and an odd (sine) filter,
    each made zero-mean (it ignores the image's brightness) and of unit L2 norm, so that the
    responses are on the scale of the input whatever the wavelength. Like the first layer of a
    scattering transform (Mallat 2012; used for DP by Tramèr & Boneh 2021) but without learning or
    fitting anything: the filters are a function of these three arguments only.
    """
    half = (kernel_size - 1) / 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - half
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    filters = []
    for wavelength in wavelengths:
        sigma = 0.5 * wavelength  # envelope of about one period: a band-pass, not a line detector
        envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for i in range(orientations):
            theta = math.pi * i / orientations
            phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / wavelength
            for carrier in (torch.cos(phase), torch.sin(phase)):
                f = envelope * carrier
                f = f - envelope * (f.sum() / envelope.sum())  # zero mean under the envelope
                filters.append(f / f.norm())
    return torch.stack(filters)[:, None].float()  # (F, 1, k, k)


def build_scatter(
    *,
    input_shape: tuple[int, int, int],
    n_classes: int,
    orientations: int = 8,
    wavelengths: tuple[float, ...] = (3.0, 6.0),
    kernel_size: int = 5,
    pool: int = 2,
    norm_groups: int = 0,
    hidden: int = 0,
    activation: str = "tanh",
) -> nn.Sequential:
    """A fixed feature front-end and a small trainable head ``(N, C, H, W) -> (N, n_classes)`` logits.

    Front-end (``requires_grad=False``, data-independent, so it spends no privacy budget: DP-SGD
    only ever sees gradients of the head): the image itself and its responses to a bank of
    oriented Gabor filters (:func:`gabor_bank`, applied to every input channel), each split into
    its positive and negative parts by a ReLU (the two halves of a modulus, which the head can
    recombine), average-pooled ``pool x pool``, then, if ``norm_groups`` > 0, standardised per image
    by a parameter-free ``GroupNorm`` (each image by its own statistics: nothing is estimated from
    a data set). Head: a linear layer, or ``hidden`` units with ``activation`` and a linear layer.

    Valid for Opacus as it is (GroupNorm without affine parameters holds nothing to train). With
    ``norm_groups=0`` it is built only from ``nn`` modules shap's DeepExplainer knows (Conv2d, ReLU,
    AvgPool2d, Linear, Tanh); with GroupNorm DeepExplainer fails its additivity check, and the
    gradient explainer is what works (see PLATFORM.md).
    """
    c, h, w = input_shape
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}; a classifier needs at least two classes")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size}; it must be an odd integer >= 1")
    if pool < 1:
        raise ValueError(f"pool={pool}; it must be >= 1")
    bank = gabor_bank(kernel_size=kernel_size, orientations=orientations, wavelengths=tuple(wavelengths))
    n_f = len(bank)
    identity = torch.zeros(1, 1, kernel_size, kernel_size)
    identity[0, 0, kernel_size // 2, kernel_size // 2] = 1.0
    # every input channel: the pixel itself (+/-) and every filter's response (+/-)
    per_channel = torch.cat([identity, -identity, bank, -bank])  # (2 + 2F, 1, k, k)
    conv = nn.Conv2d(c, c * (2 + 2 * n_f), kernel_size, padding=kernel_size // 2, groups=c, bias=False)
    with torch.no_grad():
        conv.weight.copy_(per_channel.repeat(c, 1, 1, 1))
    conv.weight.requires_grad_(False)  # fixed: never trained, so it consumes no privacy budget
    layers: list[nn.Module] = [conv, nn.ReLU()]
    p = min(pool, h, w)
    if p > 1:
        layers.append(nn.AvgPool2d(p))
        h, w = h // p, w // p
    if norm_groups:
        if conv.out_channels % norm_groups:
            raise ValueError(f"norm_groups={norm_groups} does not divide the {conv.out_channels} feature channels")
        layers.append(nn.GroupNorm(norm_groups, conv.out_channels, affine=False))
    layers.append(nn.Flatten())
    width = conv.out_channels * h * w
    if hidden:
        layers += [nn.Linear(width, hidden), _activation(activation)]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


BUILDERS: dict[str, Callable[..., nn.Sequential]] = {
    "regressor": build_regressor,
    "cnn": build_cnn,
    "scatter": build_scatter,
}


def build(spec: Mapping[str, Any]) -> nn.Sequential:
    """Build a model from its spec ``{"kind": "regressor"|"cnn"|"scatter", "kwargs": {...}}``."""
    kind = spec.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"model kind {kind!r} is unknown; choose one of: {', '.join(BUILDERS)}")
    kwargs = dict(spec["kwargs"])
    for key in ("hidden_sizes", "channels", "input_shape", "wavelengths"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return BUILDERS[kind](**kwargs)


def n_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of trainable parameters (all parameters, fixed ones included, with ``trainable_only=False``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def front_end_record(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a model's fixed feature front-end is, for the training record (None when it has none)."""
    if spec.get("kind") != "scatter":
        return None
    model = build(spec)
    fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    kw = spec["kwargs"]
    return {
        "kind": "fixed Gabor filter bank (scattering-like), ReLU halves, average pooling"
        + (", per-image GroupNorm" if kw.get("norm_groups") else ""),
        "fixed_parameters": int(fixed),
        "trainable_parameters": n_parameters(model),
        "data_independent": True,
        "privacy": "spends no privacy budget: its filters are a function of the spec alone (never trained, "
        "never fitted to any data) and its per-image normalisation uses each image's own statistics; DP-SGD trains "
        "only the head, so the DP guarantee covers all the weights, given the inputs' standardisation: the "
        "per-channel mean and standard deviation of the training split, computed without DP and not covered",
    }


# --------------------------------------------------------------------------- the model registry


@dataclass(frozen=True)
class ModelEntry:
    """One model the pipeline trains: every loop over models reads :data:`MODELS`.

    A third model is one entry here, one builder in :data:`BUILDERS`, a config section
    of the same name (``fit``/``dp_fit`` sub-sections) and a branch in
    :func:`auditml_core.teacher.model_specs`.
    """

    name: str  # config section and artifact stem (models/<name>.safetensors)
    dataset: str  # key of the prepared dataset it trains on ("tabular" or "images")
    task: str  # "regression" or "classification"
    title: str  # how the report names it


MODELS: dict[str, ModelEntry] = {
    "regressor": ModelEntry(name="regressor", dataset="tabular", task="regression", title="MLP regressor"),
    "cnn": ModelEntry(name="cnn", dataset="images", task="classification", title="CNN classifier"),
}


def model_entry(name: str) -> ModelEntry:
    """The registry entry of model ``name``; the error lists the valid names."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def title(name: str) -> str:
    """The report's name for model ``name`` (the name itself when it is not registered)."""
    return MODELS[name].title if name in MODELS else name
