"""One-run privacy auditing with gradient canaries (Steinke, Nasr & Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023): ``m`` canaries are each included in a
training run independently with probability 1/2; after the run the auditor scores every canary,
guesses "included" for the ``k`` highest scores and "excluded" for the ``k`` lowest (abstaining on the
rest), and counts the ``v`` correct guesses among ``r = 2k``. If the training is (ε, δ)-DP with respect
to each canary, ``v`` is at most what ε-randomised response would give, up to a δ term (their
Theorem 3.1; Appendix D's p-value, implemented by :func:`one_run_p_value`)::

    P[V >= v] <= P[Bin(r, p) >= v] + 2·m·δ · max_{i=1..v} P[v - i <= Bin(r, p) < v] / i,   p = e^ε / (1 + e^ε)

so every ε whose p-value is below 1 - confidence is refuted: :func:`one_run_epsilon` returns the
largest such ε, an empirical *lower* bound on the ε the training really has. One training run gives
``m`` independent trials instead of one per pair of runs.

The canaries here are **Dirac gradient canaries** (the paper's white-box setting; Nasr et al. 2023):
canary ``i`` is a record whose clipped gradient is ``± C`` on one coordinate that no data record
touches (a zero-output side layer, :class:`CanaryCarrier`). At every DP-SGD step each included
canary joins the batch with the plan's sample rate ``q`` and its gradient is added to the clipped sum
before the noise (:meth:`GradientCanaries.install`). The score is white-box: the sum, over the steps, of
the noisy gradient DP-SGD hands the optimizer on the canary's coordinate, in the canary's direction
(each step's noisy gradient is what the Gaussian mechanism releases, so the guarantee covers it; the
final weight would be blurred by Adam's per-coordinate normalisation, which is as large for pure noise
as for a canary). Because the coordinate is its own, the score sees exactly the noise the training code
added (σ·C per step), the sampling rate and the number of steps: a training that adds less noise than its
accountant assumes is refuted. What it does not exercise: per-sample clipping
(the canary's gradient is inserted already at norm C) and the data loader's sampler (canaries are
sampled here, at the plan's rate).

:func:`scale_noise` is the audit's positive control: DP-SGD with its noise scaled down while the
accountant keeps recording the planned σ, a privacy violation the audit must report as FAILED.

Nothing here knows of stages; the pipeline's ``audit`` stage trains with these hooks through
:func:`auditml_core.training.fit` (``on_private``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from auditml_core import seeds

# Guesses per audit as shares of the m canaries (r = share·m; half "included", half "excluded"), fixed in
# advance; the best of them is reported with a Bonferroni correction (confidence split between them).
GUESS_SHARES = (0.1, 0.2, 0.4, 1.0)


# --------------------------------------------------------------------------- statistics


def _log_binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    if p <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    if p >= 1.0:
        return np.where(k == n, 0.0, -np.inf)
    lg = np.vectorize(math.lgamma)
    return math.lgamma(n + 1) - lg(k + 1) - lg(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``>= v`` correct guesses out of ``r`` if the training were (ε, δ)-DP per canary.

    Steinke et al. (2023), Theorem 3.1 in the form of their Appendix D: the binomial tail of ε-randomised
    response plus ``2·m·δ`` times the largest average of the ``i`` probabilities just below ``v``.
    Summed in log space (no scipy), so tests can check it against ``scipy.stats.binom``.

    Raises
    ------
    ValueError
        Unless ``0 <= v <= r <= m``, ``epsilon >= 0`` and ``0 <= delta <= 1``.
    """
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"one_run_p_value needs 0 <= v <= r <= m, ε >= 0, δ in [0, 1]; got m={m}, r={r}, v={v}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    log_pmf = _log_binom_pmf(np.arange(r + 1), r, p)  # (r + 1,)
    top = float(np.max(log_pmf))
    pmf = np.exp(log_pmf - top)  # scaled by e^-top; the scale is put back below
    tail = float(pmf[v:].sum()) * math.exp(top)  # P[Bin(r, p) >= v]
    below = np.cumsum(pmf[v - 1 :: -1]) * math.exp(top)  # i-th entry: P[v - i <= Bin < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def one_run_epsilon(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` refute at ``confidence``: a lower bound on ε.

    0 when not even ε = 0 is refuted. Bisection on ε (the p-value grows with ε), to 1e-6.
    """
    level = 1.0 - confidence
    if one_run_p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < level:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # v = r with δ = 0 and huge r: no finite ε is consistent; never reached at this scale
            return lo
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: np.ndarray, included: np.ndarray, *, k: int) -> tuple[int, int]:
    """Guess "included" for the ``k`` highest scores and "excluded" for the ``k`` lowest: (r, correct v).

    Ties are broken by position (a stable sort), never by the truth.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if not 0 <= 2 * k <= len(scores):
        raise ValueError(f"k={k} guesses each way need at least {2 * k} canaries; got {len(scores)}")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k], order[len(order) - k :]
    return 2 * k, int(included[high].sum() + (~included[low]).sum())


def _guess_sizes(m: int, shares: Sequence[float]) -> list[int]:
    """Guesses each way (k) for every share of ``m``: ``share·m / 2``, at least 1, without repeats."""
    return sorted({max(1, int(s * m) // 2) for s in shares})


def certifiable_epsilon(
    m: int, *, delta: float, confidence: float = 0.95, shares: Sequence[float] = GUESS_SHARES
) -> float:
    """The largest ε this audit can certify at all: every guess right, at the largest guess count.

    If it is below the claimed ε, the audit cannot refute the claim whatever the training does.
    """
    ks = _guess_sizes(m, shares)
    level = confidence_each(confidence, len(ks))
    return max(one_run_epsilon(m=m, r=2 * k, v=2 * k, delta=delta, confidence=level) for k in ks)


def confidence_each(confidence: float, n_tests: int) -> float:
    """Bonferroni: each of ``n_tests`` bounds at this confidence makes their maximum hold at ``confidence``."""
    return 1.0 - (1.0 - confidence) / n_tests


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    shares: Sequence[float] = GUESS_SHARES,
) -> dict[str, Any]:
    """The one-run ε lower bound from canary scores and their true inclusion.

    Every guess count in ``shares`` (fixed in advance) gives a bound at confidence
    ``1 - (1 - confidence) / len(shares)``; the largest holds at ``confidence`` (union bound).

    Returns
    -------
    ``{"epsilon_lower_bound", "confidence", "m", "included", "guesses": [{"r", "correct", "epsilon"}],
    "best": {...}, "certifiable_epsilon", "delta", "method"}``
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be the same 1-D shape")
    m = len(scores)
    ks = _guess_sizes(m, shares)
    level = confidence_each(confidence, len(ks))
    rows = []
    for k in ks:
        r, v = guess_counts(scores, included, k=k)
        rows.append({"r": r, "correct": v, "epsilon": one_run_epsilon(m=m, r=r, v=v, delta=delta, confidence=level)})
    best = max(rows, key=lambda row: row["epsilon"])
    return {
        "epsilon_lower_bound": best["epsilon"],
        "confidence": confidence,
        "m": m,
        "included": int(included.sum()),
        "guesses": rows,
        "best": best,
        "certifiable_epsilon": certifiable_epsilon(m, delta=delta, confidence=confidence, shares=shares),
        "delta": delta,
        "method": (
            f"one-run audit (Steinke, Nasr & Jagielski 2023, Theorem 3.1 / Appendix D): top and bottom k of {m} "
            f"canaries guessed in and out for {len(ks)} guess counts fixed in advance, each bound at confidence "
            f"{level:.4g} (Bonferroni), the largest reported"
        ),
    }


# --------------------------------------------------------------------------- gradient canaries


class CanaryCarrier(nn.Module):
    """``model`` plus a side layer of ``m`` weights that never changes its output (one coordinate per canary).

    The side layer is an ``nn.Linear(1, m)`` (supported by every DP engine) whose output enters the
    model's output multiplied by zero: no data record has any gradient on it, so its coordinates move
    only by the canaries' gradients and the DP noise.
    """

    def __init__(self, model: nn.Module, m: int) -> None:
        super().__init__()
        self.model = model
        self.canaries = nn.Linear(1, m, bias=False)
        nn.init.zeros_(self.canaries.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        side = self.canaries(x.new_ones((len(x), 1))).sum(dim=1)  # (B,)
        return out + 0.0 * side.view(-1, *([1] * (out.dim() - 1)))


class GradientCanaries:
    """``m`` Dirac gradient canaries, each included with probability 1/2 (the auditor's secret).

    Parameters
    ----------
    m : number of canaries (coordinates of the side layer), >= 2.
    seed : seeds inclusion, signs and per-step sampling (the audit's own randomness: the canaried
        model is never released, and the DP noise it is tested against stays CSPRNG-seeded).
    """

    def __init__(self, m: int, *, seed: int) -> None:
        if m < 2:
            raise ValueError(f"m={m} canaries; need at least 2")
        rng = np.random.default_rng(seed)
        self.m = int(m)
        self.included = rng.random(self.m) < 0.5  # (m,) S_i: the secret the audit must guess
        self.signs = np.where(rng.random(self.m) < 0.5, -1.0, 1.0)  # (m,) direction of each canary's gradient
        self._generator = seeds.make_generator("cpu", int(rng.integers(2**62)))  # the audit's own, recorded
        self.carrier: CanaryCarrier | None = None
        self.steps = 0
        self.insertions = 0
        self._released = torch.zeros(self.m, dtype=torch.float64)  # (m,) Σ_t noisy gradient · sign, per canary

    def wrap(self, model: nn.Module) -> CanaryCarrier:
        """The module to train: ``model`` with the canaries' side layer."""
        self.carrier = CanaryCarrier(model, self.m)
        return self.carrier

    def install(self, private: Any, *, insert: bool = True) -> None:
        """Add the canaries to every DP-SGD step of ``private`` (a :class:`~auditml_core.privacy.dp_sgd.PrivateTraining`).

        Before the noise, each included canary joins the step with the plan's sample rate and adds
        ``sign · C`` to its coordinate of the clipped sum (``p.summed_grad``), as a record with that
        clipped gradient would; after it, the noisy gradient on the canaries' coordinates is read (the
        score). Install it last (after :func:`scale_noise`) so that it reads what the optimizer gets.
        ``insert=False`` reads the scores without inserting anything: the null of the audit, a training
        that never saw the canaries.
        """
        if self.carrier is None:
            raise RuntimeError("call wrap(model) and train the returned module before install()")
        weight = self.carrier.canaries.weight  # (m, 1)
        q, c = float(private.plan.sample_rate), float(private.plan.max_grad_norm)
        included = torch.as_tensor(self.included)
        signs = torch.as_tensor(self.signs, dtype=weight.dtype)
        signs_cpu = torch.as_tensor(self.signs, dtype=torch.float64)
        opt = private.optimizer
        add_noise = opt.add_noise

        def add_noise_with_canaries() -> None:
            joins = (
                included & (torch.rand(self.m, generator=self._generator) < q) & insert
            )  # (m,) Poisson, like a record
            summed = getattr(weight, "summed_grad", None)  # (m, 1) the clipped sum Opacus keeps on the parameter
            if summed is None:
                raise RuntimeError("the DP optimizer has no clipped sum for the canary layer")
            summed[:, 0] += (c * signs * joins).to(summed)
            self.steps += 1
            self.insertions += int(joins.sum())
            add_noise()  # p.grad = clipped sum + noise
            released = weight.grad  # (m, 1)
            if released is None:
                raise RuntimeError("the DP optimizer set no noisy gradient on the canary layer")
            self._released += released[:, 0].detach().cpu().double() * signs_cpu

        opt.add_noise = add_noise_with_canaries

    def scores(self) -> np.ndarray:
        """(m,) per canary, the noisy gradients DP-SGD released on its coordinate, summed in its direction."""
        if self.carrier is None:
            raise RuntimeError("no canaried model: call wrap(model) and train it first")
        return self._released.numpy().copy()


def scale_noise(private: Any, factor: float) -> None:
    """Make ``private``'s DP-SGD add ``factor`` times its noise while its accountant records the planned σ.

    The audit's positive control (a *privacy violation*): with ``factor = 0.1`` the training is the
    σ/10 mutant of issue #23, whose recorded ε is the original claim. Only the noise shrinks: the clipped
    sum (canaries included, when :meth:`GradientCanaries.install` wraps this afterwards) is kept.
    """
    if not factor >= 0:
        raise ValueError(f"factor={factor}; need >= 0")
    opt = private.optimizer
    add_noise = opt.add_noise

    def add_scaled_noise() -> None:
        add_noise()  # p.grad = p.summed_grad + noise
        for p in opt.params:
            s = p.summed_grad.view_as(p)
            p.grad = s + factor * (p.grad - s)

    opt.add_noise = add_scaled_noise
