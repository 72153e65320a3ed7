"""How differently two variants of one model (teacher and student, DP and not) attribute the same inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from explain._model import make_predict_fn
from explain.agreement import explanation_distance
from explain.registry import get_explainer


def compare_variants(
    model_a: nn.Module,
    model_b: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    method: str = "shap-deep",
    k: int = 3,
    feature_names=None,
    labels: tuple[str, str] = ("teacher", "student"),
) -> dict[str, Any]:
    """How differently two variants of a model (e.g. teacher and student) attribute the same inputs.

    Both are explained with the same ``method`` and, for classifiers, toward the
    same class (``model_a``'s prediction), then compared with
    :func:`explain.explanation_distance`. Falls back to ``shap-gradient`` for a
    variant ``shap-deep`` cannot explain.

    Parameters
    ----------
    model_a, model_b : plain eval-mode modules with the same inputs.
    x : ``(n, F)`` or ``(n, C, H, W)`` inputs (test rows).
    background : reference inputs (the public split).
    task : "regression" or "classification".
    seed : explainer seed.
    method : registry name of the explainer.
    k : size of the top-k sets.
    feature_names : tabular feature names.
    labels : names of the two variants in the result.

    Returns
    -------
    JSON-safe dict: ``labels``, ``method`` per variant and the fields of
    :class:`explain.DistanceResult` (global Spearman, top-k overlap, L1 of
    normalised importances, mean per-row agreement).
    """
    targets = None
    if task == "classification":
        targets = make_predict_fn(model_a, task=task)(x).argmax(axis=1)
    used = []
    expls = []
    for model in (model_a, model_b):
        try:
            e = get_explainer(method)(
                model, x, background=background, task=task, seed=seed, feature_names=feature_names, targets=targets
            )
        except ValueError:
            if method != "shap-deep":
                raise
            e = get_explainer("shap-gradient")(
                model, x, background=background, task=task, seed=seed, feature_names=feature_names, targets=targets
            )
        used.append(e.method)
        expls.append(e)
    n_units = int(np.prod(expls[0].values.shape[2:])) if expls[0].is_image else expls[0].values.shape[1]
    dist = explanation_distance(expls[0], expls[1], k=min(k, n_units)).to_dict()
    return {"labels": list(labels), "methods": used, "n": int(len(x)), **dist}
