"""The one seam where differential privacy enters: plan a DP-SGD run, wrap, unwrap, account.

Opacus does the work (per-sample gradients, clipping, noise, Poisson sampling,
accountants). What this module adds is the bookkeeping auditors need:

- the noise multiplier is derived once for the *whole* planned training
  (every epoch, round and resume), so ε is never a per-round figure;
- the accountant's history (σ, sample rate, steps) travels with checkpoints and
  federated client state and is restored before training continues, so ε only grows;
- a run whose planned training would exceed the budget is refused before it starts;
- the randomness the guarantee rests on (Poisson sampling, Gaussian noise) comes by default
  from generators whose whole state is drawn from the OS's CSPRNG and never recorded
  (:func:`dp_generators`); ``dp.reproducible_noise`` is the explicit, recorded opt-out.
"""

from __future__ import annotations

import functools
import math
import threading
import types
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

# auditml_core.privacy.accounting, auditml_core.privacy.bk and auditml_core.privacy.ghost_conv import Opacus (its engine: ~3-6 s on this 2-core machine, most of a
# federated client's start-up): they are imported where they are used, so a run without DP never pays for them.
from auditml_core import seeds
from auditml_core.config import DPConfig
from auditml_core.errors import PrivacyBudgetError

History = list[tuple[float, float, int]]  # Opacus accountant history: (noise_multiplier, sample_rate, steps)
HistoryLike = Sequence[tuple[float, float, int]]  # any read-only history (a list, a tuple, ())
NoiseSource = Literal["os-csprng", "seeded"]
_WARNING_FILTERS = threading.Lock()  # held around warnings.catch_warnings (see _privacy_engine)


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything that determines one DP-SGD training call's guarantee."""

    noise_multiplier: float  # sigma, Gaussian noise std / clipping norm
    max_grad_norm: float  # C, per-sample gradient clipping norm
    sample_rate: float  # q, Poisson sampling probability per record and step
    steps: int  # optimizer steps this call will take
    delta: float
    target_epsilon: float  # the budget
    planned_epsilon: float  # ε after this call, including everything spent before
    accountant: str  # "prv", "rdp" or "gdp"
    noise_source: NoiseSource  # "os-csprng": secret generator states, never recorded; "seeded": dp.reproducible_noise
    grad_sample_mode: str  # per-sample clipping engine (dp.grad_sample_mode): same guarantee, different speed


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of Poisson sampling with expected batch ``batch_size`` (as Opacus)."""
    return math.ceil(n_samples / batch_size)


def epsilon_of(history: Iterable[Sequence[float]], *, delta: float, accountant: str) -> float:
    """ε spent by an accountant history at ``delta`` (0 for an empty history).

    Opacus' ``accountant``, bit for bit, memoised per process (:mod:`auditml_core.privacy.accounting`): a federated
    client asks for the same ε several times a round.
    """
    merged = merge_history(history)
    if not merged:
        return 0.0
    from auditml_core.privacy.accounting import epsilon

    return epsilon(tuple(merged), delta=float(delta), accountant=accountant)


def covers(history: Iterable[Sequence[float]], earlier: Iterable[Sequence[float]]) -> bool:
    """Whether ``history`` spends at least what ``earlier`` did: for every (σ, q), at least as many steps.

    Composition only adds privacy loss, so a history that covers ``earlier`` has an ε (any accountant,
    any δ) no smaller than it; a ledger that no longer covers what was recorded of it understates.
    """

    def steps(h: Iterable[Sequence[float]]) -> dict[tuple[float, float], int]:
        out: dict[tuple[float, float], int] = {}
        for s, q, n in h:
            out[(float(s), float(q))] = out.get((float(s), float(q)), 0) + int(n)
        return out

    mine = steps(history)
    return all(mine.get(key, 0) >= n for key, n in steps(earlier).items())


def merge_history(history: Iterable[Sequence[float]]) -> History:
    """Join consecutive entries with the same (σ, q): same ε, and PRV's cost grows with the entry count."""
    out: History = []
    for s, q, n in history:
        if out and out[-1][0] == float(s) and out[-1][1] == float(q):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return out


@functools.lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # A pure function costing seconds (PRV); federated clients ask it again every round with the same arguments.
    from auditml_core.privacy.accounting import noise_multiplier

    return noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def plan(
    dp: DPConfig,
    *,
    n_samples: int,
    batch_size: int,
    max_grad_norm: float,
    epochs: int,
    total_epochs: int | None = None,
    history: HistoryLike = (),
) -> PrivacyPlan:
    """Plan a DP-SGD call and refuse it if it would overspend the budget.

    Parameters
    ----------
    dp : privacy settings (budget ``target_epsilon``, ``delta``, optional fixed ``noise_multiplier``).
    n_samples : records in the (local) training set.
    batch_size : expected batch size; the sample rate is ``1 / ceil(n_samples / batch_size)``.
    max_grad_norm : clipping norm C.
    epochs : epochs this call trains.
    total_epochs : epochs of the whole training the budget must cover (all rounds, all resumes);
        the noise multiplier is derived for this many. Defaults to ``epochs``.
    history : the accountant history already spent (from a checkpoint or earlier rounds).

    Returns
    -------
    PrivacyPlan

    Raises
    ------
    PrivacyBudgetError
        If ``history`` plus this call would exceed ``dp.target_epsilon``, or no noise reaches it.
    """
    per_epoch = steps_per_epoch(n_samples, batch_size)
    sample_rate = 1.0 / per_epoch
    steps = per_epoch * epochs
    if dp.noise_multiplier > 0:
        sigma = dp.noise_multiplier
    else:
        total_steps = per_epoch * (total_epochs or epochs)
        try:
            sigma = _noise_multiplier(dp.target_epsilon, dp.delta, sample_rate, total_steps, dp.accountant)
        except ValueError as exc:
            raise PrivacyBudgetError(
                f"no noise multiplier reaches ε={dp.target_epsilon} at δ={dp.delta} for {total_steps} steps ({exc}); "
                "raise dp.target_epsilon or dp.delta, or train fewer epochs"
            ) from None
    planned_history = [*history, (sigma, sample_rate, steps)]
    # PRV can run for minutes (numerical overflow) when σ is tiny and ε enormous. RDP is fast and, in
    # practice, never below PRV; when it says ε is far over budget, refuse without asking PRV.
    rough = epsilon_of(planned_history, delta=dp.delta, accountant="rdp") if dp.accountant == "prv" else None
    if rough is not None and rough > 10 * dp.target_epsilon:
        planned = rough
    else:
        planned = epsilon_of(planned_history, delta=dp.delta, accountant=dp.accountant)
    if planned > dp.target_epsilon:
        spent = epsilon_of(history, delta=dp.delta, accountant=dp.accountant)
        raise PrivacyBudgetError(
            f"planned training would spend ε={planned:.3f} (already spent {spent:.3f}) > budget dp.target_epsilon="
            f"{dp.target_epsilon} at δ={dp.delta}; raise dp.noise_multiplier, lower the epochs, or raise the budget"
        )
    return PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        planned_epsilon=planned,
        accountant=dp.accountant,
        noise_source=noise_source(dp),
        grad_sample_mode=dp.grad_sample_mode,
    )


def noise_source(dp: DPConfig) -> NoiseSource:
    """Where DP-SGD's sampling and noise randomness comes from under ``dp``."""
    return "seeded" if dp.reproducible_noise else "os-csprng"


def dp_generators(
    dp: DPConfig, *, seed: int, noise_device: torch.device | str
) -> tuple[torch.Generator, torch.Generator]:
    """The (Poisson sampling, Gaussian noise) generators of one DP-SGD training call.

    By default both come from :func:`auditml_core.seeds.secret_generator`: their whole state is
    drawn from ``os.urandom`` (MT19937 on the CPU: 19 936 secret bits; Philox on CUDA: 126, its
    64-bit key and counter offset) and never returned, logged or checkpointed, so an adversary
    holding the whole run directory (the root seed included) can neither replay nor enumerate
    the noise (``manual_seed`` would have kept only 32 bits on the CPU). Residual: they are
    seeded PRNGs with a secret full-entropy state, not a CSPRNG stream; none of their raw
    output is released. Opacus' own CSPRNG route (``secure_mode``) needs torchcsprng, which
    is unmaintained and not installable here. Called once per training call, never per step.

    With ``dp.reproducible_noise`` both derive from ``seed`` (:func:`auditml_core.seeds.dp_seed`),
    which the run records: the guarantee then holds only while that seed stays secret.

    Parameters
    ----------
    dp : privacy settings (``reproducible_noise``).
    seed : the training call's recorded seed (used only with ``reproducible_noise``).
    noise_device : the device of the parameters the noise is added to; sampling stays on the CPU.

    Returns
    -------
    (sampling generator on the CPU, noise generator on ``noise_device``)
    """
    if dp.reproducible_noise:
        return (
            seeds.make_generator("cpu", seeds.dp_seed(seed, "sampling")),
            seeds.make_generator(noise_device, seeds.dp_seed(seed, "noise")),
        )
    return seeds.make_generator("cpu"), seeds.make_generator(noise_device)


@dataclass
class PrivateTraining:
    """The private versions of (model, optimizer, loader) and the engine that accounts for them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # opacus DPDataLoader
    engine: Any  # opacus PrivacyEngine
    plan: PrivacyPlan
    sampling_generator: torch.Generator  # Poisson sampling (CPU); secret unless plan.noise_source == "seeded"
    noise_generator: torch.Generator  # Gaussian noise (parameters' device); same secrecy
    criterion: Any = None  # ghost mode: Opacus' DPLossFastGradientClipping, the loss the loop must use

    def index_batches(self, *, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One epoch of Poisson-sampled index batches (some may be empty), drawn by Opacus' sampler.

        The whole epoch is drawn on the CPU first (the same draws, in the same order, as iterating
        the sampler step by step: nothing else uses its generator) and copied to ``device`` in one
        transfer, so the training steps wait for no host-to-device copy.
        """
        idx = [torch.as_tensor(i, dtype=torch.long) for i in self.loader.batch_sampler]
        flat = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        if device is not None:
            flat = flat.to(device)
        return list(torch.split(flat, [len(i) for i in idx]))

    def batches(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of Poisson-sampled ``(x, y)`` batches (:meth:`index_batches` on ``x``'s device).

        Indexing the tensors directly instead of iterating the DataLoader skips its per-record
        collation, which took ~40% of a DP epoch of the digits CNN on this machine.
        """
        for idx in self.index_batches(device=x.device):
            yield x[idx], y[idx]

    def history(self) -> History:
        """Accountant history so far (everything spent, earlier calls included)."""
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    def epsilon(self) -> float:
        """ε spent so far at the plan's δ."""
        return epsilon_of(self.history(), delta=self.plan.delta, accountant=self.plan.accountant)

    def close(self) -> None:
        """Detach Opacus' hooks so the module is plain again (explainers fail on hooked modules)."""
        getattr(self.model, "_close")()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: torch.utils.data.Dataset,
    *,
    plan: PrivacyPlan,
    history: HistoryLike = (),
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
    grad_sample_mode: str = "hooks",
    criterion: nn.Module | None = None,
) -> PrivateTraining:
    """Wrap a model, optimizer and dataset for DP-SGD with Poisson sampling, restoring ``history``.

    Parameters
    ----------
    model, optimizer : the plain module (its parameters already on the training device) and its optimizer.
    dataset : the training records (one record = one unit of privacy).
    plan : from :func:`plan`.
    history : accountant history already spent; the new engine's accountant continues it.
    sampling_generator : CPU generator of the Poisson sampling (from :func:`dp_generators`).
    noise_generator : generator of the Gaussian noise, on the parameters' device (from :func:`dp_generators`).
    grad_sample_mode : Opacus' per-sample gradient engine. With ``"ghost"`` (ghost clipping), the
        training loss must be computed with the returned ``criterion`` (a wrap of ``criterion``,
        which must accept ``reduction="none"``): its ``backward`` runs the two passes that clip.
        ``"bk"`` is book-keeping clipping (:mod:`auditml_core.privacy.bk`): one backward pass, Opacus' noise and
        accounting; the loss must be the batch mean, as for ``"hooks"``.
    criterion : the training loss (ghost mode only; default cross-entropy).

    Raises
    ------
    ValueError
        If ``noise_generator`` is not on the device of ``model``'s parameters.
    """
    from opacus.data_loader import DPDataLoader

    device = next(model.parameters()).device
    if noise_generator.device.type != device.type:
        raise ValueError(
            f"the noise generator is on {noise_generator.device} but the parameters are on {device}; "
            "create it with auditml_core.seeds.make_generator(<parameters' device>)"
        )
    engine = _privacy_engine(plan, history)
    loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=sampling_generator)
    wrapped = _wrap(
        engine,
        model,
        optimizer,
        loader,
        plan=plan,
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
        criterion=criterion,
    )
    priv_model, priv_opt, *priv_criterion, priv_loader = wrapped  # ghost mode also returns the criterion
    # Floating-point-safe noise (Opacus' _generate_noise: sum of 4 Gaussians / 2, after Holohan et al.):
    # in DPOptimizer ``secure_mode`` selects only this noise recipe; the engine keeps secure_mode=False,
    # which is what would import torchcsprng. Same N(0, σ²C²) distribution, so accounting is unchanged.
    priv_opt.secure_mode = True
    priv_opt.add_noise = types.MethodType(_add_noise_at_once, priv_opt)  # the same noise, one call for all tensors
    return PrivateTraining(
        model=priv_model,
        optimizer=priv_opt,
        loader=priv_loader,
        engine=engine,
        plan=plan,
        sampling_generator=sampling_generator,
        noise_generator=noise_generator,
        criterion=priv_criterion[0] if priv_criterion else None,
    )


def _privacy_engine(plan: PrivacyPlan, history: HistoryLike) -> Any:
    """Opacus' ``PrivacyEngine`` with the plan's accountant, continuing ``history``."""
    from opacus import PrivacyEngine

    # catch_warnings saves and restores the process's filter list: two threads inside it at once (the audit's
    # concurrent DP shadows) can restore each other's filter for good; the lock keeps them one at a time.
    with _WARNING_FILTERS, warnings.catch_warnings():
        # Opacus warns that its torchcsprng route (secure_mode) is off; our noise comes instead from
        # generators whose state is drawn from the OS's CSPRNG (dp_generators); the report says which source.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=plan.accountant, secure_mode=False)
    engine.accountant.load_state_dict({"history": list(history), "mechanism": engine.accountant.mechanism()})
    return engine


def _wrap(
    engine: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    *,
    plan: PrivacyPlan,
    noise_generator: torch.Generator,
    grad_sample_mode: str,
    criterion: nn.Module | None,
) -> tuple[Any, ...]:
    """Wrap with the clipping engine ``grad_sample_mode``: (model, optimizer[, criterion under ghost], loader)."""
    import auditml_core.privacy.ghost_conv  # noqa: F401  (registers the Conv2d norm sampler for grad_sample_mode="ghost")
    from auditml_core.privacy.bk import make_private as bk_make_private

    if grad_sample_mode == "bk":  # --- book-keeping clipping (auditml_core/privacy/bk.py): one backward, Opacus' noise
        return bk_make_private(
            engine,
            model,
            optimizer,
            loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            noise_generator=noise_generator,
        )
    ghost = {"criterion": criterion or nn.CrossEntropyLoss()} if grad_sample_mode == "ghost" else {}
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples (Poisson) with our generator
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
        **ghost,
    )


def _add_noise_at_once(optimizer: Any) -> None:
    """Opacus' ``DPOptimizer.add_noise`` with one call of its ``_generate_noise`` for all the parameters.

    Opacus calls ``_generate_noise`` once per parameter tensor; in its floating-point-safe recipe each
    call is five Gaussian draws, four additions and a division. On the digits CNN (8 tensors, 36k
    coordinates) that cost 0.58 ms a step, against 0.47 ms for one call over all the coordinates,
    whose drawing alone is ~0.34 ms. The noise is the same: i.i.d. N(0, σ²C²) per coordinate, from
    the same function, recipe and generator; only the split of the coordinates into calls differs.
    As Opacus does, it writes ``p.grad = p.summed_grad + noise`` and marks each sum processed.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    params = optimizer.params
    sums = [p.summed_grad for p in params]
    for s in sums:
        _check_processed_flag(s)
    if len({(s.dtype, s.device) for s in sums}) != 1:  # mixed dtypes or devices: Opacus' per-tensor draws
        type(optimizer).add_noise(optimizer)
        return
    sizes = [s.numel() for s in sums]
    sigma = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)  # as Opacus' ghost optimizer
    noise = _generate_noise(
        std=sigma * optimizer.max_grad_norm,
        reference=sums[0].new_empty(sum(sizes)),  # only its shape, device and dtype are read
        generator=optimizer.generator,
        secure_mode=optimizer.secure_mode,
    )
    for p, s, z in zip(params, sums, noise.split(sizes)):
        p.grad = (s + z.view_as(s)).view_as(p)
        _mark_as_processed(s)


def noise_only_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The DP-SGD step of an empty Poisson batch: no gradient, only noise, and the accountant counts it.

    Skipping the step would make what is released depend on the batch being empty; Opacus'
    expanded-weights engine refuses empty batches, so the empty per-sample gradients are set here.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in unwrap(model).parameters():
        if p.requires_grad:
            setattr(p, "grad_sample", torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device))  # (0, *shape)
            p.grad = torch.zeros_like(p)  # ghost mode's optimizer sums p.grad; the others overwrite it
    optimizer.step()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus GradSampleModule (or the module itself)."""
    return getattr(model, "_module", model)


def unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights with no Opacus ``_module.`` prefix."""
    state = unwrap(model).state_dict()
    return {k.removeprefix("_module."): v.detach().to("cpu").clone() for k, v in state.items()}


def privacy_record(plan: PrivacyPlan, history: HistoryLike) -> dict[str, Any]:
    """The JSON record of a DP training that reaches the report: every number that defines ε."""
    import opacus

    spent = epsilon_of(history, delta=plan.delta, accountant=plan.accountant)
    return {
        **asdict(plan),
        "epsilon": spent,
        "total_steps": int(sum(n for _, _, n in history)),
        "accountant_history": [list(h) for h in history],
        "opacus_version": opacus.__version__,
        "mechanism": "DP-SGD (Gaussian mechanism, Poisson subsampling, per-sample clipping)",
        "unit_of_privacy": "one training record (sample-level DP)",
        "floating_point_safe_noise": True,
    }
