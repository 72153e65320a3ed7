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

import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from auditml_core import models, seeds, training
from auditml_core.config import Config, DPConfig, FitConfig
from auditml_core.data import Dataset
from auditml_core.privacy import canaries as canary_audit
from auditml_core.privacy import mia
from auditml_core.teacher import TrainedModel, fit_config, public_pretrain
from pipeline import stage_workers

T = TypeVar("T")


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
    return _fit_like(recipe, _start_like(recipe, seed, canaries), x, y, seed=seed, desc=desc, noise_factor=noise_factor)


def _start_like(
    recipe: Recipe, seed: int, canaries: canary_audit.GradientCanaries | None
) -> tuple[nn.Module, nn.Module, canary_audit.GradientCanaries | None]:
    """The model, the module to train (with the canaries' side layer, if any) and the canaries.

    Built here, one after the other: construction draws from torch's global generator, the training does not.
    """
    model = recipe.start(seed)
    return model, (canaries.wrap(model) if canaries is not None else model), canaries


def _fit_like(
    recipe: Recipe,
    start: tuple[nn.Module, nn.Module, canary_audit.GradientCanaries | None],
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    desc: str,
    noise_factor: float = 1.0,
) -> tuple[nn.Module, dict[str, Any] | None]:
    model, net, canaries = start

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
    starts = [_start_like(recipe, seed_of(i), canaries if i == 0 else None) for i in range(n_shadows)]

    def shadow(i: int) -> tuple[np.ndarray, dict[str, Any] | None]:
        rows = in_mask[i]
        model, record = _fit_like(
            recipe,
            starts[i],
            np.concatenate([x_fill, x_cand[rows]]),
            np.concatenate([y_fill, y_cand[rows]]),
            seed=seed_of(i),
            desc=f"shadow {i}",
        )
        return mia.confidence_logit(training.predict(model, x_cand), y_cand, task=recipe.task), record

    done = run_concurrently(
        [lambda i=i: shadow(i) for i in range(n_shadows)], device=recipe.device, progress=progress, desc=desc
    )
    privacy = next((record for _, record in done if record), None)
    return np.stack([phi for phi, _ in done]), in_mask, privacy


def concurrent_trainings(device: torch.device) -> int:
    """How many independent trainings the audit runs at once: one per CPU this process may keep busy (one torch
    thread each: ``train.num_threads`` is 1 by default; in a stage worker, its share: ``stage_workers.cpus``), on
    the CPU only; one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(1, stage_workers.cpus() // max(1, torch.get_num_threads()))


def run_concurrently(
    jobs: Sequence[Callable[[], T]], *, device: torch.device, progress: bool = False, desc: str = ""
) -> list[T]:
    """Run independent trainings, :func:`concurrent_trainings` at a time, and return their results in order.

    Threads, not processes: torch releases the interpreter lock inside its kernels, so two trainings of the
    audit's CNN overlap on two cores, and each is exactly what it is alone (its own generators, one torch thread;
    the models are built beforehand, as construction draws from torch's global generator). A failure is raised
    once every started job has stopped; the threads are daemons, so an interrupt does not wait for them.
    """
    workers = min(len(jobs), concurrent_trainings(device))
    ticks = iter(training.progress_bar(range(len(jobs)), progress, desc))  # advanced once per finished job
    if workers <= 1:
        return [jobs[i]() for i in ticks]
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    pending = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = None if errors else next(pending, None)
            if i is None:
                return
            try:
                results[i] = jobs[i]()
            except BaseException as exc:  # re-raised below, in the caller's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                next(ticks, None)

    threads = [threading.Thread(target=worker, name=f"audit-training-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in ticks:  # closes the bar
        pass
    if errors:
        raise errors[0]
    return results


def overfit_control(
    cfg: Config,
    name: str,
    recipe: Recipe,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
) -> tuple[nn.Module, FitConfig, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The non-DP positive control and its LiRA shadows: the architecture trained without DP to memorise a few
    attacked records, and ``audit.n_shadows`` copies trained alike on balanced halves of its records.

    ``x, y`` are the attacked records (members first, then as many non-members). Returns the control, its
    settings, its records (k members, k non-members), the shadows' φ on them (S, 2k) and the in-mask (S, 2k).
    The control and its shadows train concurrently (:func:`run_concurrently`); each is built first, in order.
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
    in_mask = mia.shadow_assignment(len(xc), a.n_shadows, seed=seeds.audit_seed(seed, "control_shadow", -1))
    # (seed, rows, settings, description) of the control, then of each of its shadows
    plans = [(seeds.audit_seed(seed, "control"), members, control_fit, f"{name} positive control")]
    for i in range(a.n_shadows):
        rows = in_mask[i]
        fit_i = replace(control_fit, batch_size=min(control_fit.batch_size, max(int(rows.sum()), 1)))
        plans.append((seeds.audit_seed(seed, "control_shadow", i), rows, fit_i, f"control shadow {i}"))
    built = []
    for s, _, _, _ in plans:
        torch.manual_seed(s)
        built.append(models.build(recipe.spec))

    def fit(j: int) -> nn.Module:
        s, rows, fit_cfg, desc = plans[j]
        training.fit(
            built[j],
            x_train=xc[rows],
            y_train=yc[rows],
            x_val=None,
            y_val=None,
            task=recipe.task,
            fit_cfg=fit_cfg,
            dp=None,
            device=recipe.device,
            seed=s,
            desc=desc,
        )
        return built[j].cpu().eval()

    trained = run_concurrently([lambda j=j: fit(j) for j in range(len(plans))], device=recipe.device)
    phis = [mia.confidence_logit(training.predict(shadow, xc), yc, task=recipe.task) for shadow in trained[1:]]
    return trained[0], control_fit, xc, yc, np.stack(phis), in_mask
