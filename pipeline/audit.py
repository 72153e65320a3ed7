"""Stage ``audit``: membership-inference attacks against every released model, beside a positive control.

For each registered model the stage attacks ``n`` training records (members) and ``n`` test records
(non-members, never trained on), ``n = min(audit.n_eval, |train|, |test|)``:

- the loss-threshold attack (Yeom et al. 2018) and
- online LiRA with a fixed variance (Carlini et al. 2022), whose ``audit.n_shadows`` shadow models are
  trained by :func:`auditml_core.training.fit` with the audited model's own settings (architecture, ``fit`` or
  ``dp_fit``, DP and public pretraining when the run used them) on halves of the attacked records:
  the data the attacker is allowed to use.

The same attacks then run against a **positive control**: the same architecture trained without DP for
``audit.control_epochs`` on ``audit.control_rows`` training records (non-members: as many test rows).
An attack that cannot separate the control's members is toothless, and the report says so.

The statistics (AUC with a bootstrap interval, TPR at FPR 1% and 0.1% with Clopper–Pearson intervals,
the (ε, δ)-DP bound, an empirical ε lower bound on held-out threshold selection) come from
:mod:`auditml_core.privacy.mia`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import models, placement, seeds, training
from auditml_core.artifacts import json_bytes, npz_bytes, read_json, read_npz
from auditml_core.config import Config, FitConfig
from auditml_core.data import Dataset
from auditml_core.privacy import mia
from auditml_core.teacher import TrainedModel, fit_config, public_pretrain

log = logging.getLogger(__name__)
FPRS = (0.01, 0.001)  # false-positive rates at which TPR is reported
LIRA_VARIANT = "online LiRA, fixed (global) variance (Carlini et al. 2022)"


def _train_shadows(
    *,
    spec: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    task: str,
    fit_cfg: FitConfig,
    train_dp: Any,
    pretrain: Callable[[torch.nn.Module, int], Any] | None,
    n_shadows: int,
    seed_of: Callable[[int], int],
    assignment_seed: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "LiRA shadows",
) -> tuple[np.ndarray, np.ndarray]:
    """Train the shadows on balanced halves of (x, y); return their φ on every record and the in-mask."""
    in_mask = mia.shadow_assignment(len(x), n_shadows, seed=assignment_seed)  # (S, N)
    phis = []
    for i in training.progress_bar(range(n_shadows), progress, desc):
        s = seed_of(i)
        torch.manual_seed(s)
        shadow = models.build(spec)
        if pretrain is not None:
            pretrain(shadow, s)
        rows = in_mask[i]
        cfg_i = replace(fit_cfg, batch_size=min(fit_cfg.batch_size, int(rows.sum())))
        training.fit(
            shadow,
            x_train=x[rows],
            y_train=y[rows],
            x_val=None,
            y_val=None,
            task=task,
            fit_cfg=cfg_i,
            dp=train_dp,
            device=device,
            seed=s,
            desc=f"shadow {i}",
        )
        phis.append(mia.confidence_logit(training.predict(shadow.eval(), x, device=device), y, task=task))
    return np.stack(phis), in_mask


def _attacks(
    *,
    released: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    members: np.ndarray,
    task: str,
    shadow_phi: np.ndarray,
    in_mask: np.ndarray,
    epsilon: float | None,
    delta: float,
    seed: int,
    n_resamples: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    out = training.predict(released.eval(), x)
    scores = {
        "loss": mia.loss_scores(out, y, task=task),
        "lira": mia.lira_scores(mia.confidence_logit(out, y, task=task), shadow_phi, in_mask),
    }
    summary = {
        name: mia.attack_summary(
            s, members, delta=delta, seed=seed, epsilon=epsilon, fprs=FPRS, n_resamples=n_resamples
        )
        for name, s in scores.items()
    }
    return summary, scores


def audit_model(
    cfg: Config,
    name: str,
    ds: Dataset,
    tm: TrainedModel,
    *,
    seed: int,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Attack one released model and its positive control; returns the record and the raw scores.

    ``device`` is where the shadows and the control train (the stage's :class:`auditml_core.placement.Placement`);
    ``progress`` shows a bar over the shadow models.
    """
    device = device or torch.device("cpu")
    a = cfg.audit
    t0 = time.perf_counter()
    task = ds.task
    n = min(a.n_eval, len(ds.y["train"]), len(ds.y["test"]))
    rng = np.random.default_rng(seeds.audit_seed(seed, "members"))
    mem = np.sort(rng.choice(len(ds.y["train"]), n, replace=False))
    non = np.sort(rng.choice(len(ds.y["test"]), n, replace=False))
    x = np.concatenate([ds.x["train"][mem], ds.x["test"][non]])
    y = np.concatenate([ds.y["train"][mem], ds.y["test"][non]])
    members = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    privacy = tm.training.get("privacy") or None
    epsilon = privacy.get("epsilon") if privacy else None
    delta = cfg.dp.delta
    dp_on = cfg.dp.enabled and privacy is not None
    fit_cfg = fit_config(cfg, name)
    trained_epochs = int(tm.training.get("best_epoch") or tm.training.get("epochs_run") or fit_cfg.epochs)
    shadow_fit = replace(fit_cfg, epochs=a.shadow_epochs or (fit_cfg.epochs if dp_on else trained_epochs))
    pretrain = None
    if dp_on and tm.training.get("public_pretraining"):

        def pretrain(model: torch.nn.Module, s: int) -> None:
            public_pretrain(cfg, name, model, ds, device=device, seed=seeds.pretrain_seed(s))

    shadow_phi, in_mask = _train_shadows(
        spec=tm.spec,
        x=x,
        y=y,
        task=task,
        fit_cfg=shadow_fit,
        train_dp=cfg.dp if dp_on else None,
        pretrain=pretrain,
        n_shadows=a.n_shadows,
        seed_of=lambda i: seeds.audit_seed(seed, "shadow", i),
        assignment_seed=seeds.audit_seed(seed, "shadow", -1),
        device=device,
        progress=progress,
        desc=f"{name} LiRA shadows",
    )
    stats_seed = seeds.audit_seed(seed, "statistics")
    target, target_scores = _attacks(
        released=tm.build(),
        x=x,
        y=y,
        members=members,
        task=task,
        shadow_phi=shadow_phi,
        in_mask=in_mask,
        epsilon=epsilon if dp_on else None,
        delta=delta,
        seed=stats_seed,
        n_resamples=a.bootstrap,
    )
    control, control_scores = _control(cfg, name, ds, tm, x=x, y=y, n=n, seed=seed, device=device)
    record = {
        "title": models.title(name),
        "task": task,
        "member_split": "train",
        "non_member_split": "test",
        "n_members": n,
        "n_non_members": n,
        "dp": dp_on,
        "claimed_epsilon": epsilon if dp_on else None,
        "delta": delta,
        "shadows": {
            "n": a.n_shadows,
            "variant": LIRA_VARIANT,
            "trained_by": "auditml_core.training.fit",
            "training_data": "balanced halves of the attacked records (each record in exactly half the shadows)",
            "epochs": shadow_fit.epochs,
            "dp": dp_on,
            "public_pretraining": pretrain is not None,
            "mode": "central (also when the audited model was trained federated)",
            "audited_model_training": cfg.train.mode,
        },
        "attacks": target,
        "control": control,
        "seconds": time.perf_counter() - t0,
    }
    scores = {"members": members, **{f"target_{k}": v for k, v in target_scores.items()}, **control_scores}
    return {"record": record, "scores": scores}


def _control(
    cfg: Config,
    name: str,
    ds: Dataset,
    tm: TrainedModel,
    *,
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A deliberately overfit copy of the architecture, attacked the same way (the attack's positive control)."""
    a = cfg.audit
    k = min(a.control_rows, n)
    rng = np.random.default_rng(seeds.audit_seed(seed, "control"))
    mem = rng.choice(n, k, replace=False)  # among the attacked members
    non = n + rng.choice(n, k, replace=False)  # among the attacked non-members
    xc, yc = np.concatenate([x[mem], x[non]]), np.concatenate([y[mem], y[non]])
    members = np.r_[np.ones(k, dtype=bool), np.zeros(k, dtype=bool)]
    base = getattr(cfg, name).fit
    control_fit = replace(
        base, epochs=a.control_epochs, batch_size=min(base.batch_size, k), weight_decay=0.0, augment_shift=0
    )
    control_seed = seeds.audit_seed(seed, "control")
    torch.manual_seed(control_seed)
    control = models.build(tm.spec)
    training.fit(
        control,
        x_train=xc[members],
        y_train=yc[members],
        x_val=None,
        y_val=None,
        task=ds.task,
        fit_cfg=control_fit,
        dp=None,
        device=device,
        seed=control_seed,
        desc=f"{name} positive control",
    )
    control.cpu()  # attacked below on the CPU, like the released model
    shadow_phi, in_mask = _train_shadows(
        spec=tm.spec,
        x=xc,
        y=yc,
        task=ds.task,
        fit_cfg=replace(control_fit, batch_size=min(control_fit.batch_size, max(k // 2, 1))),
        train_dp=None,
        pretrain=None,
        n_shadows=a.n_shadows,
        seed_of=lambda i: seeds.audit_seed(seed, "control_shadow", i),
        assignment_seed=seeds.audit_seed(seed, "control_shadow", -1),
        device=device,
    )
    summary, scores = _attacks(
        released=control,
        x=xc,
        y=yc,
        members=members,
        task=ds.task,
        shadow_phi=shadow_phi,
        in_mask=in_mask,
        epsilon=None,
        delta=cfg.dp.delta,
        seed=seeds.audit_seed(seed, "statistics", 1),
        n_resamples=a.bootstrap,
    )
    train_metric = training.evaluate(control, xc[members], yc[members], task=ds.task)
    test_metric = training.evaluate(control, xc[~members], yc[~members], task=ds.task)
    record = {
        "description": f"the same architecture trained without DP for {a.control_epochs} epochs on {k} training "
        "records (no weight decay, no augmentation): built to memorise, so the attacks must separate its members",
        "n_members": k,
        "n_non_members": k,
        "fit": control_fit.__dict__,
        "train_loss": train_metric["loss"],
        "test_loss": test_metric["loss"],
        "attacks": summary,
    }
    return record, {"control_members": members, **{f"control_{k_}": v for k_, v in scores.items()}}


def device_placement(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    builders: Mapping[str, Callable[[], nn.Module]],
    *,
    cuda_available: bool | None = None,
) -> placement.Placement:
    """Where the audit trains its shadows and control: each model's batch, shadow epochs and control runs."""
    a = cfg.audit
    work = []
    for name, entry in models.MODELS.items():
        fit_cfg, n = fit_config(cfg, name), min(a.n_eval, len(datasets[entry.dataset].y["train"]))
        epochs = a.shadow_epochs or fit_cfg.epochs
        work.append(
            (
                builders[name],
                tuple(datasets[entry.dataset].x["train"].shape[1:]),
                min(fit_cfg.batch_size, n),
                n * epochs * (a.n_shadows + 1) + a.control_rows * a.control_epochs * (a.n_shadows + 1),
            )
        )
    return placement.stage_placement("audit", requested=cfg.train.device, work=work, cuda_available=cuda_available)


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Audit every registered model (or record that the audit is off).

    Returns
    -------
    ``{"enabled": bool, "models": {name: record}, "scores": {name: {array name: array}}, "fprs": [...]}``
    """
    if not cfg.audit.enabled:
        return {"enabled": False, "models": {}, "scores": {}, "fprs": list(FPRS)}
    datasets, trained = inputs["data"], inputs["train"]
    records, scores = {}, {}
    where = device_placement(cfg, datasets, {n: trained.models[n].build for n in models.MODELS})
    if runtime is not None:
        runtime.record_placement(where)
    for name, entry in models.MODELS.items():
        result = audit_model(
            cfg,
            name,
            datasets[entry.dataset],
            trained.models[name],
            seed=seeds.derive_seed(seed, name),
            device=where.torch_device,
            progress=bool(runtime is not None and runtime.progress),
        )
        records[name], scores[name] = result["record"], result["scores"]
        log.info(
            "audit %s: loss AUC %.3f, LiRA AUC %.3f; control %.3f / %.3f",
            name,
            result["record"]["attacks"]["loss"]["auc"],
            result["record"]["attacks"]["lira"]["auc"],
            result["record"]["control"]["attacks"]["loss"]["auc"],
            result["record"]["control"]["attacks"]["lira"]["auc"],
        )
    return {"enabled": True, "models": records, "scores": scores, "fprs": list(FPRS)}


def dump(out: Mapping[str, Any]) -> dict[str, bytes]:
    """``audit/membership_inference.json`` (the records) and ``audit/<model>_scores.npz`` (every attack score)."""
    files = {
        "audit/membership_inference.json": json_bytes(
            {"enabled": out["enabled"], "models": out["models"], "fprs": out["fprs"]}
        )
    }
    for name, arrays in out["scores"].items():
        files[f"audit/{name}_scores.npz"] = npz_bytes(dict(arrays))
    return files


def load(read: Callable[[str], bytes]) -> dict[str, Any]:
    """Rebuild the stage output from the run directory."""
    meta = read_json(read("audit/membership_inference.json"))
    scores = {name: read_npz(read(f"audit/{name}_scores.npz")) for name in meta["models"]}
    return {"enabled": meta["enabled"], "models": meta["models"], "scores": scores, "fprs": meta["fprs"]}
