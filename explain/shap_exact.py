"""``shap-exact``: exact interventional Shapley values by enumerating every coalition.

For ``F`` features and a background of ``B`` rows, the value of a coalition
``S`` at row ``x`` is the mean model output over the background with the
features in ``S`` set to ``x``'s values (the interventional, or "baseline
Shapley", value function that shap's Kernel and Permutation explainers
estimate):

    v(S) = mean_b f(x_S, b_{~S})
    phi_i = sum_{S not containing i} |S|! (F - |S| - 1)! / F! * (v(S + i) - v(S))

Every one of the ``2**F`` coalitions is evaluated, so the values are exact (no
sampling, no model-specific propagation rule) up to float rounding; they sum to
``f(x) - mean_b f(b)`` by construction. Cost is ``2**F x B`` model evaluations
per row: 51,200 for 10 features and 50 background rows. Refused above
``max_features`` (default 14), where KernelExplainer or PermutationExplainer
sample coalitions instead. Written here rather than taken from shap because
shap 0.51 has no exact explainer for arbitrary (torch) models: its
``ExactExplainer`` needs a masker and enumerates orderings in Python, and its
KernelExplainer reaches exactness only through a weighted regression.
Deterministic: ``seed`` is recorded but unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from explain._checks import check_positive_int
from explain._model import Prepared, prepare
from explain.types import Explanation

NAME = "shap-exact"
MAX_FEATURES = 14  # default cap: 2^14 coalitions x 50 background rows = 819,200 model rows per explained row
_MAX_EVALS_PER_BATCH = 1 << 18  # model rows per forward batch group (bounded memory: ~20 MB at F=10)


def coalition_weights(n_features: int) -> np.ndarray:
    """Shapley weight ``|S|! (F - |S| - 1)! / F!`` indexed by coalition size ``|S|`` (0 .. F-1)."""
    f = n_features
    return np.array([math.factorial(s) * math.factorial(f - s - 1) / math.factorial(f) for s in range(f)])


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    max_features: int = MAX_FEATURES,
) -> Explanation:
    """Exact interventional Shapley values of a tabular ``model``.

    Parameters
    ----------
    model, x, background, task, seed, feature_names, targets
        As for :func:`explain.shap_deep.explain`; ``x`` must be ``(n, F)``.
    max_features : int
        Largest ``F`` accepted (cost doubles with every feature).

    Returns
    -------
    Explanation
        ``base_values`` is the mean explained output over the background;
        ``extras["n_coalitions"]`` is ``2**F``.

    Raises
    ------
    ValueError
        On invalid inputs, image inputs, or more than ``max_features`` features.
    """
    p = prepare(
        model,
        x,
        background=background,
        task=task,
        seed=seed,
        feature_names=feature_names,
        targets=targets,
        ndims=(2,),
        method=NAME,
    )
    f = _check_width(p.x.shape[1], max_features)
    bg = p.background.astype(np.float64)
    masks = ((np.arange(2**f)[:, None] >> np.arange(f)[None, :]) & 1).astype(bool)  # (2^F, F): bit j = feature j in S
    v_all = _coalition_values(p, bg, masks)  # (n, 2^F)
    values = _shapley_values(v_all, masks)  # (n, F)
    base = v_all[:, 0]  # empty coalition: mean output over the background
    return p.explanation(
        NAME,
        values,
        base,
        n_coalitions=2**f,
        background_size=int(bg.shape[0]),
        output=p.output_kind,
        max_additivity_gap=float(np.abs(base + values.sum(axis=1) - v_all[:, -1]).max()),
    )


def _check_width(n_features: int, max_features: int) -> int:
    """``n_features`` if ``2**n_features`` coalitions are within ``max_features``; else a ValueError naming the fix."""
    max_features = check_positive_int("max_features", max_features)
    if n_features > max_features:
        raise ValueError(
            f"shap-exact enumerates 2**F coalitions and F={n_features} exceeds max_features={max_features} "
            f"({2**n_features:,} coalitions per row); use shap-kernel or shap-deep, or raise max_features."
        )
    return n_features


def _coalition_values(p: Prepared, bg: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``v(S)`` of every coalition at every row, ``(n, 2^F)``: the mean explained output over the background.

    Rows are evaluated in groups of at most ``_MAX_EVALS_PER_BATCH`` model rows (bounded memory).
    """
    n, f = p.x.shape
    n_bg = bg.shape[0]
    per_batch = max(1, _MAX_EVALS_PER_BATCH // (2**f * n_bg))
    v_all = np.zeros((n, 2**f), dtype=np.float64)
    for lo in range(0, n, per_batch):
        rows = np.arange(lo, min(n, lo + per_batch))
        # (r, 2^F, B, F): row features where the coalition holds them, background elsewhere
        mixed = np.where(masks[None, :, None, :], p.x[rows][:, None, None, :], bg[None, None, :, :])
        out = np.asarray(p.predict(mixed.reshape(-1, f)), dtype=np.float64)
        if p.targets is not None:
            out = out.reshape(len(rows), 2**f * n_bg, -1)[np.arange(len(rows)), :, p.targets[rows]]
        v_all[rows] = out.reshape(len(rows), 2**f, n_bg).mean(axis=2)
    return v_all


def _shapley_values(v_all: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``phi_j = sum_{S not containing j} w(|S|) (v(S + j) - v(S))`` for every row and feature, ``(n, F)``."""
    f = masks.shape[1]
    sizes = masks.sum(axis=1)
    weights = coalition_weights(f)
    values = np.zeros((v_all.shape[0], f), dtype=np.float64)
    for j in range(f):
        without = np.flatnonzero(~masks[:, j])  # coalitions S not containing j
        with_j = without | (1 << j)
        values[:, j] = (v_all[:, with_j] - v_all[:, without]) @ weights[sizes[without]]
    return values
