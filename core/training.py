"""The one training core: device choice, batching, one epoch, evaluation, early stopping, fit.

Central training and the Flower ClientApp both call :func:`fit`; nothing here
imports Flower. Differential privacy enters only through :mod:`core.privacy`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from core import privacy
from core.config import DPConfig, FitConfig
from core.errors import ConfigError, TrainingDivergedError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto", *, num_threads: int = 1) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; also sets the CPU thread count.

    Raises
    ------
    ConfigError
        If ``cuda`` is asked for on a machine without a usable CUDA device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name!r} is not valid; choose one of: auto, cpu, cuda")
    # One thread per process is fastest for these small models (measured: see PLATFORM.md).
    torch.set_num_threads(num_threads)
    return torch.device(name)


def loss_fn(task: str) -> nn.Module:
    """MSE for regression (on the (N,) output), cross-entropy for classification."""
    return nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()


def _output(model: nn.Module, xb: torch.Tensor, task: str) -> torch.Tensor:
    out = model(xb)
    return out.squeeze(-1) if task == "regression" else out  # (B,) or (B, K)


def make_optimizer(model: nn.Module, fit: FitConfig) -> torch.optim.Optimizer:
    """The optimizer ``fit`` names."""
    if fit.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=fit.lr, momentum=fit.momentum, weight_decay=fit.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch (no DataLoader: it dominates the cost of these tiny models)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def random_shift(xb: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``xb`` (B, C, H, W) by its own random offset in [-max_shift, max_shift].

    Uncovered pixels take the image's own minimum (the background of standardised digits).

    A per-record transformation: under DP it touches only the record it augments, so the
    guarantee is unchanged.
    """
    if max_shift <= 0 or len(xb) == 0:
        return xb
    b, _, h, w = xb.shape
    floor = xb.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    padded = nn.functional.pad(xb - floor, (max_shift,) * 4) + floor  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(xb.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(xb.device)
    rows = (dy[:, None] + torch.arange(h, device=xb.device))[:, None, :, None].expand(
        b, xb.shape[1], h, w + 2 * max_shift
    )
    out = padded.gather(2, rows)  # (B, C, H, W+2s)
    cols = (dx[:, None] + torch.arange(w, device=xb.device))[:, None, None, :].expand(b, xb.shape[1], h, w)
    return out.gather(3, cols)  # (B, C, H, W)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    *,
    task: str,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    criterion: nn.Module | None = None,
) -> float:
    """One pass over ``batches`` (an iterable of ``(x, y)`` tensors on the model's device).

    Returns the mean training loss. An empty batch (only possible under Poisson sampling) still
    takes its noise-only step (:func:`core.privacy.noise_only_step`), as DP-SGD's analysis assumes.
    """
    model.train()
    criterion = criterion or loss_fn(task)
    total, count = 0.0, 0
    for xb, yb in batches:
        if len(xb) == 0:
            privacy.noise_only_step(model, optimizer)
            continue
        if transform is not None:
            xb = transform(xb)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(_output(model, xb, task), yb)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(xb)
        count += len(xb)
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: nn.Module, x: np.ndarray | torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 1024
) -> np.ndarray:
    """Model outputs for ``x``: (N,) for a regressor, (N, K) logits for a classifier."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    outs = [model(xt[i : i + batch_size].to(device)).cpu() for i in range(0, len(xt), batch_size)]
    out = torch.cat(outs) if outs else torch.empty(0)
    return (out.squeeze(-1) if out.ndim == 2 and out.shape[1] == 1 else out).numpy()


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, task: str, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Loss and headline metric (R² on the scale trained on, or accuracy) on one split."""
    out = predict(model, x, device=device)
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        mse = float(np.mean((out - y) ** 2))
        var = float(np.var(y))
        return {"loss": mse, "r2": 1.0 - mse / var if var > 0 else float("nan")}
    logits = torch.as_tensor(out)
    loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(y, dtype=torch.long)))
    return {"loss": loss, "accuracy": float((out.argmax(axis=1) == y).mean())}


@dataclass
class TrainingResult:
    """What every training path (central, federated client, resumed) returns."""

    state_dict: dict[str, torch.Tensor]  # unwrapped CPU weights (no "_module." keys)
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, val_loss, val metric, seconds, epsilon
    best_epoch: int
    epochs_run: int
    seconds: float
    n_train: int
    privacy: dict[str, Any] | None = None  # core.privacy.privacy_record when trained with DP
    accountant_history: privacy.History = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-safe view (without the weights)."""
        secs = [h["seconds"] for h in self.history]
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "seconds": self.seconds,
            "seconds_per_epoch": float(np.mean(secs)) if secs else 0.0,
            "n_train": self.n_train,
            "privacy": self.privacy,
        }


@dataclass
class Checkpoint:
    """Training state after an epoch: enough to resume with the same weights, optimizer and ε history."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    accountant_history: privacy.History
    history: list[dict[str, float]]
    generator_state: torch.Tensor
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_loss: float = float("inf")
    done: bool = False  # training finished (last epoch or early stop): resuming trains no further


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
    privacy_history: privacy.History = (),
    resume: Checkpoint | None = None,
    on_epoch_end: Callable[[Checkpoint], None] | None = None,
    progress: bool = False,
    desc: str = "train",
    criterion: nn.Module | None = None,
    proximal_mu: float = 0.0,
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
    seed : seeds the batch order, Poisson sampling and DP noise (not in DP secure mode).
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

    Raises
    ------
    PrivacyBudgetError
        If DP training would exceed the budget (checked before any step).
    """
    epochs = epochs or fit_cfg.epochs
    private = dp is not None and dp.enabled
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()  # Opacus refuses a module in eval mode
    optimizer = make_optimizer(model, fit_cfg)
    if proximal_mu > 0:
        _add_proximal_term(optimizer, model, proximal_mu)
    start_epoch, history = 0, []
    best_state, best_epoch, best_loss = None, 0, float("inf")
    spent_history = list(privacy_history)
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator_state)
        start_epoch, history = resume.epoch, list(resume.history)
        best_state, best_epoch, best_loss = resume.best_state, resume.best_epoch, resume.best_loss
        spent_history = list(resume.accountant_history)
    remaining = 0 if resume is not None and resume.done else epochs - start_epoch
    xt = torch.as_tensor(x_train).to(device)
    yt = torch.as_tensor(y_train).to(device)
    run_model, run_opt, private_run = model, optimizer, None
    if private and remaining > 0:
        # σ is derived for the whole planned training (dp_total_epochs), so a resumed run or a later
        # federated round gets the same σ; what was spent before is in spent_history and counts.
        the_plan = privacy.plan(
            dp,
            n_samples=len(xt),
            batch_size=fit_cfg.batch_size,
            max_grad_norm=fit_cfg.max_grad_norm,
            epochs=remaining,
            total_epochs=dp_total_epochs or epochs,
            history=spent_history,
        )
        private_run = privacy.make_private(
            model,
            optimizer,
            torch.utils.data.TensorDataset(xt, yt),
            plan=the_plan,
            history=spent_history,
            generator=generator,
            grad_sample_mode=dp.grad_sample_mode,
            criterion=criterion or loss_fn(task),
        )
        run_model, run_opt = private_run.model, private_run.optimizer
        criterion = private_run.criterion or criterion  # ghost clipping: the loss must be Opacus' wrap
    transform = None
    if fit_cfg.augment_shift and xt.ndim == 4:
        transform = lambda xb: random_shift(xb, fit_cfg.augment_shift, generator)  # noqa: E731
    bar = _progress(range(start_epoch, start_epoch + remaining), progress, desc)
    t_start = time.perf_counter()
    for epoch in bar:
        t0 = time.perf_counter()
        if private_run is not None:
            batches = private_run.batches(xt, yt)
        else:
            batches = ((xt[i], yt[i]) for i in shuffled_batches(len(xt), fit_cfg.batch_size, generator))
        train_loss = train_one_epoch(run_model, run_opt, batches, task=task, transform=transform, criterion=criterion)
        check_diverged(model, train_loss, epoch=epoch + 1, desc=desc)
        row: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - t0}
        if x_val is not None and len(x_val):
            row.update({f"val_{k}": v for k, v in evaluate(model, x_val, y_val, task=task, device=device).items()})
        if private_run is not None:
            spent_history = private_run.history()
            # ε for ~10 epochs and the last: an accountant query costs ~0.5 s (PRV) on this machine.
            if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
                row["epsilon"] = private_run.epsilon()
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: round(v, 4) for k, v in row.items() if k not in ("epoch", "seconds")})
        stop = False
        if not private and patience > 0 and "val_loss" in row:
            if row["val_loss"] < best_loss:
                best_loss, best_epoch, best_state = row["val_loss"], epoch + 1, privacy.unwrap_state_dict(model)
            elif epoch + 1 - best_epoch >= patience:
                stop = True
        if on_epoch_end is not None:
            on_epoch_end(
                Checkpoint(
                    epoch=epoch + 1,
                    model=privacy.unwrap_state_dict(model),
                    optimizer=copy.deepcopy(getattr(run_opt, "original_optimizer", run_opt).state_dict()),
                    accountant_history=list(spent_history),
                    history=list(history),
                    generator_state=generator.get_state(),
                    best_state=best_state,
                    best_epoch=best_epoch,
                    best_loss=best_loss,
                    done=stop or epoch + 1 == epochs,
                )
            )
        if stop:
            log.info("%s: early stop at epoch %d (best %d)", desc, epoch + 1, best_epoch)
            break
    if best_state is not None and not private:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    if private_run is not None:
        # Detach Opacus' hooks so the returned module is plain again (explainers fail on hooked modules).
        private_run.model._close()
    record = None
    if private:
        record = privacy.privacy_record(
            private_run.plan if private_run else _plan_from(dp, spent_history, fit_cfg), spent_history
        )
    return TrainingResult(
        state_dict=privacy.unwrap_state_dict(model),
        history=history,
        best_epoch=best_epoch,
        epochs_run=len(history),
        seconds=time.perf_counter() - t_start,
        n_train=len(xt),
        privacy=record,
        accountant_history=spent_history,
    )


def check_diverged(model: nn.Module, train_loss: float, *, epoch: int, desc: str) -> None:
    """Stop training whose loss or weights stopped being finite (a too-large learning rate, for one).

    Raises
    ------
    TrainingDivergedError
        Naming the epoch; callers that know the config key add it (``lower cnn.fit.lr``).
    """
    finite_weights = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if np.isfinite(train_loss) and finite_weights:
        return
    what = "weights" if np.isfinite(train_loss) else f"train loss ({train_loss})"
    raise TrainingDivergedError(
        f"training diverged at epoch {epoch} ({desc}: {what} not finite); lower the learning rate", epoch=epoch
    )


def _add_proximal_term(optimizer: torch.optim.Optimizer, model: nn.Module, mu: float) -> None:
    """Add FedProx's gradient ``mu * (w - w_start)`` before every update of ``optimizer``.

    It depends on no training record, so it is added to the gradient rather than the loss:
    under DP-SGD, Opacus' optimizer writes the clipped, noised gradient and then steps this
    (wrapped) optimizer, whose pre-hook adds the term after the noise: post-processing, no
    privacy cost. Per-sample gradients of a loss term would instead be clipped and noised.
    """
    reference = [p.detach().clone() for p in model.parameters()]

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, ref in zip(model.parameters(), reference):
                if p.grad is not None:
                    p.grad.add_(p.detach() - ref, alpha=mu)

    optimizer.register_step_pre_hook(hook)


def _plan_from(dp: DPConfig, history: privacy.History, fit_cfg: FitConfig) -> privacy.PrivacyPlan:
    sigma, q, _ = history[-1] if history else (0.0, 0.0, 0)
    return privacy.PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=fit_cfg.max_grad_norm,
        sample_rate=q,
        steps=0,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        accountant=dp.accountant,
        secure_mode=dp.secure_mode,
        planned_epsilon=privacy.epsilon_of(history, delta=dp.delta, accountant=dp.accountant),
    )


def _progress(it: range, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
