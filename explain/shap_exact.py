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
import time
from collections.abc import Sequence

import numpy as np
from torch import nn

from explain._checks import check_positive_int
from explain._model import prepare
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
    start = time.perf_counter()
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
    max_features = check_positive_int("max_features", max_features)
    n, f = p.x.shape
    if f > max_features:
        raise ValueError(
            f"shap-exact enumerates 2**F coalitions and F={f} exceeds max_features={max_features} "
            f"({2**f:,} coalitions per row); use shap-kernel or shap-deep, or raise max_features."
        )
    bg = p.background.astype(np.float64)
    n_bg = bg.shape[0]
    masks = ((np.arange(2**f)[:, None] >> np.arange(f)[None, :]) & 1).astype(bool)  # (2^F, F): bit j = feature j in S
    sizes = masks.sum(axis=1)
    weights = coalition_weights(f)
    per_batch = max(1, _MAX_EVALS_PER_BATCH // (2**f * n_bg))
    values = np.zeros((n, f), dtype=np.float64)
    v_all = np.zeros((n, 2**f), dtype=np.float64)
    for lo in range(0, n, per_batch):
        rows = np.arange(lo, min(n, lo + per_batch))
        # (r, 2^F, B, F): row features where the coalition holds them, background elsewhere
        mixed = np.where(masks[None, :, None, :], p.x[rows][:, None, None, :], bg[None, None, :, :])
        out = np.asarray(p.predict(mixed.reshape(-1, f)), dtype=np.float64)
        if p.targets is not None:
            out = out.reshape(len(rows), 2**f * n_bg, -1)[np.arange(len(rows)), :, p.targets[rows]]
        v_all[rows] = out.reshape(len(rows), 2**f, n_bg).mean(axis=2)
    for j in range(f):
        without = np.flatnonzero(~masks[:, j])  # coalitions S not containing j
        with_j = without | (1 << j)
        values[:, j] = (v_all[:, with_j] - v_all[:, without]) @ weights[sizes[without]]
    base = v_all[:, 0]  # empty coalition: mean output over the background
    return p.explanation(
        NAME,
        values,
        base,
        seconds=time.perf_counter() - start,
        n_coalitions=2**f,
        background_size=int(n_bg),
        output=p.output_kind,
        max_additivity_gap=float(np.abs(base + values.sum(axis=1) - v_all[:, -1]).max()),
    )
