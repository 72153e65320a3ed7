"""Model factory: the tabular MLP regressor and the CNN classifier.

Both are built only from ``nn`` modules (no normalisation layers, no functional
activations) so that they are valid for Opacus as they are and shap's
DeepExplainer can propagate through every layer. A model is described by a
JSON-safe spec, so weights can be reloaded without unpickling any code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

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


BUILDERS: dict[str, Callable[..., nn.Sequential]] = {"regressor": build_regressor, "cnn": build_cnn}


def build(spec: Mapping[str, Any]) -> nn.Sequential:
    """Build a model from its spec ``{"kind": "regressor"|"cnn", "kwargs": {...}}``."""
    kind = spec.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"model kind {kind!r} is unknown; choose one of: {', '.join(BUILDERS)}")
    kwargs = dict(spec["kwargs"])
    for key in ("hidden_sizes", "channels", "input_shape"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return BUILDERS[kind](**kwargs)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the model registry


@dataclass(frozen=True)
class ModelEntry:
    """One model the pipeline trains: every loop over models reads :data:`MODELS`.

    A third model is one entry here, one builder in :data:`BUILDERS`, a config section
    of the same name (``fit``/``dp_fit`` sub-sections) and a branch in
    :func:`core.teacher.model_specs`.
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
