"""Stage ``train``: the MLP regressor, its Ridge baseline and the CNN, centrally or federated, optionally with DP.

Both models go through the one training core (:func:`pipeline.training.fit`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch
from sklearn.linear_model import Ridge

from pipeline import models, training
from pipeline.artifacts import json_bytes, read_json, read_state_dict, state_dict_bytes
from pipeline.config import Config, FitConfig
from pipeline.data import Dataset
from pipeline.runtime import Runtime, derive_seed

log = logging.getLogger(__name__)
MODELS = ("regressor", "cnn")


@dataclass(frozen=True)
class TrainedModel:
    """A trained network: how to build it, its weights, and how it was trained."""

    spec: Mapping[str, Any]  # {"kind", "kwargs"} for pipeline.models.build
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


def model_specs(cfg: Config, datasets: Mapping[str, Dataset]) -> dict[str, dict[str, Any]]:
    """The architecture of each model for these data (the CNN adapts to shape and class count)."""
    tab, img = datasets["tabular"], datasets["images"]
    act = cfg.cnn.activation if (not cfg.dp.enabled or cfg.cnn.dp_activation == "same") else cfg.cnn.dp_activation
    return {
        "regressor": {"kind": "regressor", "kwargs": {
            "n_features": int(tab.input_shape[0]), "hidden_sizes": list(cfg.regressor.hidden_sizes),
            "activation": cfg.regressor.activation}},
        "cnn": {"kind": "cnn", "kwargs": {
            "input_shape": list(img.input_shape), "n_classes": len(img.class_names), "channels": list(cfg.cnn.channels),
            "kernel_size": cfg.cnn.kernel_size, "hidden": cfg.cnn.hidden, "activation": act}},
    }


def fit_config(cfg: Config, name: str) -> FitConfig:
    """The training settings of model ``name`` (``dp_fit`` when DP is on)."""
    model_cfg = getattr(cfg, name)
    return model_cfg.dp_fit if cfg.dp.enabled else model_cfg.fit


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Runtime | None = None) -> dict[str, Any]:
    """Train the regressor, the Ridge baseline and the CNN.

    Parameters
    ----------
    cfg : resolved configuration.
    inputs : ``{"data": {"tabular": Dataset, "images": Dataset}}``.
    seed : stage seed; each model derives its own.
    runtime : device, progress bars and the checkpoint store (defaults: auto device, none).

    Returns
    -------
    ``{"regressor": TrainedModel, "cnn": TrainedModel, "ridge": RidgeBaseline}``

    Raises
    ------
    PrivacyBudgetError
        If DP training would exceed ``dp.target_epsilon``.
    """
    runtime = runtime or Runtime()
    datasets = inputs["data"]
    device = training.resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
    specs = model_specs(cfg, datasets)
    out: dict[str, Any] = {}
    tab = datasets["tabular"]
    ridge = Ridge(alpha=cfg.regressor.ridge_alpha).fit(tab.x["train"], tab.y["train"])
    out["ridge"] = RidgeBaseline(coef=np.asarray(ridge.coef_, dtype=np.float64), intercept=float(ridge.intercept_), alpha=cfg.regressor.ridge_alpha)
    if cfg.dp.enabled and cfg.train.mode == "central":
        _preflight(cfg, datasets)
    if cfg.train.mode == "federated":
        from federated.simulation import train_federated  # imported lazily: Flower is heavy

        for name, key in (("regressor", "tabular"), ("cnn", "images")):
            out[name] = train_federated(cfg, name=name, dataset=datasets[key], spec=specs[name],
                                        seed=derive_seed(seed, name), runtime=runtime)
        return out
    for name, key in (("regressor", "tabular"), ("cnn", "images")):
        ds, fit_cfg, model_seed = datasets[key], fit_config(cfg, name), derive_seed(seed, name)
        torch.manual_seed(model_seed)  # weight initialisation draws from torch's global generator
        model = models.build(specs[name])
        resume = runtime.load_checkpoint(name)
        if resume is not None:
            log.info("%s: resuming from the checkpoint after epoch %d", name, resume.epoch)
        pretraining = None
        if resume is None:
            pretraining = public_pretrain(cfg, name, model, ds, device=device, seed=derive_seed(model_seed, "pretrain"))
        result = training.fit(
            model, x_train=ds.x["train"], y_train=ds.y["train"], x_val=ds.x["val"], y_val=ds.y["val"],
            task=ds.task, fit_cfg=fit_cfg, dp=cfg.dp, device=device, seed=model_seed, patience=cfg.train.patience,
            resume=resume, on_epoch_end=lambda ck, n=name: runtime.save_checkpoint(n, ck),
            progress=runtime.progress, desc=name,
        )
        out[name] = TrainedModel(
            spec=specs[name], state_dict=result.state_dict,
            training={**result.summary(), "mode": "central", "seed": model_seed, "device": str(device),
                      "fit": fit_cfg.__dict__, "n_parameters": models.n_parameters(model),
                      "resumed_from_epoch": resume.epoch if resume else 0, "public_pretraining": pretraining},
        )
    return out


def public_pretrain(cfg: Config, name: str, model: torch.nn.Module, ds: Dataset, *, device: torch.device,
                     seed: int) -> dict[str, Any] | None:
    """Under DP, first fit the model non-privately on the split declared public (when configured).

    Public pretraining followed by private fine-tuning is the standard way to make DP-SGD
    useful on small data; the DP guarantee then covers the training split, and the public
    split, by declaration, has none. Returns the record of what was done, or None.
    """
    epochs = cfg.dp.public_pretrain_epochs
    if not cfg.dp.enabled or epochs == 0 or len(ds.y["public"]) == 0:
        return None
    fit = replace(getattr(cfg, name).fit, epochs=epochs, batch_size=min(getattr(cfg, name).fit.batch_size, len(ds.y["public"])))
    result = training.fit(model, x_train=ds.x["public"], y_train=ds.y["public"], x_val=None, y_val=None, task=ds.task,
                          fit_cfg=fit, dp=None, device=device, seed=seed, desc=f"{name} public pretraining")
    return {"split": "public", "rows": int(len(ds.y["public"])), "epochs": epochs, "seconds": result.seconds,
            "seed": seed, "final_train_loss": result.history[-1]["train_loss"],
            "privacy": "none needed: the public split is declared public (data.public_fraction) and is not protected"}


def _preflight(cfg: Config, datasets: Mapping[str, Dataset]) -> None:
    """Refuse before training anything if either model's planned DP training would overspend its budget."""
    from pipeline import privacy

    for name, key in (("regressor", "tabular"), ("cnn", "images")):
        fit = fit_config(cfg, name)
        privacy.plan(cfg.dp, n_samples=len(datasets[key].y["train"]), batch_size=fit.batch_size,
                     max_grad_norm=fit.max_grad_norm, epochs=fit.epochs)


def dump(out: Mapping[str, Any]) -> dict[str, bytes]:
    """Weights as safetensors, specs and training records as JSON."""
    files = {}
    for name in MODELS:
        m = out[name]
        files[f"models/{name}.safetensors"] = state_dict_bytes(m.state_dict)
        files[f"models/{name}.json"] = json_bytes({"spec": m.spec, "training": m.training})
    r = out["ridge"]
    files["models/ridge.json"] = json_bytes({"kind": "sklearn.linear_model.Ridge", "alpha": r.alpha, "coef": r.coef, "intercept": r.intercept})
    return files


def load(read) -> dict[str, Any]:
    """Rebuild the stage output from the run directory."""
    out: dict[str, Any] = {}
    for name in MODELS:
        meta = read_json(read(f"models/{name}.json"))
        out[name] = TrainedModel(spec=meta["spec"], state_dict=read_state_dict(read(f"models/{name}.safetensors")), training=meta["training"])
    r = read_json(read("models/ridge.json"))
    out["ridge"] = RidgeBaseline(coef=np.asarray(r["coef"]), intercept=float(r["intercept"]), alpha=float(r["alpha"]))
    return out
