"""What a trained model is and how each model is set up: shared by central and federated training.

Nothing here knows of Flower or of stages: :mod:`pipeline.train` (central) and
:mod:`federated` (ServerApp, ClientApp) both stand on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from auditml_core import models, training
from auditml_core.config import Config, FitConfig
from auditml_core.data import Dataset
from auditml_core.privacy import dp_sgd as privacy


@dataclass(frozen=True)
class TrainedModel:
    """A trained network: how to build it, its weights, and how it was trained."""

    spec: Mapping[str, Any]  # {"kind", "kwargs"} for auditml_core.models.build
    state_dict: Mapping[str, torch.Tensor]  # unwrapped CPU weights
    training: Mapping[str, Any]  # TrainingResult.summary() plus settings (mode, fit config, seed)

    def build(self) -> torch.nn.Module:
        """A fresh plain module with these weights, in eval mode (no Opacus hooks)."""
        model = models.build(self.spec)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass(frozen=True)
class RidgeBaseline:
    """scikit-learn Ridge fitted on the same standardised split; stored as numbers, not a pickle."""

    coef: np.ndarray  # (F,)
    intercept: float
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept


def _regressor_kwargs(cfg: Config, ds: Dataset) -> dict[str, Any]:
    return {
        "n_features": int(ds.input_shape[0]),
        "hidden_sizes": list(cfg.regressor.hidden_sizes),
        "activation": cfg.regressor.activation,
    }


def cnn_architecture(cfg: Config) -> str:
    """The image model's architecture in use: ``cnn.dp_architecture`` under DP (unless "same"), else ``cnn.architecture``."""
    if cfg.dp.enabled and cfg.cnn.dp_architecture != "same":
        return cfg.cnn.dp_architecture
    return cfg.cnn.architecture


def _cnn_kwargs(cfg: Config, ds: Dataset) -> dict[str, Any]:
    act = cfg.cnn.activation if (not cfg.dp.enabled or cfg.cnn.dp_activation == "same") else cfg.cnn.dp_activation
    if cnn_architecture(cfg) == "scatter":
        c = cfg.cnn
        return {
            "input_shape": list(ds.input_shape),
            "n_classes": len(ds.class_names),
            "orientations": c.scatter_orientations,
            "wavelengths": list(c.scatter_wavelengths),
            "kernel_size": c.scatter_kernel_size,
            "pool": c.scatter_pool,
            "norm_groups": c.scatter_norm_groups * ds.input_shape[0],
            "hidden": c.scatter_hidden,
            "activation": act,
        }
    return {
        "input_shape": list(ds.input_shape),
        "n_classes": len(ds.class_names),
        "channels": list(cfg.cnn.channels),
        "kernel_size": cfg.cnn.kernel_size,
        "hidden": cfg.cnn.hidden,
        "activation": act,
    }


# model name -> its builder's arguments for these data and this config (one line per registered model)
_SPEC_KWARGS = {"regressor": _regressor_kwargs, "cnn": _cnn_kwargs}
# model name -> the builder (auditml_core.models.BUILDERS key) it uses under this config, when it is not its own name
_SPEC_KIND = {"cnn": cnn_architecture}


def model_spec(cfg: Config, name: str, ds: Dataset) -> dict[str, Any]:
    """The architecture of model ``name`` for dataset ``ds`` (the CNN adapts to shape and class count)."""
    models.model_entry(name)
    kind = _SPEC_KIND[name](cfg) if name in _SPEC_KIND else name
    return {"kind": kind, "kwargs": _SPEC_KWARGS[name](cfg, ds)}


def model_specs(cfg: Config, datasets: Mapping[str, Dataset]) -> dict[str, dict[str, Any]]:
    """The architecture of every registered model for these data."""
    return {name: model_spec(cfg, name, datasets[entry.dataset]) for name, entry in models.MODELS.items()}


def planned_builders(cfg: Config, datasets: Mapping[str, Dataset]) -> dict[str, Callable[[], torch.nn.Module]]:
    """A fresh, untrained module per registered model, of the architecture planned for these data: all a stage
    needs to decide where it runs (its models' sizes), also before every model is trained."""
    return {name: functools.partial(models.build, spec) for name, spec in model_specs(cfg, datasets).items()}


def fit_config(cfg: Config, name: str) -> FitConfig:
    """The training settings of model ``name`` (``dp_fit`` when DP is on)."""
    return getattr(getattr(cfg, name), fit_section(cfg))


def fit_section(cfg: Config) -> str:
    """The name of the training-settings section in use: ``dp_fit`` under DP, else ``fit``."""
    return "dp_fit" if cfg.dp.enabled else "fit"


def public_pretrain(
    cfg: Config, name: str, model: torch.nn.Module, ds: Dataset, *, device: torch.device, seed: int
) -> dict[str, Any] | None:
    """Under DP, first fit the model non-privately on the split declared public (when configured).

    Public pretraining followed by private fine-tuning is the standard way to make DP-SGD
    useful on small data; the DP guarantee then covers the training split, and the public
    split, by declaration, has none. With ``dp.pretrain_non_private`` a non-DP run is
    pretrained the same way, so that a DP run and its non-private reference differ only
    in DP. Returns the record of what was done, or None.
    """
    epochs = cfg.dp.public_pretrain_epochs
    wanted = cfg.dp.enabled or cfg.dp.pretrain_non_private
    if not wanted or epochs == 0 or len(ds.y["public"]) == 0:
        return None
    fit = replace(
        getattr(cfg, name).fit, epochs=epochs, batch_size=min(getattr(cfg, name).fit.batch_size, len(ds.y["public"]))
    )
    result = training.fit(
        model,
        x_train=ds.x["public"],
        y_train=ds.y["public"],
        x_val=None,
        y_val=None,
        task=ds.task,
        fit_cfg=fit,
        dp=None,
        device=device,
        seed=seed,
        desc=f"{name} public pretraining",
    )
    return {
        "split": "public",
        "rows": int(len(ds.y["public"])),
        "epochs": epochs,
        "seconds": result.seconds,
        "seed": seed,
        "final_train_loss": result.history[-1]["train_loss"],
        "privacy": "none needed: the public split is declared public (data.public_fraction) and is not protected",
    }


def preflight(cfg: Config, datasets: Mapping[str, Dataset]) -> None:
    """Refuse before training anything if any model's planned DP training would overspend its budget.

    Raises
    ------
    PrivacyBudgetError
        If a model's plan exceeds ``dp.target_epsilon``.
    """
    for name, entry in models.MODELS.items():
        fit = fit_config(cfg, name)
        privacy.plan(
            cfg.dp,
            n_samples=len(datasets[entry.dataset].y["train"]),
            batch_size=fit.batch_size,
            max_grad_norm=fit.max_grad_norm,
            epochs=fit.epochs,
        )
