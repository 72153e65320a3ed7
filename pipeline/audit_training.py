"""The models the ``audit`` stage trains: LiRA shadows, the canaried run and the positive controls.

Every model the audit trains *like the audited one* follows one :class:`Recipe` read from the audited
model's record: the same architecture, the same training settings (``fit`` or ``dp_fit``: batch, so
the same DP sample rate q; learning rate; epochs: the planned ones under DP, the epoch early stopping
kept otherwise), the same DP settings (so the same σ for the same number of rows) and the same starting
weights: the public pretraining the train stage recorded (reused, not redone), or the released model's
initial weights, which its recorded seed reproduces. A shadow trains on as many rows as the audited
model: the training rows that are not attacked, plus half of the attacked records.

Nothing here reads or writes files; :mod:`pipeline.audit` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import models, seeds, training
from auditml_core.config import Config, DPConfig, FitConfig
from auditml_core.data import Dataset
from auditml_core.privacy import canaries as canary_audit
from auditml_core.privacy import mia
from auditml_core.teacher import TrainedModel, fit_config, public_pretrain


@dataclass(frozen=True)
class Recipe:
    """How the audited model was trained, for the models the audit trains like it."""

    spec: Mapping[str, Any]  # architecture (auditml_core.models.build)
    task: str
    fit_cfg: FitConfig  # its training settings, epochs = what the audited model trained
    dp: DPConfig | None  # its DP settings, or None
    init_state: Mapping[str, torch.Tensor] | None  # its weights before it read a private row (None: fresh seeded init)
    init_source: str  # where init_state comes from, in words
    device: torch.device
    target_epochs: int  # epochs the audited model trained (fit_cfg.epochs differs only with audit.shadow_epochs)
    target_rows: int  # rows the audited model trained on

    def start(self, seed: int) -> nn.Module:
        """A fresh model with the audited model's starting weights (or a fresh init seeded by ``seed``)."""
        torch.manual_seed(seed)
        model = models.build(self.spec)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        return model


def recipe_of(
    cfg: Config,
    name: str,
    ds: Dataset,
    tm: TrainedModel,
    *,
    public_only: Mapping[str, torch.Tensor] | None,
    device: torch.device,
) -> Recipe:
    """The recipe of model ``name``: its settings and starting weights (``public_only``: the train stage's
    weights after public pretraining, when it recorded them)."""
    dp_on = cfg.dp.enabled and bool(tm.training.get("privacy"))
    fit_cfg = fit_config(cfg, name)
    kept = int(tm.training.get("best_epoch") or tm.training.get("epochs_run") or fit_cfg.epochs)
    target_epochs = fit_cfg.epochs if dp_on else kept
    epochs = cfg.audit.shadow_epochs or target_epochs
    central = tm.training.get("mode", "central") == "central" and tm.training.get("seed") is not None
    init_state, source = None, "a fresh initialisation per model (the audited model was trained federated)"
    if tm.training.get("public_pretraining"):
        if public_only:
            init_state = public_only
            source = "the audited model's weights after public pretraining, as the train stage recorded them"
        else:  # not recorded (an older run): redo it exactly as the train stage did, from the recorded seed
            seed = int(tm.training.get("seed") or 0)
            torch.manual_seed(seed)
            model = models.build(tm.spec)
            public_pretrain(cfg, name, model, ds, device=device, seed=seeds.pretrain_seed(seed))
            init_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            source = "public pretraining redone from the audited model's recorded seed (its weights were not recorded)"
    elif central:
        torch.manual_seed(int(tm.training["seed"]))
        init_state = models.build(tm.spec).state_dict()
        source = "the audited model's initial weights (reproduced from its recorded seed)"
    return Recipe(
        spec=tm.spec,
        task=ds.task,
        fit_cfg=replace(fit_cfg, epochs=epochs),
        dp=cfg.dp if dp_on else None,
        init_state=init_state,
        init_source=source,
        device=device,
        target_epochs=target_epochs,
        target_rows=int(tm.training.get("n_train") or len(ds.y["train"])),
    )


def train_like(
    recipe: Recipe,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    desc: str,
    canaries: canary_audit.GradientCanaries | None = None,
    noise_factor: float = 1.0,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Train one model by ``recipe`` on (x, y); with ``canaries`` (DP only) it carries them, and
    ``noise_factor`` != 1 makes it the noise mutant. Returns the plain model (CPU, eval) and its DP record."""
    model = recipe.start(seed)
    net = canaries.wrap(model) if canaries is not None else model

    def on_private(private: Any) -> None:
        if noise_factor != 1.0:
            canary_audit.scale_noise(private, noise_factor)
        if canaries is not None:  # last: it reads the noisy gradient the optimizer gets
            canaries.install(private)

    result = training.fit(
        net,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task=recipe.task,
        fit_cfg=recipe.fit_cfg,
        dp=recipe.dp,
        device=recipe.device,
        seed=seed,
        desc=desc,
        on_private=on_private if (canaries is not None or noise_factor != 1.0) else None,
    )
    net.cpu()
    return model.eval(), result.privacy


def train_shadows(
    recipe: Recipe,
    *,
    x_fill: np.ndarray,
    y_fill: np.ndarray,
    x_cand: np.ndarray,
    y_cand: np.ndarray,
    n_shadows: int,
    seed_of: Callable[[int], int],
    assignment_seed: int,
    canaries: canary_audit.GradientCanaries | None = None,
    progress: bool = False,
    desc: str = "LiRA shadows",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """Train the shadows, each on the fill rows plus its half of the candidates (``canaries`` ride in shadow 0).

    Returns every shadow's φ on the candidates (S, N), the in-mask (S, N) and shadow 0's DP record.
    """
    in_mask = mia.shadow_assignment(len(x_cand), n_shadows, seed=assignment_seed)  # (S, N)
    phis, privacy = [], None
    for i in training.progress_bar(range(n_shadows), progress, desc):
        rows = in_mask[i]
        shadow, record = train_like(
            recipe,
            np.concatenate([x_fill, x_cand[rows]]),
            np.concatenate([y_fill, y_cand[rows]]),
            seed=seed_of(i),
            desc=f"shadow {i}",
            canaries=canaries if i == 0 else None,
        )
        privacy = privacy or record
        phis.append(mia.confidence_logit(training.predict(shadow, x_cand), y_cand, task=recipe.task))
    return np.stack(phis), in_mask, privacy


def overfit_control(
    cfg: Config,
    name: str,
    recipe: Recipe,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
) -> tuple[nn.Module, FitConfig, np.ndarray, np.ndarray]:
    """The non-DP positive control: the architecture trained without DP to memorise a few attacked records.

    ``x, y`` are the attacked records (members first, then as many non-members). Returns the control,
    its settings, its records and their membership (k members, k non-members).
    """
    a, n = cfg.audit, len(x) // 2
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
    control = models.build(recipe.spec)
    training.fit(
        control,
        x_train=xc[members],
        y_train=yc[members],
        x_val=None,
        y_val=None,
        task=recipe.task,
        fit_cfg=control_fit,
        dp=None,
        device=recipe.device,
        seed=control_seed,
        desc=f"{name} positive control",
    )
    return control.cpu().eval(), control_fit, xc, yc


def overfit_control_shadows(
    cfg: Config, recipe: Recipe, control_fit: FitConfig, xc: np.ndarray, yc: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """LiRA shadows of the overfit control: its settings, on balanced halves of its records."""
    in_mask = mia.shadow_assignment(len(xc), cfg.audit.n_shadows, seed=seeds.audit_seed(seed, "control_shadow", -1))
    phis = []
    for i in range(cfg.audit.n_shadows):
        s = seeds.audit_seed(seed, "control_shadow", i)
        torch.manual_seed(s)
        shadow = models.build(recipe.spec)
        rows = in_mask[i]
        training.fit(
            shadow,
            x_train=xc[rows],
            y_train=yc[rows],
            x_val=None,
            y_val=None,
            task=recipe.task,
            fit_cfg=replace(control_fit, batch_size=min(control_fit.batch_size, max(int(rows.sum()), 1))),
            dp=None,
            device=recipe.device,
            seed=s,
            desc=f"control shadow {i}",
        )
        phis.append(mia.confidence_logit(training.predict(shadow.cpu().eval(), xc), yc, task=recipe.task))
    return np.stack(phis), in_mask
