"""``shap-deep``: shap.DeepExplainer (DeepLIFT rescale, averaged over the background).

Additive: for each row, ``base + values.sum() == output`` up to float32
rounding, where ``base`` is the mean explained output over the background. Not
exact: DeepLIFT's rescale rule approximates Shapley values (on the default MLP
regressor its values differ from exact enumeration by up to ~20% of the largest
value); use ``shap-exact`` where 2^F coalitions are affordable and measure the
error elsewhere (:func:`explain.reference_error`).
Works only on models built from modules shap knows (``nn.Linear``,
``nn.Conv2d``, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Flatten``); with functional
activations or norm layers shap's own additivity check fails and raises.
Deterministic: ``seed`` is recorded but unused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from explain._model import Prepared, clean_shap_attributes, prepare, single_output_model
from explain.types import Explanation

NAME = "shap-deep"
_log = logging.getLogger(__name__)


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    check_additivity: bool = True,
) -> Explanation:
    """Explain ``model`` with shap.DeepExplainer.

    Parameters
    ----------
    model : nn.Module
        Eval-mode regressor ``(N, F) -> (N, 1)`` or classifier ``-> (N, K)`` logits.
    x : np.ndarray
        ``(n, F)`` or ``(n, C, H, W)`` inputs to explain.
    background : np.ndarray
        Reference rows, same feature shape; cost grows linearly with its size
        (50-100 rows is plenty).
    task : {"regression", "classification"}
        Classification explains the logit of ``targets`` (default: predicted class).
    seed : int
        Recorded only (the method is deterministic).
    feature_names : sequence of str, optional
        Tabular feature names.
    targets : np.ndarray, optional
        ``(n,)`` classes to explain.
    check_additivity : bool
        Raise if ``|base + sum(values) - output|`` exceeds
        ``1e-3 * max(1, max |output - base|)`` for any row: the sign that the
        model has an operation DeepLIFT cannot pass through.

    Returns
    -------
    Explanation
        ``base_values`` is the mean explained output over the background.

    Raises
    ------
    ValueError
        On invalid inputs, or if ``check_additivity`` fails.
    """
    import shap  # before prepare() starts the clock: the import is not timed

    p = prepare(model, x, background=background, task=task, seed=seed, feature_names=feature_names, targets=targets)
    values, base = _deeplift(p, shap.DeepExplainer)
    gap = np.abs(base + values.reshape(len(base), -1).sum(axis=1) - p.outputs)
    if check_additivity:
        _check_additivity(p, gap, base)
    _log.debug("%s: %d rows in %.2f s", NAME, p.x.shape[0], p.elapsed())
    return p.explanation(
        NAME,
        values,
        base,
        background_size=int(p.background.shape[0]),
        output=p.output_kind,
        max_additivity_gap=float(gap.max()),
    )


def _deeplift(p: Prepared, deep_explainer: type) -> tuple[np.ndarray, np.ndarray]:
    """DeepLIFT values ``(n, *feature_shape)`` and base values ``(n,)``, one ``deep_explainer`` per explained class.

    The model is cut to that class's logit, so shap back-propagates one output instead of all K.
    """
    values = np.zeros(p.x.shape, dtype=np.float64)
    base = np.zeros(p.x.shape[0], dtype=np.float64)
    bg = torch.from_numpy(p.background)
    for target, rows in p.target_groups():
        sub = single_output_model(p.model, task=p.task, n_classes=p.n_classes, target=target)
        with clean_shap_attributes(sub):
            explainer = deep_explainer(sub, bg)
            # shap's own check is an `assert` (gone under -O) with a fixed 1e-2
            # tolerance; ours (_check_additivity) raises a ValueError that says what to do.
            phi = explainer.shap_values(torch.from_numpy(p.x[rows]), check_additivity=False)
        phi = np.asarray(phi)
        values[rows] = phi.reshape((len(rows),) + p.x.shape[1:])  # drop shap's trailing output axis
        base[rows] = float(np.asarray(explainer.expected_value).reshape(-1)[0])
    return values, base


def _check_additivity(p: Prepared, gap: np.ndarray, base: np.ndarray) -> None:
    """Raise if ``base + sum(values)`` misses the output by more than ``1e-3 * max(1, max |output - base|)``."""
    tolerance = 1e-3 * max(1.0, float(np.abs(p.outputs - base).max()))
    if gap.max() > tolerance:
        raise ValueError(
            f"shap-deep values miss the model output by up to {gap.max():.3g} (tolerance {tolerance:.3g}); "
            f"the model has operations DeepLIFT cannot propagate (unknown modules: {_unknown_modules(p.model)}, "
            "or functional calls such as F.relu, or norm layers). Build it from nn.ReLU/nn.MaxPool2d/nn.Linear/"
            "nn.Conv2d modules, or use shap-gradient."
        )


def _unknown_modules(model: nn.Module) -> list[str]:
    """Leaf module types shap's DeepExplainer has no rule for."""
    from shap.explainers._deep.deep_pytorch import op_handler

    leaves = {type(m).__name__ for m in model.modules() if not list(m.children())}
    return sorted(leaves - set(op_handler))
