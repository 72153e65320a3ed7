"""Stage ``audit``: membership-inference attacks and a one-run DP audit of every released model, beside a
positive control that the audit must catch.

For each registered model the stage attacks ``n`` training records (members) and ``n`` test records
(non-members, never trained on), ``n = min(audit.n_eval, |train|, |test|)``:

- the loss-threshold attack (Yeom et al. 2018) and
- online LiRA with a fixed variance (Carlini et al. 2022), whose ``audit.n_shadows`` shadow models are
  trained like the audited model (:mod:`pipeline.audit_training`: same architecture, settings, number of
  rows, so the same DP sample rate and σ, epochs and starting weights), each on the training rows that are
  not attacked plus half of the attacked records: the data the attacker is allowed to use.

Their held-out ε lower bound can never exceed what ``n`` records certify (``certifiable_epsilon``; 2.44 for
44 + 44 held-out records): the record says so, and under DP the report says plainly when that is below the
claimed ε. A DP model (central DP-SGD) is therefore also audited **in one run** (Steinke, Nasr & Jagielski
2023; :mod:`auditml_core.privacy.canaries`): LiRA shadow 0 carries ``audit.canaries`` Dirac gradient
canaries, each included with probability 1/2, and the number of correct in/out guesses bounds ε from
below with enough trials to refute the claim when it is false.

The positive control must fail the audit:

- under DP, the **noise mutant**: the audited model's recipe trained on its own training split with its
  noise scaled by ``audit.mutant_noise`` (σ/10 by default) while its accountant records the claimed ε,
  carrying canaries of its own; the audit must say FAILED for it, or the report says the audit has no teeth;
- without DP (no claim to refute), the same architecture trained without DP for ``audit.control_epochs``
  on ``audit.control_rows`` attacked records: the attacks must separate its members.

The statistics (AUC with a bootstrap interval, TPR at FPR 1% and 0.1% with Clopper–Pearson intervals,
the (ε, δ)-DP bound, an empirical ε lower bound on held-out threshold selection) come from
:mod:`auditml_core.privacy.mia`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import models, placement, seeds, training
from auditml_core.artifacts import json_bytes, npz_bytes, read_json, read_npz
from auditml_core.config import Config
from auditml_core.data import Dataset
from auditml_core.privacy import canaries as canary_audit
from auditml_core.privacy import mia
from auditml_core.teacher import TrainedModel, fit_config, planned_builders
from pipeline import audit_training
from pipeline.audit_training import Recipe

log = logging.getLogger(__name__)
FPRS = (0.01, 0.001)  # false-positive rates at which TPR is reported
LIRA_VARIANT = "online LiRA, fixed (global) variance (Carlini et al. 2022)"


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


def _candidates(ds: Dataset, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The attacked records (n training rows, then n test rows) and the training rows not attacked."""
    rng = np.random.default_rng(seeds.audit_seed(seed, "members"))
    mem = np.sort(rng.choice(len(ds.y["train"]), n, replace=False))
    non = np.sort(rng.choice(len(ds.y["test"]), n, replace=False))
    x = np.concatenate([ds.x["train"][mem], ds.x["test"][non]])
    y = np.concatenate([ds.y["train"][mem], ds.y["test"][non]])
    rest = np.setdiff1d(np.arange(len(ds.y["train"])), mem)
    return x, y, ds.x["train"][rest], ds.y["train"][rest]


def _canaries(cfg: Config, recipe: Recipe, tm: TrainedModel, *, seed: int) -> canary_audit.GradientCanaries | None:
    """Gradient canaries for a model trained with central DP-SGD (None otherwise, or with audit.canaries = 0)."""
    if recipe.dp is None or cfg.audit.canaries == 0 or tm.training.get("mode", "central") != "central":
        return None
    return canary_audit.GradientCanaries(cfg.audit.canaries, seed=seed)


def _canary_record(
    can: canary_audit.GradientCanaries | None, *, delta: float, trained: str, why_not: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if can is None:
        return {"ran": False, "why": why_not}, {}
    scores = can.scores()
    record = {
        "ran": True,
        **canary_audit.one_run_audit(scores, can.included, delta=delta),
        "trained": trained,
        "kind": "Dirac gradient canaries (white-box): clipped gradient ±C on one coordinate of a zero-output "
        "side layer, joining each DP-SGD step with the plan's sample rate",
        "steps": can.steps,
        "insertions": can.insertions,
    }
    return record, {"scores": scores, "included": can.included}


def audit_model(
    cfg: Config,
    name: str,
    ds: Dataset,
    tm: TrainedModel,
    *,
    seed: int,
    device: torch.device | None = None,
    progress: bool = False,
    public_only: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Attack one released model and its positive control; returns the record and the raw scores.

    ``device`` is where the shadows and the controls train (the stage's :class:`auditml_core.placement.Placement`);
    ``progress`` shows a bar over the shadow models; ``public_only`` is the train stage's record of the model's
    weights after public pretraining (the shadows start from them instead of pretraining again).
    """
    device = device or torch.device("cpu")
    a = cfg.audit
    t0 = time.perf_counter()
    n = min(a.n_eval, len(ds.y["train"]), len(ds.y["test"]))
    x, y, x_fill, y_fill = _candidates(ds, n, seed=seed)
    members = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    recipe = audit_training.recipe_of(cfg, name, ds, tm, public_only=public_only, device=device)
    epsilon = _claimed_epsilon(recipe, tm)
    can = _canaries(cfg, recipe, tm, seed=seeds.audit_seed(seed, "canaries", 0))
    shadow_phi, in_mask, shadow_privacy = audit_training.train_shadows(
        recipe,
        x_fill=x_fill,
        y_fill=y_fill,
        x_cand=x,
        y_cand=y,
        n_shadows=a.n_shadows,
        seed_of=lambda i: seeds.audit_seed(seed, "shadow", i),
        assignment_seed=seeds.audit_seed(seed, "shadow", -1),
        canaries=can,
        progress=progress,
        desc=f"{name} LiRA shadows",
    )
    attack = dict(
        x=x, y=y, task=ds.task, shadow_phi=shadow_phi, in_mask=in_mask, delta=cfg.dp.delta, n_resamples=a.bootstrap
    )
    stats_seed = seeds.audit_seed(seed, "statistics")
    target, target_scores = _attacks(released=tm.build(), members=members, epsilon=epsilon, seed=stats_seed, **attack)
    canaries, canary_scores = _canary_record(
        can,
        delta=cfg.dp.delta,
        trained="LiRA shadow 0 (trained like the audited model)",
        why_not=_why_no_canaries(cfg, recipe, tm),
    )
    control, control_scores = _positive_control(
        cfg, name, recipe, ds, tm, epsilon=epsilon, members=members, attack=attack, seed=seed
    )
    record = _model_record(
        cfg,
        name,
        ds,
        n=n,
        dp=recipe.dp is not None,
        epsilon=epsilon,
        shadows=_shadow_record(cfg, recipe, tm, shadow_privacy, rows=len(y_fill) + n),
        attacks=target,
        canaries=canaries,
        control=control,
        seconds=time.perf_counter() - t0,
    )
    return {"record": record, "scores": _score_arrays(members, target_scores, canary_scores, control_scores)}


def _claimed_epsilon(recipe: Recipe, tm: TrainedModel) -> float | None:
    """The ε the model's training record claims, when it was trained with DP (None otherwise)."""
    privacy = tm.training.get("privacy") or None
    return privacy.get("epsilon") if recipe.dp is not None and privacy else None


def _positive_control(
    cfg: Config,
    name: str,
    recipe: Recipe,
    ds: Dataset,
    tm: TrainedModel,
    *,
    epsilon: float | None,
    members: np.ndarray,
    attack: Mapping[str, Any],
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The control the audit must fail: the noise mutant for central DP-SGD, else the overfit copy."""
    if recipe.dp is not None and tm.training.get("mode", "central") == "central":
        return _mutant(cfg, recipe, ds, epsilon=epsilon, members=members, attack=attack, seed=seed)
    return _overfit(cfg, name, recipe, x=attack["x"], y=attack["y"], seed=seed)


def _model_record(
    cfg: Config,
    name: str,
    ds: Dataset,
    *,
    n: int,
    dp: bool,
    epsilon: float | None,
    shadows: dict[str, Any],
    attacks: dict[str, Any],
    canaries: dict[str, Any],
    control: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """One model's audit record (``audit/membership_inference.json``): who was attacked, the claim, every result."""
    return {
        "title": models.title(name),
        "task": ds.task,
        "member_split": "train",
        "non_member_split": "test",
        "n_members": n,
        "n_non_members": n,
        "dp": dp,
        "claimed_epsilon": epsilon,
        "delta": cfg.dp.delta,
        "shadows": shadows,
        "attacks": attacks,
        "certifiable_epsilon": {
            "membership_attacks": max(s["empirical_epsilon"]["certifiable_epsilon"] for s in attacks.values()),
            "canaries": canaries.get("certifiable_epsilon"),
        },
        "canaries": canaries,
        "control": control,
        "seconds": seconds,
    }


def _score_arrays(
    members: np.ndarray,
    target_scores: Mapping[str, np.ndarray],
    canary_scores: Mapping[str, np.ndarray],
    control_scores: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The raw scores behind the record (``audit/<model>_scores.npz``): who is a member, then every attack's scores."""
    return {
        "members": members,
        **{f"target_{k}": v for k, v in target_scores.items()},
        **{f"canary_{k}": v for k, v in canary_scores.items()},
        **control_scores,
    }


def _why_no_canaries(cfg: Config, recipe: Recipe, tm: TrainedModel) -> str:
    if recipe.dp is None:
        return "the model was trained without DP: there is no ε claim for the canaries to refute"
    if tm.training.get("mode", "central") != "central":
        return "the model was trained federated; the canary audit covers central DP-SGD only"
    return "audit.canaries = 0"


def _shadow_record(
    cfg: Config, recipe: Recipe, tm: TrainedModel, shadow_privacy: Mapping[str, Any] | None, *, rows: int
) -> dict[str, Any]:
    """How the shadows were trained, beside how the audited model was (the report compares the two)."""
    target_privacy = tm.training.get("privacy") or {}
    keys = ("noise_multiplier", "sample_rate", "max_grad_norm")
    return {
        "n": cfg.audit.n_shadows,
        "variant": LIRA_VARIANT,
        "trained_by": "auditml_core.training.fit",
        "training_data": "the training rows that are not attacked plus half of the attacked records (each attacked "
        "record in exactly half the shadows)",
        "rows": rows,
        "audited_model_rows": recipe.target_rows,
        "batch_size": recipe.fit_cfg.batch_size,
        "epochs": recipe.fit_cfg.epochs,
        "audited_model_epochs": recipe.target_epochs,
        "dp": recipe.dp is not None,
        "dp_settings": {k: shadow_privacy.get(k) for k in keys} if shadow_privacy else None,
        "audited_model_dp_settings": {k: target_privacy.get(k) for k in keys} if target_privacy else None,
        "public_pretraining": bool(tm.training.get("public_pretraining")),
        "starting_weights": recipe.init_source,
        "mode": "central (also when the audited model was trained federated)",
        "audited_model_training": cfg.train.mode,
    }


def _mutant(
    cfg: Config,
    recipe: Recipe,
    ds: Dataset,
    *,
    epsilon: float | None,
    members: np.ndarray,
    attack: Mapping[str, Any],
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The DP positive control: the audited recipe with its noise scaled by ``audit.mutant_noise``, attacked alike."""
    a = cfg.audit
    can = canary_audit.GradientCanaries(a.canaries, seed=seeds.audit_seed(seed, "canaries", 1)) if a.canaries else None
    mutant, privacy = audit_training.train_like(
        recipe,
        ds.x["train"],
        ds.y["train"],
        seed=seeds.audit_seed(seed, "mutant"),
        desc="noise mutant",
        canaries=can,
        noise_factor=a.mutant_noise,
    )
    summary, scores = _attacks(
        released=mutant, members=members, epsilon=epsilon, seed=seeds.audit_seed(seed, "statistics", 1), **attack
    )
    canaries, canary_scores = _canary_record(
        can, delta=cfg.dp.delta, trained="the noise mutant", why_not="audit.canaries = 0"
    )
    sigma = (privacy or {}).get("noise_multiplier")
    x, y = attack["x"], attack["y"]
    record = {
        "kind": "noise mutant",
        "description": f"the audited model's recipe trained on its whole training split with its DP noise multiplied "
        f"by {a.mutant_noise:g} (σ = {sigma:.4g} recorded, σ·{a.mutant_noise:g} added) while its accountant records "
        f"ε = {(privacy or {}).get('epsilon', float('nan')):.4g}: a privacy violation the audit must report as FAILED",
        "noise_factor": a.mutant_noise,
        "claimed_epsilon": epsilon,
        "recorded_epsilon": (privacy or {}).get("epsilon"),
        "n_members": int(members.sum()),
        "n_non_members": int((~members).sum()),
        "train_loss": training.evaluate(mutant, x[members], y[members], task=recipe.task)["loss"],
        "test_loss": training.evaluate(mutant, x[~members], y[~members], task=recipe.task)["loss"],
        "attacks": summary,
        "canaries": canaries,
    }
    arrays = {f"control_{k}": v for k, v in scores.items()} | {
        f"control_canary_{k}": v for k, v in canary_scores.items()
    }
    return record, {"control_members": members, **arrays}


def _overfit(
    cfg: Config, name: str, recipe: Recipe, *, x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The non-DP positive control: a deliberately overfit copy of the architecture, attacked the same way."""
    a = cfg.audit
    control, control_fit, xc, yc, shadow_phi, in_mask = audit_training.overfit_control(
        cfg, name, recipe, x, y, seed=seed
    )
    k = len(yc) // 2
    members = np.r_[np.ones(k, dtype=bool), np.zeros(k, dtype=bool)]
    summary, scores = _attacks(
        released=control,
        x=xc,
        y=yc,
        members=members,
        task=recipe.task,
        shadow_phi=shadow_phi,
        in_mask=in_mask,
        epsilon=None,
        delta=cfg.dp.delta,
        seed=seeds.audit_seed(seed, "statistics", 1),
        n_resamples=a.bootstrap,
    )
    record = {
        "kind": "overfit",
        "description": f"the same architecture trained without DP for {a.control_epochs} epochs on {k} training "
        "records (no weight decay, no augmentation): built to memorise, so the attacks must separate its members",
        "n_members": k,
        "n_non_members": k,
        "fit": control_fit.__dict__,
        "train_loss": training.evaluate(control, xc[members], yc[members], task=recipe.task)["loss"],
        "test_loss": training.evaluate(control, xc[~members], yc[~members], task=recipe.task)["loss"],
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
    """Where the audit trains its shadows and controls: each model's batch, shadow epochs and control runs.

    Under DP the shadows and the noise mutant train on as many rows as the audited model; without DP the
    shadows do, and the overfit control and its shadows train on ``audit.control_rows``.
    """
    a = cfg.audit
    work = []
    for name, entry in models.MODELS.items():
        fit_cfg, n = fit_config(cfg, name), len(datasets[entry.dataset].y["train"])
        epochs = a.shadow_epochs or fit_cfg.epochs
        controls = n * epochs if cfg.dp.enabled else a.control_rows * a.control_epochs * (a.n_shadows + 1)
        work.append(
            (
                builders[name],
                tuple(datasets[entry.dataset].x["train"].shape[1:]),
                min(fit_cfg.batch_size, n),
                n * epochs * a.n_shadows + controls,
            )
        )
    return placement.stage_placement("audit", requested=cfg.train.device, work=work, cuda_available=cuda_available)


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Audit every registered model (or record that the audit is off).

    Returns
    -------
    ``{"enabled": bool, "models": {name: record}, "scores": {name: {array name: array}}, "fprs": [...]}``
    """
    return combine(cfg, {name: run_part(cfg, inputs, name, seed=seed, runtime=runtime) for name in parts(cfg)})


def parts(cfg: Config) -> tuple[str, ...]:
    """The stage's independent parts, one per model (none with the audit off): the runner may run them apart."""
    return tuple(models.MODELS) if cfg.audit.enabled else ()


def run_part(cfg: Config, inputs: Mapping[str, Any], name: str, *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Audit model ``name`` (one of :func:`parts`): ``{"record": ..., "scores": ...}``."""
    datasets, trained = inputs["data"], inputs["train"]
    where = device_placement(cfg, datasets, planned_builders(cfg, datasets))
    if runtime is not None:
        runtime.record_placement(where)
    result = audit_model(
        cfg,
        name,
        datasets[models.MODELS[name].dataset],
        trained.models[name],
        seed=seeds.derive_seed(seed, name),
        device=where.torch_device,
        progress=bool(runtime is not None and runtime.progress),
        public_only=getattr(trained, "public_only", {}).get(name),
    )
    rec = result["record"]
    log.info(
        "audit %s: loss AUC %.3f, LiRA AUC %.3f; control (%s) %.3f / %.3f; canary ε >= %s, control's %s",
        name,
        rec["attacks"]["loss"]["auc"],
        rec["attacks"]["lira"]["auc"],
        rec["control"]["kind"],
        rec["control"]["attacks"]["loss"]["auc"],
        rec["control"]["attacks"]["lira"]["auc"],
        rec["canaries"].get("epsilon_lower_bound", "-"),
        rec["control"].get("canaries", {}).get("epsilon_lower_bound", "-"),
    )
    return {"record": rec, "scores": result["scores"]}


def combine(cfg: Config, done: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The stage output from every part, in :func:`parts` order (the audit off: none, and it says so)."""
    names = parts(cfg)
    return {
        "enabled": cfg.audit.enabled,
        "models": {name: done[name]["record"] for name in names},
        "scores": {name: done[name]["scores"] for name in names},
        "fprs": list(FPRS),
    }


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
