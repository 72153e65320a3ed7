"""Sanity checks for attributions: model-parameter randomisation (Adebayo et al., 2018).

An attribution that describes the *model* must change when the model's learned
weights are destroyed. :func:`model_randomisation` re-initialises every layer
at once (not cascading: one check, all layers), re-explains the same inputs
toward the same outputs, and reports the per-row Spearman rank correlation
between the trained and randomised attributions, signed and absolute. It also
reports how well the input alone, ``|x - baseline|``, ranks the trained
absolute attributions: when that is high, rankings by |attribution| (top-k
agreement, stability, deletion order) carry an input-driven part that is not
evidence about the model.

:func:`class_randomisation` is the cheap classifier counterpart: the same
model, the explained logit swapped for a random other class.

Rule (stated in the result): a check passes when the mean correlation between
original and randomised attributions is below ``threshold`` in absolute value.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from explain._arrays import Result, unit_attributions
from explain._checks import check_seed
from explain.types import Explanation

__all__ = ["RandomisationResult", "randomised_copy", "model_randomisation", "class_randomisation"]


def randomised_copy(model: nn.Module, *, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer's parameters re-initialised (seeded), in eval mode.

    Uses each module's own ``reset_parameters`` (PyTorch's default initialisers),
    inside a forked RNG so the caller's global torch state is untouched.

    Raises
    ------
    ValueError
        If no layer of ``model`` has ``reset_parameters``.
    """
    clone = copy.deepcopy(model)
    layers = [m for m in clone.modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer with reset_parameters(); cannot randomise it.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        for m in layers:
            m.reset_parameters()
    return clone.eval()


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array(
        [
            spearmanr(a[i], b[i]).statistic if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0 else np.nan
            for i in range(a.shape[0])
        ]
    )


@dataclass(frozen=True)
class RandomisationResult(Result):
    """Trained vs randomised-weights attributions of the same inputs (per-row Spearman, then mean)."""

    method: str
    n: int
    randomisation: str  # which weights were re-initialised and how
    seed: int
    threshold: float
    spearman_signed: float
    spearman_abs: float
    input_only_spearman_abs: float  # |x - baseline| vs the trained |attribution|
    passed_signed: bool
    passed_abs: bool
    rule: str
    per_row_signed: tuple[float, ...]
    per_row_abs: tuple[float, ...]


def model_randomisation(
    explain_fn: Callable[[nn.Module], Explanation],
    model: nn.Module,
    trained: Explanation,
    *,
    seed: int,
    baseline: np.ndarray,
    threshold: float = 0.5,
) -> RandomisationResult:
    """Model-parameter randomisation test of an explanation.

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model) -> Explanation`` of the same inputs and targets as
        ``trained`` (the caller fixes inputs, background, targets and seed).
    model : nn.Module
        The trained model; it is copied, never changed.
    trained : Explanation
        ``explain_fn(model)``, already computed.
    seed : int
        Seed of the re-initialisation.
    baseline : np.ndarray
        Reference input of the input-only comparison (e.g. the background mean).
    threshold : float
        Pass when ``|mean Spearman| < threshold``.

    Returns
    -------
    RandomisationResult
    """
    rand = explain_fn(randomised_copy(model, seed=seed))
    return _compare(
        trained,
        rand,
        baseline=baseline,
        threshold=threshold,
        seed=seed,
        how="all layers re-initialised at once (PyTorch default initialisers), not cascading",
    )


def class_randomisation(
    explain_fn: Callable[[np.ndarray], Explanation],
    trained: Explanation,
    *,
    n_classes: int,
    seed: int,
    baseline: np.ndarray,
    threshold: float = 0.5,
) -> RandomisationResult:
    """Logit-randomisation check of a classifier's explanation: does it depend on the class explained?

    Each input is re-explained toward a random *other* class (seeded) with the same trained model. An
    attribution that hardly changes with the class explains the input, not the decision (Adebayo et al.'s
    label randomisation retrains on shuffled labels; this cheaper check swaps the explained logit instead).

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(targets) -> Explanation`` of the same inputs as ``trained`` toward ``targets``.
    trained : Explanation
        The explanation toward the original classes (``targets`` not None).
    n_classes : int
        Number of classes K (>= 2).
    seed, baseline, threshold
        As for :func:`model_randomisation`.

    Returns
    -------
    RandomisationResult

    Raises
    ------
    ValueError
        If ``trained`` has no targets or ``n_classes < 2``.
    """
    if trained.targets is None or n_classes < 2:
        raise ValueError("class_randomisation needs a classifier's explanation (targets) and n_classes >= 2.")
    rng = np.random.default_rng(check_seed(seed))
    other = (trained.targets + rng.integers(1, n_classes, size=trained.n)) % n_classes  # never the same class
    return _compare(
        trained,
        explain_fn(other),
        baseline=baseline,
        threshold=threshold,
        seed=seed,
        how="explained logit replaced by a random other class's logit (same trained model)",
    )


def _compare(
    trained: Explanation, other: Explanation, *, baseline: np.ndarray, threshold: float, seed: int, how: str
) -> RandomisationResult:
    a, b = unit_attributions(trained), unit_attributions(other)
    diff = np.abs(trained.inputs - np.broadcast_to(np.asarray(baseline, dtype=np.float64), trained.feature_shape))
    inp = diff.sum(axis=1).reshape(trained.n, -1) if trained.is_image else diff.reshape(trained.n, -1)
    signed, absolute = _row_spearman(a, b), _row_spearman(np.abs(a), np.abs(b))
    inp_rho = _row_spearman(inp, np.abs(a))
    s, ab = float(np.nanmean(signed)), float(np.nanmean(absolute))
    return RandomisationResult(
        method=trained.method,
        n=trained.n,
        randomisation=how,
        seed=int(seed),
        threshold=float(threshold),
        spearman_signed=s,
        spearman_abs=ab,
        input_only_spearman_abs=float(np.nanmean(inp_rho)),
        passed_signed=bool(abs(s) < threshold),
        passed_abs=bool(abs(ab) < threshold),
        rule=f"pass when |mean Spearman(original, randomised)| < {threshold:g}",
        per_row_signed=tuple(float(v) for v in signed),
        per_row_abs=tuple(float(v) for v in absolute),
    )
