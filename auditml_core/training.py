"""The one training core: :func:`fit`, in parts (resume, DP setup, epoch loop, early stopping, checkpoints).

Central training, the Flower ClientApp, distillation and public pretraining all call
:func:`fit`; nothing here imports Flower. Differential privacy enters only through
:mod:`auditml_core.privacy.dp_sgd`. The per-epoch primitives live in :mod:`auditml_core.epoch` and are
re-exported here (``training.predict``, ``training.evaluate``, ...).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import seeds
from auditml_core.config import DPConfig, FitConfig
from auditml_core.distributed import GradientShare, World, share, sum_over_ranks
from auditml_core.epoch import (
    add_proximal_term,
    draw_shifts,
    evaluate,
    loss_fn,
    make_optimizer,
    predict,
    progress_bar,
    random_shift,
    resolve_device,
    shift_images,
    shuffled_batches,
    train_one_epoch,
)
from auditml_core.errors import ConfigError, TrainingDivergedError
from auditml_core.privacy import dp_ranks
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy.dp_sgd import History, HistoryLike

__all__ = [  # the training core's public names, the re-exported primitives of auditml_core.epoch included
    "Checkpoint",
    "EarlyStopping",
    "TrainingResult",
    "checkpoint_bytes",
    "draw_shifts",
    "evaluate",
    "fit",
    "loss_fn",
    "make_optimizer",
    "predict",
    "random_shift",
    "read_checkpoint",
    "resolve_device",
    "shift_images",
    "shuffled_batches",
    "train_one_epoch",
]

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """What every training path (central, federated client, resumed) returns."""

    state_dict: dict[str, torch.Tensor]  # unwrapped CPU weights (no "_module." keys)
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, val_loss, val metric, seconds, epsilon
    best_epoch: int
    epochs_run: int
    seconds: float
    n_train: int
    privacy: dict[str, Any] | None = None  # auditml_core.privacy.dp_sgd.privacy_record when trained with DP
    accountant_history: History = field(default_factory=list)
    ema: dict[str, Any] | None = None  # when fit_cfg.ema_decay > 0: the released weights are the EMA (see _EMA)
    # which weights fit returned: "ema", "best epoch" (early stopping restored the lowest validation loss) or
    # "last iterate"; and whether early stopping was on (it is off under DP and with patience 0)
    released_weights: str = "last iterate"
    early_stopping: str = "off"

    def released(self) -> dict[str, Any]:
        """Which epoch's weights ``state_dict`` holds, as a number (``released_epoch``) and in words (``released``).

        The last iterate is the weights after epoch ``epochs_run``; a restored best epoch is ``best_epoch``; the EMA
        averages every step through epoch ``epochs_run`` (no single epoch's weights, so ``released_epoch`` is None).
        """
        n = self.epochs_run
        if self.released_weights == "best epoch":
            return {
                "released_epoch": self.best_epoch,
                "released": f"the weights of epoch {self.best_epoch} of {n}, restored by early stopping (the lowest "
                "validation loss)",
            }
        ema = self.released_weights == "ema"
        if self.early_stopping.startswith("on"):
            why = "the EMA replaces early stopping's choice" if ema else "no validation loss to choose on"
        else:
            why = f"early stopping {self.early_stopping}"
        if ema:
            return {
                "released_epoch": None,
                "released": f"an exponential moving average of the weights over every step through epoch {n} of {n}; "
                f"no best epoch was restored ({why})",
            }
        return {
            "released_epoch": n,
            "released": f"the weights after the last epoch, {n} of {n}; no best epoch was restored ({why})",
        }

    def summary(self) -> dict[str, Any]:
        """JSON-safe view (without the weights)."""
        secs = [h["seconds"] for h in self.history]
        return {
            "history": releasable_history(self.history, private=self.privacy is not None),
            # the epoch early stopping restored; None when none was (DP, patience 0, the EMA): then the released
            # weights are those after the last epoch, and no epoch was chosen on validation data
            "best_epoch": self.best_epoch if self.released_weights == "best epoch" else None,
            "epochs_run": self.epochs_run,
            "seconds": self.seconds,
            "seconds_per_epoch": float(np.mean(secs)) if secs else 0.0,
            "n_train": self.n_train,
            "privacy": self.privacy,
            "released_weights": self.released_weights,
            **self.released(),
            "early_stopping": self.early_stopping,
            **({"ema": self.ema} if self.ema else {}),
        }


@dataclass
class Checkpoint:
    """Training state after an epoch: enough to resume with the same weights, optimizer and ε history.

    It never holds the secret state of DP-SGD's sampling and noise generators (see
    :func:`auditml_core.privacy.dp_sgd.dp_generators`): a DP run resumed from it draws fresh CSPRNG-seeded
    randomness, which DP-SGD's analysis allows (each step's noise need only be independent and
    unknown to the adversary); the accountant history carries over, so ε still counts every step.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    accountant_history: History
    history: list[dict[str, float]]
    generator_state: torch.Tensor  # batch order and augmentation: seeded from the recorded seed, not secret
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_loss: float = float("inf")
    done: bool = False  # training finished (last epoch or early stop): resuming trains no further
    # (sampling, noise) generator states, only under dp.reproducible_noise (derived from the recorded seed anyway);
    # across ranks every rank's pair, in rank order
    dp_generator_states: list[torch.Tensor] | None = None
    ema_state: dict[str, torch.Tensor] | None = None  # the EMA of the iterates so far (fit_cfg.ema_decay > 0)
    ema_steps: int = 0  # optimizer steps averaged into ema_state


def checkpoint_bytes(ck: Checkpoint) -> bytes:
    """Encode a :class:`Checkpoint` (tensors and plain values only)."""
    buf = io.BytesIO()
    torch.save(dataclasses.asdict(ck), buf)
    return buf.getvalue()


def read_checkpoint(data: bytes) -> Checkpoint:
    """Decode :func:`checkpoint_bytes` output; ``weights_only`` refuses anything but tensors and plain values."""
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    state["accountant_history"] = [tuple(h) for h in state["accountant_history"]]
    return Checkpoint(**state)


@dataclass
class EarlyStopping:
    """Keep the weights of the lowest validation loss; stop after ``patience`` epochs without a new low.

    ``patience = 0`` turns it off (and :func:`fit` turns it off under DP).
    """

    patience: int
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_loss: float = float("inf")

    def update(self, epoch: int, row: Mapping[str, float], model: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based) of ``row``; True when training should stop."""
        if self.patience <= 0 or "val_loss" not in row:
            return False
        if row["val_loss"] < self.best_loss:
            self.best_loss, self.best_epoch, self.best_state = row["val_loss"], epoch, privacy.unwrap_state_dict(model)
            return False
        return epoch - self.best_epoch >= self.patience


class _EMA:
    """Exponential moving average of the trainable parameters over the optimizer's steps (De et al. 2022).

    After step ``t`` (1-based): ``ema = d_t * ema + (1 - d_t) * w_t`` with ``d_t = min(decay, (1 + t) / (10 + t))``
    (a warm-up, so that short runs are not dominated by the initial weights), starting from the weights
    training starts with. Under DP it is post-processing of the DP iterates: each ``w_t`` is already
    released-safe, the average reads no data, so the released EMA costs no extra privacy.
    Parameters that do not train (fixed filters) are left as they are.
    """

    def __init__(self, model: nn.Module, decay: float, state: Mapping[str, torch.Tensor] | None = None, steps: int = 0):
        self.decay, self.steps = decay, steps
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.state = {n: (state[n] if state is not None else p).detach().clone() for n, p in self.params.items()}

    def hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: average the new iterate in."""
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for n, p in self.params.items():
                self.state[n].mul_(d).add_(p.detach(), alpha=1 - d)

    def release(self) -> None:
        """Copy the EMA into the model's parameters (the weights :func:`fit` returns)."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.state[n])

    def record(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "steps": self.steps,
            "warmup": "d_t = min(decay, (1 + t) / (10 + t))",
            "privacy": "post-processing of the DP iterates: no extra privacy cost",
        }


@dataclass
class _Progress:
    """Where a (possibly resumed) training call starts: epochs done, history, ε spent, best epoch."""

    epoch: int
    history: list[dict[str, float]]
    spent_history: History
    stopping: EarlyStopping
    done: bool = False


def _start(
    resume: Checkpoint | None,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    privacy_history: HistoryLike,
    patience: int,
) -> _Progress:
    """Fresh progress, or the one ``resume`` holds (restoring weights, optimizer and batch order in place)."""
    if resume is None:
        return _Progress(0, [], list(privacy_history), EarlyStopping(patience))
    model.load_state_dict(resume.model)
    optimizer.load_state_dict(resume.optimizer)
    data_generator.set_state(resume.generator_state)
    stopping = EarlyStopping(patience, resume.best_state, resume.best_epoch, resume.best_loss)
    return _Progress(resume.epoch, list(resume.history), list(resume.accountant_history), stopping, resume.done)


def _starting_point(
    model: nn.Module,
    fit_cfg: FitConfig,
    resume: Checkpoint | None,
    *,
    share_over: World | None,
    mu: float,
    data_generator: torch.Generator,
    privacy_history: HistoryLike,
    patience: int,
) -> tuple[torch.optim.Optimizer, GradientShare | None, _Progress, _EMA | None]:
    """Where :func:`fit` starts: the optimizer with its step hooks (:func:`_optimizer`), the progress so far (fresh,
    or ``resume``'s restored in place) and the iterates' average when ``fit_cfg.ema_decay`` asks for one."""
    optimizer, gradient_share = _optimizer(model, fit_cfg, share_over=share_over, mu=mu)
    state = _start(
        resume,
        model=model,
        optimizer=optimizer,
        data_generator=data_generator,
        privacy_history=privacy_history,
        patience=patience,
    )
    ema = _attach_ema(model, optimizer, fit_cfg.ema_decay, resume) if fit_cfg.ema_decay > 0 else None
    return optimizer, gradient_share, state, ema


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    xt: torch.Tensor,
    yt: torch.Tensor,
    *,
    dp: DPConfig,
    fit_cfg: FitConfig,
    epochs: int,
    total_epochs: int,
    history: History,
    seed: int,
    resume: Checkpoint | None,
    criterion: nn.Module,
    n_records: int | None = None,
    world: World | None = None,
    on_private: Callable[[privacy.PrivateTraining], None] | None = None,
) -> privacy.PrivateTraining:
    """Plan the DP-SGD call (refusing one that overspends) and wrap model, optimizer and data; ``on_private``
    (:func:`fit`'s) sees the wrapping before the first step.

    σ is derived for the whole planned training (``total_epochs``), so a resumed run or a later
    federated round gets the same σ; what was spent before is in ``history`` and counts.
    ``n_records`` is the whole training set (default ``len(xt)``); across ranks (``world``), ``xt``/``yt``
    are this rank's shard (:mod:`auditml_core.privacy.dp_ranks`) and the plan is the single-process plan of
    all records.
    """
    n_records = len(xt) if n_records is None else n_records
    the_plan = privacy.plan(
        dp,
        n_samples=n_records,
        batch_size=fit_cfg.batch_size,
        max_grad_norm=fit_cfg.max_grad_norm,
        epochs=epochs,
        total_epochs=total_epochs,
        history=history,
    )
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    # Each rank samples its own shard: under dp.reproducible_noise its streams derive from its own seed
    # (the same streams on several ranks would sample their shards in lockstep, not independently).
    rank_seed = seed if rank == 0 else seeds.rank_seed(seed, rank)
    sampling, noise = privacy.dp_generators(dp, seed=rank_seed, noise_device=next(model.parameters()).device)
    if dp.reproducible_noise and resume is not None and resume.dp_generator_states is not None:
        states = resume.dp_generator_states
        if len(states) != 2 * size:
            raise ConfigError(
                f"the checkpoint holds the reproducible DP generator states of {len(states) // 2} rank(s), this run has "
                f"{size}: resume with as many ranks as it started with"
            )
        sampling.set_state(states[2 * rank])
        noise.set_state(states[2 * rank + 1])
    private = privacy.make_private(
        model,
        optimizer,
        torch.utils.data.TensorDataset(xt, yt),
        plan=the_plan,
        history=history,
        sampling_generator=sampling,
        noise_generator=noise,
        grad_sample_mode=dp.grad_sample_mode,
        criterion=criterion,
    )
    if world is not None:
        dp_ranks.spread(private.optimizer, world=world, n_records=n_records, sample_rate=the_plan.sample_rate)
    if on_private is not None:
        on_private(private)
    return private


def releasable_history(history: list[dict[str, float]], *, private: bool) -> list[dict[str, float]]:
    """The per-epoch rows that may be written (records, checkpoints): under DP, without ``train_loss``.

    DP-SGD's training loss is the mean loss of the private Poisson batches, computed without noise:
    an exact statistic of the training records that the guarantee does not cover. It stays in memory
    (divergence checks, tests) but reaches no file, so a checkpoint or record of a DP training holds
    no training-split statistic beyond the noised iterates.
    """
    if not private:
        return list(history)
    return [{k: v for k, v in row.items() if k != "train_loss"} for row in history]


def _epoch_row(
    epoch: int,
    train_loss: float,
    seconds: float,
    *,
    model: nn.Module,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    task: str,
    device: torch.device,
) -> dict[str, float]:
    """One history row: training loss, time and (when there is a validation split) its metrics."""
    row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss, "seconds": seconds}
    if x_val is not None and y_val is not None and len(x_val):
        row.update({f"val_{k}": v for k, v in evaluate(model, x_val, y_val, task=task, device=device).items()})
    return row


def fit(
    model: nn.Module,
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    task: str,
    fit_cfg: FitConfig,
    dp: DPConfig | None,
    device: torch.device,
    seed: int,
    patience: int = 0,
    epochs: int | None = None,
    dp_total_epochs: int | None = None,
    privacy_history: HistoryLike = (),
    resume: Checkpoint | None = None,
    on_epoch_end: Callable[[Checkpoint], None] | None = None,
    progress: bool = False,
    desc: str = "train",
    criterion: nn.Module | None = None,
    proximal_mu: float = 0.0,
    world: World | None = None,
    on_private: Callable[[privacy.PrivateTraining], None] | None = None,
) -> TrainingResult:
    """Train ``model`` in place and return its unwrapped weights and history.

    Parameters
    ----------
    model : a plain ``nn.Module`` (never an Opacus wrapper).
    x_train, y_train : training arrays; y is float (regression) or int class indices.
    x_val, y_val : validation arrays for early stopping and the history, or None.
    task : ``"regression"`` or ``"classification"``.
    fit_cfg : optimizer settings; ``fit_cfg.max_grad_norm`` is the DP clipping norm.
    dp : privacy settings, or None / ``dp.enabled=False`` for non-private training.
    device : where to train.
    seed : seeds the batch order and augmentation; under DP, the sampling and noise only with
        ``dp.reproducible_noise`` (by default they are seeded secretly from the OS's CSPRNG).
    patience : early-stopping patience in epochs (0 = off). Ignored under DP: choosing an
        epoch by private validation data is not covered by the accountant, and the noise is
        calibrated to the full planned number of steps anyway.
    epochs : epochs for this call (default ``fit_cfg.epochs``); federated clients pass their local epochs.
    dp_total_epochs : epochs the privacy budget must cover overall (federated: rounds x local epochs).
    privacy_history : accountant history already spent on this data (earlier rounds).
    resume : a checkpoint to continue from; its epoch count and ε history carry over.
    on_epoch_end : called with a :class:`Checkpoint` after each epoch (the runner persists it).
    progress : show a progress bar.
    criterion : loss on ``(model output, y)`` replacing the task's default (distillation passes its KD loss).
    proximal_mu : FedProx weight μ: adds ``μ/2 ||w - w_start||²`` to the loss, ``w_start`` being the
        weights ``model`` arrives with (the global model of a federated round). 0 = off.
    world : train as one rank of a torch.distributed job (:mod:`auditml_core.distributed`): every rank
        calls ``fit`` with the same arguments, model weights and ``resume``; rank 0 alone passes the
        validation split and ``on_epoch_end``. Without DP each global batch of ``fit_cfg.batch_size`` is
        shared between the ranks (the same steps as one process); with DP each rank samples its shard at
        the global rate and the noise is added once (:mod:`auditml_core.privacy.dp_ranks`). None = one process.
    on_private : called once with the DP-SGD wrapping (model, optimizer, plan) before the first step; the
        privacy audit inserts its gradient canaries there (:mod:`auditml_core.privacy.canaries`). DP only.

    Returns
    -------
    TrainingResult

    Raises
    ------
    PrivacyBudgetError
        If DP training would exceed the budget (checked before any step).
    """
    epochs = epochs or fit_cfg.epochs
    private_dp = dp if dp is not None and dp.enabled else None
    world = world if world is not None and world.size > 1 else None
    data_generator = seeds.make_generator("cpu", seed)  # batch order and augmentation (indices drawn on the CPU)
    model.to(device).train()  # Opacus refuses a module in eval mode
    # Without DP, 4-D weights train channels-last (see channels_last); the default layout is back before
    # the weights are read (the state dict, safetensors, are contiguous). Under DP the engines expect the default.
    with channels_last(model, private_dp is None):
        optimizer, gradient_share, state, ema = _starting_point(
            model,
            fit_cfg,
            resume,
            share_over=world if private_dp is None else None,
            mu=proximal_mu,
            data_generator=data_generator,
            privacy_history=privacy_history,
            patience=0 if private_dp is not None else patience,
        )
        remaining = 0 if state.done else epochs - state.epoch
        xt, yt, n_records = _device_tensors(x_train, y_train, device=device, shard=private_dp is not None, world=world)
        private_run = None
        if private_dp is not None and remaining > 0:
            private_run = _make_private(
                model,
                optimizer,
                xt,
                yt,
                n_records=n_records,
                world=world,
                dp=private_dp,
                fit_cfg=fit_cfg,
                epochs=remaining,
                total_epochs=dp_total_epochs or epochs,
                history=state.spent_history,
                seed=seed,
                resume=resume,
                criterion=criterion or loss_fn(task),
                on_private=on_private,
            )
        loop = _Loop(
            model=model,
            optimizer=optimizer,
            private_run=private_run,
            criterion=criterion,
            xt=xt,
            yt=yt,
            task=task,
            fit_cfg=fit_cfg,
            device=device,
            epochs=epochs,
            data_generator=data_generator,
            desc=desc,
            ema=ema,
            world=world,
            gradient_share=gradient_share,
        )
        t_start = time.perf_counter()
        loop.run(state, remaining=remaining, x_val=x_val, y_val=y_val, progress=progress, on_epoch_end=on_epoch_end)
        seconds = time.perf_counter() - t_start
    return _result(loop, state, private_dp, n_train=n_records, seconds=seconds)


@contextlib.contextmanager
def channels_last(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Train ``model`` with its 4-D weights in channels-last layout (``on``), back in the default layout after.

    :func:`fit` trains every CNN this way without DP (teachers, audit shadows and controls, students): the same
    steps, 20-35% less CPU on this project's machines (max-pooling an (N, C, H, W) tensor is slow there; a
    default CNN step 3.28 -> 2.58 ms; a digits shadow of 15 epochs 2.5-3.5 s -> 1.8-2.2 s). Float rounding
    differs, as on another CPU (weights within ~1e-6 after 200 steps). Under DP ``on=False``: the engines'
    per-sample gradient code expects the default layout. A model without 4-D weights is unchanged.
    """
    # nn.Module.to takes memory_format (its stubs do not say so)
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)  # type: ignore[call-overload]
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _optimizer(
    model: nn.Module, fit_cfg: FitConfig, *, share_over: World | None, mu: float
) -> tuple[torch.optim.Optimizer, GradientShare | None]:
    """The optimizer with its step hooks: the gradient share over ranks (non-DP), then FedProx's term (``mu`` > 0)."""
    optimizer = make_optimizer(model, fit_cfg)
    gradient_share = None
    if share_over is not None:
        gradient_share = GradientShare(model, share_over)  # first pre-hook: the others see the global gradient
        optimizer.register_step_pre_hook(gradient_share.hook)
    if mu > 0:
        add_proximal_term(optimizer, model, mu)
    return optimizer, gradient_share


def _attach_ema(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float, resume: Checkpoint | None) -> _EMA:
    """Average the iterates of ``model`` after each step of ``optimizer`` (continuing ``resume``'s average)."""
    # on the plain optimizer, which Opacus' DP optimizer steps once per DP-SGD step (empty batches included)
    ema = _EMA(model, decay, *((resume.ema_state, resume.ema_steps) if resume is not None else ()))
    optimizer.register_step_post_hook(ema.hook)
    return ema


def _device_tensors(
    x_train: np.ndarray, y_train: np.ndarray, *, device: torch.device, shard: bool, world: World | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training arrays on ``device`` and the number of records; DP across ranks: this rank's shard only."""
    xt = torch.as_tensor(x_train).to(device)
    yt = torch.as_tensor(y_train).to(device)
    n_records = len(xt)
    if world is not None and shard:  # each rank samples only its own shard
        mine = dp_ranks.shard(n_records, world).to(device)
        xt, yt = xt[mine], yt[mine]
    return xt, yt, n_records


def check_diverged(model: nn.Module, train_loss: float, *, epoch: int, desc: str) -> None:
    """Stop training whose loss or weights stopped being finite (a too-large learning rate, for one).

    Raises
    ------
    TrainingDivergedError
        Naming the epoch; callers that know the config key add it (``lower cnn.fit.lr``).
    """
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    finite_weights = bool(torch.stack(checks).all()) if checks else True  # one device-to-host read per epoch
    if np.isfinite(train_loss) and finite_weights:
        return
    what = "weights" if np.isfinite(train_loss) else f"train loss ({train_loss})"
    raise TrainingDivergedError(
        f"training diverged at epoch {epoch} ({desc}: {what} not finite); lower the learning rate", epoch=epoch
    )


@dataclass
class _Loop:
    """What stays fixed through the epochs of one :func:`fit` call, and one epoch of it."""

    model: nn.Module  # the plain module (evaluation, checkpoints)
    optimizer: torch.optim.Optimizer  # what steps: given the plain one; under DP, private_run's (__post_init__)
    private_run: privacy.PrivateTraining | None
    xt: torch.Tensor  # training inputs on the device
    yt: torch.Tensor  # training targets on the device
    task: str
    fit_cfg: FitConfig
    device: torch.device
    epochs: int  # epochs of this call (ε is queried ~10 times over them)
    data_generator: torch.Generator  # batch order and augmentation
    criterion: nn.Module | None
    desc: str  # what trains, for messages ("cnn", "distill regressor")
    ema: _EMA | None = None  # parameter averaging of the iterates, when configured
    world: World | None = None  # the ranks training together (None: this process alone)
    gradient_share: GradientShare | None = None  # non-DP across ranks: weights each rank's share of a batch
    rows: int = 0  # rows this process trained on in the current epoch
    run_model: nn.Module = field(init=False)  # what trains: the Opacus wrapper under DP, else ``model``

    def __post_init__(self) -> None:
        self.run_model = self.model
        if self.private_run is not None:  # through the DP wrapping: module, optimizer, loss (ghost clipping wraps it)
            self.run_model = self.private_run.model
            self.optimizer = self.private_run.optimizer
            self.criterion = self.private_run.criterion or self.criterion

    def run(
        self,
        state: _Progress,
        *,
        remaining: int,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        progress: bool,
        on_epoch_end: Callable[[Checkpoint], None] | None,
    ) -> None:
        """Train the ``remaining`` epochs after ``state.epoch``, checkpointing each; stop when early stopping says so."""
        bar = progress_bar(range(state.epoch, state.epoch + remaining), progress, self.desc)
        for epoch in bar:
            row = self.epoch(epoch + 1, state, x_val=x_val, y_val=y_val)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: round(v, 4) for k, v in row.items() if k not in ("epoch", "seconds")})
            stop = state.stopping.update(epoch + 1, row, self.model)
            if self.world is not None:
                stop = bool(self.world.broadcast(stop))  # rank 0 alone validates: its decision holds for every rank
            dp_states = self.dp_generator_states()  # across ranks: a collective, so every rank takes part
            if on_epoch_end is not None:
                done = stop or epoch + 1 == self.epochs
                on_epoch_end(self.checkpoint(epoch + 1, state, done=done, dp_states=dp_states))
            if stop:
                log.info("%s: early stop at epoch %d (best %d)", self.desc, epoch + 1, state.stopping.best_epoch)
                break

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches: Poisson-sampled under DP, else a seeded shuffle; augmented when configured.

        The epoch's indices (and augmentation offsets) are drawn on the CPU up front, in the order
        per-batch draws would take, and copied to the device once: the batches then index the
        device-resident data with no host-to-device copy or wait per step.
        """
        if self.gradient_share is not None and self.world is not None:
            return self._shared_batches(self.gradient_share, self.world)
        if self.private_run is not None:
            index = self.private_run.index_batches(device=self.xt.device)
        else:
            index = list(
                shuffled_batches(len(self.xt), self.fit_cfg.batch_size, self.data_generator, device=self.xt.device)
            )
        shift = self.fit_cfg.augment_shift
        if not shift or self.xt.ndim != 4:  # the per-record augmentation is for image batches only
            return ((self.xt[i], self.yt[i]) for i in index)
        offsets = draw_shifts([len(i) for i in index], shift, self.data_generator, device=self.xt.device)
        return ((shift_images(self.xt[i], dy, dx, shift), self.yt[i]) for i, (dy, dx) in zip(index, offsets))

    def _shared_batches(
        self, gradient_share: GradientShare, world: World
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-DP across ranks: this rank's share of each global batch of the single-process order.

        Every rank draws the whole epoch's order and augmentation offsets from the same seeded
        generator (as one process would) and keeps its contiguous share of each batch; the step's
        gradient weights are set just before each batch is handed out (:class:`GradientShare`).
        """
        index = list(
            shuffled_batches(len(self.xt), self.fit_cfg.batch_size, self.data_generator, device=self.xt.device)
        )
        shift = self.fit_cfg.augment_shift
        augment = bool(shift) and self.xt.ndim == 4
        offsets = (
            draw_shifts([len(i) for i in index], shift, self.data_generator, device=self.xt.device) if augment else []
        )
        for k, batch in enumerate(index):
            mine = share(batch, world)
            gradient_share.set_batch(len(mine), len(batch))
            self.rows += len(mine)
            xb = self.xt[mine]
            if augment:
                dy, dx = offsets[k]
                xb = shift_images(xb, share(dy, world), share(dx, world), shift)
            yield xb, self.yt[mine]

    def epoch(
        self, epoch: int, state: _Progress, *, x_val: np.ndarray | None, y_val: np.ndarray | None
    ) -> dict[str, float]:
        """Train epoch ``epoch`` (1-based), append its history row to ``state`` and return the row."""
        t0 = time.perf_counter()
        self.rows = 0
        batches = self.batches()
        if self.world is not None and self.gradient_share is None:
            batches = self._counted(batches)
        train_loss = train_one_epoch(
            self.run_model,
            self.optimizer,
            batches,
            task=self.task,
            criterion=self.criterion,
        )
        if self.world is not None:  # the mean over every rank's rows, the same on every rank
            loss_sum, rows = sum_over_ranks(self.world, train_loss * self.rows, float(self.rows))
            train_loss = loss_sum / rows if rows else 0.0
        check_diverged(self.model, train_loss, epoch=epoch, desc=self.desc)
        row = _epoch_row(
            epoch,
            train_loss,
            time.perf_counter() - t0,
            model=self.model,
            x_val=x_val,
            y_val=y_val,
            task=self.task,
            device=self.device,
        )
        if self.private_run is not None:
            state.spent_history = self.private_run.history()
            # ε for ~10 epochs and the last: an accountant query costs ~0.5 s (PRV) on this machine.
            last = epoch % max(1, self.epochs // 10) == 0 or epoch == self.epochs
            if last and (self.world is None or self.world.leader):  # rank 0 records; the others' ε is the same
                row["epsilon"] = self.private_run.epsilon()
        state.history.append(row)
        return row

    def _counted(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in batches:
            self.rows += len(xb)
            yield xb, yb

    def dp_generator_states(self) -> list[torch.Tensor] | None:
        """Under ``dp.reproducible_noise`` only: the (sampling, noise) generator states, every rank's in rank order.

        Across ranks this gathers them on rank 0 (a collective: every rank calls it). The secret
        generators of the default noise source are never read.
        """
        if self.private_run is None or self.private_run.plan.noise_source != "seeded":
            return None
        mine = [self.private_run.sampling_generator.get_state(), self.private_run.noise_generator.get_state()]
        if self.world is None:
            return mine
        gathered = self.world.gather(mine)
        return [s for pair in gathered for s in pair] if gathered is not None else None

    def checkpoint(
        self, epoch: int, state: _Progress, *, done: bool, dp_states: list[torch.Tensor] | None = None
    ) -> Checkpoint:
        """The resumable state after ``epoch``; secret DP generator state stays out (see :class:`Checkpoint`)."""
        stopping = state.stopping
        return Checkpoint(
            epoch=epoch,
            model=privacy.unwrap_state_dict(self.model),
            optimizer=copy.deepcopy(getattr(self.optimizer, "original_optimizer", self.optimizer).state_dict()),
            accountant_history=list(state.spent_history),
            history=releasable_history(state.history, private=self.private_run is not None),
            generator_state=self.data_generator.get_state(),
            best_state=stopping.best_state,
            best_epoch=stopping.best_epoch,
            best_loss=stopping.best_loss,
            done=done,
            dp_generator_states=dp_states,
            ema_state=dict(self.ema.state) if self.ema is not None else None,
            ema_steps=self.ema.steps if self.ema is not None else 0,
        )


def _result(loop: _Loop, state: _Progress, dp: DPConfig | None, *, n_train: int, seconds: float) -> TrainingResult:
    """Restore the best epoch's weights (non-DP early stopping) or release the EMA, unhook Opacus, assemble the result."""
    model, private_run, ema = loop.model, loop.private_run, loop.ema
    world_size = loop.world.size if loop.world is not None else 1
    best_epoch = len(state.history)
    released = "last iterate"
    if ema is not None:
        ema.release()  # the EMA replaces the last iterate (and early stopping's choice, which tracked iterates)
        released = "ema"
    elif state.stopping.best_state is not None and dp is None:
        model.load_state_dict(state.stopping.best_state)
        best_epoch = state.stopping.best_epoch
        released = "best epoch"
    if dp is not None:
        stopping = "off under DP (an epoch chosen on validation data is not covered by the accountant)"
    elif state.stopping.patience > 0:
        stopping = f"on: patience {state.stopping.patience} epochs on the validation loss"
    else:
        stopping = "off (patience 0)"
    if private_run is not None:
        private_run.close()
    record = None
    if dp is not None:
        the_plan = private_run.plan if private_run is not None else _plan_from(dp, state.spent_history, loop.fit_cfg)
        record = privacy.privacy_record(the_plan, state.spent_history)
        record["world_size"] = world_size  # ranks that trained together (σ, q and steps are the global ones)
    return TrainingResult(
        state_dict=privacy.unwrap_state_dict(model),
        history=state.history,
        best_epoch=best_epoch,
        epochs_run=len(state.history),
        seconds=seconds,
        n_train=n_train,
        privacy=record,
        accountant_history=state.spent_history,
        ema=ema.record() if ema is not None else None,
        released_weights=released,
        early_stopping=stopping,
    )


def _plan_from(dp: DPConfig, history: HistoryLike, fit_cfg: FitConfig) -> privacy.PrivacyPlan:
    """The plan of a call that trained no further (resumed after its last epoch), from the spent history."""
    sigma, q, _ = history[-1] if history else (0.0, 0.0, 0)
    return privacy.PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=fit_cfg.max_grad_norm,
        sample_rate=q,
        steps=0,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        accountant=dp.accountant,
        noise_source=privacy.noise_source(dp),
        grad_sample_mode=dp.grad_sample_mode,
        planned_epsilon=privacy.epsilon_of(history, delta=dp.delta, accountant=dp.accountant),
    )
