"""Stage ``train``: every registered model (and the regressor's Ridge baseline), central or federated, optionally DP.

Every model goes through the one training core (:func:`auditml_core.training.fit`); the
federated path runs the same core inside Flower ClientApps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from sklearn.linear_model import Ridge
from torch import nn

from auditml_core import models, placement, seeds, training
from auditml_core.artifacts import json_bytes, read_json, read_state_dict, state_dict_bytes
from auditml_core.config import Config
from auditml_core.data import Dataset
from auditml_core.errors import TrainingDivergedError
from auditml_core.runtime import Runtime
from auditml_core.teacher import (
    RidgeBaseline,
    TrainedModel,
    fit_config,
    fit_section,
    model_specs,
    planned_builders,
    preflight,
    public_pretrain,
)
from pipeline import ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutput:
    """What the train stage produces: one trained network per registered model, and the Ridge baseline."""

    models: Mapping[str, TrainedModel]  # model name -> trained network
    ridge: RidgeBaseline  # scikit-learn Ridge on the regressor's data
    # model name -> weights right after public pretraining, before any private record was read (DP runs with
    # dp.public_pretrain_epochs > 0): the public-only baseline that shows what DP training on the private data added
    public_only: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Runtime | None = None) -> TrainOutput:
    """Train every registered model and the Ridge baseline.

    Parameters
    ----------
    cfg : resolved configuration.
    inputs : ``{"data": {"tabular": Dataset, "images": Dataset}}``.
    seed : stage seed; each model derives its own (:func:`auditml_core.seeds.model_seed`).
    runtime : progress bars and the checkpoint store (default: none).

    Returns
    -------
    TrainOutput

    Raises
    ------
    PrivacyBudgetError
        If DP training would exceed ``dp.target_epsilon``.
    """
    runtime = runtime or Runtime()
    datasets = inputs["data"]
    if cfg.train.mode == "federated":
        device = training.resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
        trained = _train_federated(cfg, datasets, model_specs(cfg, datasets), seed=seed, runtime=runtime, device=device)
        return TrainOutput(models=trained, ridge=_ridge_baseline(cfg, datasets["tabular"]))
    out = combine(cfg, {name: run_part(cfg, inputs, name, seed=seed, runtime=runtime) for name in models.MODELS})
    if runtime.followers is not None:
        runtime.followers.release(ok=True)  # the other ranks only train: they exit now
    return out


def parts(cfg: Config) -> tuple[str, ...]:
    """One part per model for central training in one process, which the runner runs in its own process (they
    write checkpoints) and, as each model is trained, starts that model's parts of the later stages beside the
    next one's training. None for a federated run (one federation trains every model) or several ranks."""
    return tuple(models.MODELS) if cfg.train.mode == "central" and cfg.train.processes == 1 else ()


@dataclass(frozen=True)
class TrainPart:
    """One model trained centrally; the Ridge baseline comes with the model trained on the tabular data."""

    model: TrainedModel
    public_only: Mapping[str, torch.Tensor] | None  # its weights after public pretraining, when it had some
    ridge: RidgeBaseline | None


def run_part(
    cfg: Config, inputs: Mapping[str, Any], name: str, *, seed: int, runtime: Runtime | None = None
) -> TrainPart:
    """Train model ``name`` centrally (one of :func:`parts`, or every model of :func:`run`); the first model
    checks every model's DP plan first, so that an impossible one is refused before anything trains."""
    runtime = runtime or Runtime()
    datasets = inputs["data"]
    if cfg.dp.enabled and name == next(iter(models.MODELS)):
        preflight(cfg, datasets)
    specs = model_specs(cfg, datasets)
    training.resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
    where = device_placement(cfg, datasets, planned_builders(cfg, datasets))
    runtime.record_placement(where)
    device = training.resolve_device(where.device, num_threads=cfg.train.num_threads)
    entry = models.MODELS[name]
    public_only: dict[str, dict[str, torch.Tensor]] = {}
    trained = _train_central(
        cfg,
        name,
        datasets[entry.dataset],
        specs[name],
        device=device,
        seed=seeds.derive_seed(seed, name),
        runtime=runtime,
        public_only=public_only,
    )
    ridge = _ridge_baseline(cfg, datasets["tabular"]) if entry.dataset == "tabular" else None
    return TrainPart(model=trained, public_only=public_only.get(name), ridge=ridge)


def combine(cfg: Config, done: Mapping[str, TrainPart]) -> TrainOutput:
    """The stage output from its parts: all of them, or (the runner, while the others train) the first ones in
    :func:`parts` order, which bring the Ridge baseline with the regressor."""
    ridges = [part.ridge for part in done.values() if part.ridge is not None]
    if len(ridges) != 1:
        raise ValueError(f"the train stage's Ridge baseline comes with the tabular model's part; parts: {list(done)}")
    names = [name for name in models.MODELS if name in done]
    return TrainOutput(
        models={name: done[name].model for name in names},
        ridge=ridges[0],
        public_only={name: done[name].public_only for name in names if done[name].public_only is not None},
    )


def _ridge_baseline(cfg: Config, tab: Dataset) -> RidgeBaseline:
    """scikit-learn's Ridge on the regressor's training split: the linear baseline the report compares with."""
    ridge = Ridge(alpha=cfg.regressor.ridge_alpha).fit(tab.x["train"], tab.y["train"])
    return RidgeBaseline(
        coef=np.asarray(ridge.coef_, dtype=np.float64),
        intercept=float(ridge.intercept_),
        alpha=cfg.regressor.ridge_alpha,
    )


def _train_federated(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    specs: Mapping[str, Mapping[str, Any]],
    *,
    seed: int,
    runtime: Runtime,
    device: torch.device,
) -> dict[str, TrainedModel]:
    """Every registered model trained by a Flower simulation (``train.mode=federated``)."""
    runtime.record_placement(
        placement.Placement(
            "train",
            device.type,
            cfg.train.device,
            "federated: every client resolves train.device itself (auto = CUDA when present); "
            "the size rule of auditml_core.placement is not applied to clients",
            0.0,
            0.0,
        )
    )
    # lazily: Flower and Ray take seconds to import
    from federated.launch.simulation import train_federated, train_federated_models

    model_seeds = {name: seeds.derive_seed(seed, name) for name in models.MODELS}
    if seed == seeds.stage_seed(cfg.seed, "train"):  # the runner's seed: the apps derive the same ones
        # One federation trains every model in turn: Flower's start-up (SuperLink, Ray) is paid once.
        return dict(
            train_federated_models(
                cfg,
                datasets={name: datasets[entry.dataset] for name, entry in models.MODELS.items()},
                specs={name: specs[name] for name in models.MODELS},
                seeds=model_seeds,
                runtime=runtime,
            )
        )
    trained: dict[str, TrainedModel] = {}
    for name, entry in models.MODELS.items():  # another stage seed: it travels as app.seed, one model per federation
        trained[name] = train_federated(
            cfg,
            name=name,
            dataset=datasets[entry.dataset],
            spec=specs[name],
            seed=model_seeds[name],
            runtime=runtime,
        )
    return trained


def device_placement(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    builders: Mapping[str, Callable[[], nn.Module]],
    *,
    cuda_available: bool | None = None,
) -> placement.Placement:
    """Where central training runs: each model's step (batch) and its epochs over train and validation rows."""
    work = []
    for name, entry in models.MODELS.items():
        ds, fit_cfg = datasets[entry.dataset], fit_config(cfg, name)
        n_train, n_val = len(ds.y["train"]), len(ds.y["val"])
        work.append(
            (
                builders[name],
                tuple(ds.x["train"].shape[1:]),
                min(fit_cfg.batch_size, n_train),
                (n_train + n_val) * fit_cfg.epochs,
            )
        )
    return placement.stage_placement("train", requested=cfg.train.device, work=work, cuda_available=cuda_available)


def _train_central(
    cfg: Config,
    name: str,
    ds: Dataset,
    spec: Mapping[str, Any],
    *,
    device: torch.device,
    seed: int,
    runtime: Runtime,
    public_only: dict[str, dict[str, torch.Tensor]],
) -> TrainedModel:
    fit_cfg = fit_config(cfg, name)
    torch.manual_seed(seed)  # weight initialisation draws from torch's global generator
    model = models.build(spec)
    resume = runtime.load_checkpoint(name)
    if resume is not None:
        log.info("%s: resuming from the checkpoint after epoch %d", name, resume.epoch)
    pretraining = None
    if resume is None:
        try:
            pretraining = public_pretrain(cfg, name, model, ds, device=device, seed=seeds.pretrain_seed(seed))
        except TrainingDivergedError as exc:
            raise diverged(exc, f"{name}.fit", getattr(cfg, name).fit) from None
        if pretraining is not None:
            # A copy of the model before DP-SGD touches the private split: the public-only baseline.
            public_only[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            pretraining = {**pretraining, "weights": public_only_path(name)}
            # Saved before the first private step: a resume skips pretraining but must record it all the same.
            runtime.save_public_pretraining(name, pretraining, public_only[name])
    elif (saved := runtime.load_public_pretraining(name)) is not None:
        pretraining, public_only[name] = saved
    followers = runtime.followers  # rank 0 of a multi-process training: the other ranks train with it
    if followers is not None:
        followers.train(
            ranks.Order(
                name=name,
                spec=spec,
                initial_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                task=ds.task,
                fit_cfg=fit_cfg,
                dp=cfg.dp,
                device_type=device.type,
                seed=seed,
                patience=cfg.train.patience,
                resume=training.checkpoint_bytes(resume) if resume is not None else None,
                num_threads=cfg.train.num_threads,
            ),
            x_train=ds.x["train"],
            y_train=ds.y["train"],
        )
    try:
        result = _fit_central(cfg, name, model, ds, fit_cfg, device=device, seed=seed, runtime=runtime, resume=resume)
    except TrainingDivergedError as exc:
        raise diverged(exc, f"{name}.{fit_section(cfg)}", fit_cfg) from None
    if followers is not None:
        followers.trained()
    return TrainedModel(
        spec=spec,
        state_dict=result.state_dict,
        training={
            **result.summary(),
            "mode": "central",
            "world_size": followers.world.size if followers is not None else 1,  # ranks that trained it together
            "seed": seed,
            "device": str(device),
            "fit": fit_cfg.__dict__,
            "n_parameters": models.n_parameters(model),
            "resumed_from_epoch": resume.epoch if resume else 0,
            "public_pretraining": pretraining,
            "fixed_front_end": models.front_end_record(spec),
        },
    )


def diverged(exc: TrainingDivergedError, key: str, fit_cfg: Any) -> TrainingDivergedError:
    """The core's divergence error, reworded with the config key to lower."""
    return TrainingDivergedError(
        f"training diverged at epoch {exc.epoch}; lower {key}.lr (now {fit_cfg.lr:g})"
        + (f" or {key}.weight_decay (now {fit_cfg.weight_decay:g})" if fit_cfg.weight_decay > 1 else ""),
        epoch=exc.epoch,
    )


def _fit_central(
    cfg: Config,
    name: str,
    model: Any,
    ds: Dataset,
    fit_cfg: Any,
    *,
    device: torch.device,
    seed: int,
    runtime: Runtime,
    resume: Any,
) -> training.TrainingResult:
    return training.fit(
        model,
        x_train=ds.x["train"],
        y_train=ds.y["train"],
        x_val=ds.x["val"],
        y_val=ds.y["val"],
        task=ds.task,
        fit_cfg=fit_cfg,
        dp=cfg.dp,
        device=device,
        seed=seed,
        patience=cfg.train.patience,
        resume=resume,
        on_epoch_end=lambda ck: runtime.save_checkpoint(name, ck),
        progress=runtime.progress,
        desc=name,
        world=runtime.followers.world if runtime.followers is not None else None,
    )


def public_only_path(name: str) -> str:
    """Where the public-only (pretrained, pre-DP) weights of model ``name`` are recorded."""
    return f"models/{name}_public_only.safetensors"


def dump(out: TrainOutput) -> dict[str, bytes]:
    """Weights as safetensors, specs and training records as JSON."""
    files = {public_only_path(name): state_dict_bytes(sd) for name, sd in out.public_only.items()}
    for name, m in out.models.items():
        files[f"models/{name}.safetensors"] = state_dict_bytes(m.state_dict)
        files[f"models/{name}.json"] = json_bytes({"spec": m.spec, "training": m.training})
    r = out.ridge
    files["models/ridge.json"] = json_bytes(
        {"kind": "sklearn.linear_model.Ridge", "alpha": r.alpha, "coef": r.coef, "intercept": r.intercept}
    )
    return files


def load(read: Callable[[str], bytes]) -> TrainOutput:
    """Rebuild the stage output from the run directory."""
    trained, public_only = {}, {}
    for name in models.MODELS:
        meta = read_json(read(f"models/{name}.json"))
        trained[name] = TrainedModel(
            spec=meta["spec"], state_dict=read_state_dict(read(f"models/{name}.safetensors")), training=meta["training"]
        )
        weights = (meta["training"].get("public_pretraining") or {}).get("weights")
        if weights:
            public_only[name] = read_state_dict(read(weights))
    r = read_json(read("models/ridge.json"))
    return TrainOutput(
        models=trained,
        ridge=RidgeBaseline(coef=np.asarray(r["coef"]), intercept=float(r["intercept"]), alpha=float(r["alpha"])),
        public_only=public_only,
    )
