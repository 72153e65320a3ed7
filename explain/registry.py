"""Explainer registry: one module per member, looked up by name.

Every member is a function with the signature of :class:`ExplainerFn` and
returns an :class:`~explain.types.Explanation`. Members are imported lazily, so
``import explain`` does not import shap or lime.

====================  =========================================  ================
name                  what                                       inputs
====================  =========================================  ================
``shap-exact``        exact interventional Shapley (all 2^F      tabular, F <= 14
                      coalitions enumerated against background)
``shap-permutation``  shap.PermutationExplainer: sampled         tabular, any F
                      orderings, additive by construction
``shap-deep``         shap.DeepExplainer (DeepLIFT): additive,   tabular, image
                      but an approximation of Shapley values
``shap-gradient``     shap.GradientExplainer (expected           tabular, image
                      gradients)
``shap-kernel``       shap.KernelExplainer, model-agnostic       tabular
``lime-tabular``      lime LimeTabularExplainer (regression)     tabular
``lime-image``        lime LimeImageExplainer on a pixel grid    image
====================  =========================================  ================

For tabular models with up to 14 features use ``shap-exact``: its values are
the exact interventional Shapley values. Beyond that :func:`tabular_shap_method`
picks ``shap-permutation`` (a sampling estimate of the same values: measure its
error against a reference). For images (64+ pixels: not
enumerable) ``shap-deep`` is fast and additive (its values sum to
``output - base``), but additivity does not make them Shapley values: measure
their error against a sampling reference (:func:`explain.reference_error`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from torch import nn

from explain.types import Explanation

__all__ = ["ExplainerFn", "available_explainers", "get_explainer", "explain_all", "tabular_shap_method"]

MAX_EXACT_FEATURES = 14  # shap-exact's default cap (explain.shap_exact.MAX_FEATURES; a test checks they agree)

_MEMBERS: Mapping[str, str] = {
    "shap-exact": "explain.shap_exact",
    "shap-deep": "explain.shap_deep",
    "shap-gradient": "explain.shap_gradient",
    "shap-kernel": "explain.shap_kernel",
    "shap-permutation": "explain.shap_permutation",
    "lime-tabular": "explain.lime_tabular",
    "lime-image": "explain.lime_image",
}
# The keyword arguments every member takes; anything else is a member option.
_COMMON = frozenset({"background", "task", "seed", "feature_names", "targets"})


class ExplainerFn(Protocol):
    """What every registry member is."""

    def __call__(
        self,
        model: nn.Module,
        x: np.ndarray,
        *,
        background: np.ndarray,
        task: str,
        seed: int,
        feature_names: Sequence[str] | None = None,
        targets: np.ndarray | None = None,
        **opts: Any,
    ) -> Explanation:
        """Explain ``model`` at the rows of ``x``."""
        ...


def available_explainers() -> tuple[str, ...]:
    """Names accepted by :func:`get_explainer`, sorted."""
    return tuple(sorted(_MEMBERS))


def tabular_shap_method(n_features: int) -> str:
    """The tabular SHAP method for ``n_features`` features: ``shap-exact`` up to its cap, else ``shap-permutation``.

    Choose it before any work: ``shap-exact`` refuses more than :data:`MAX_EXACT_FEATURES` features
    (2^F coalitions per row), so asking it anyway fails only after everything before it has run.
    """
    return "shap-exact" if n_features <= MAX_EXACT_FEATURES else "shap-permutation"


def get_explainer(name: str) -> ExplainerFn:
    """Return the explainer registered under ``name``.

    Parameters
    ----------
    name : str
        One of :func:`available_explainers`.

    Returns
    -------
    ExplainerFn
        ``explain(model, x, *, background, task, seed, feature_names=None,
        targets=None, **opts) -> Explanation``. An unknown option raises
        ValueError listing the member's valid options.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the valid names.
    """
    if name not in _MEMBERS:
        raise ValueError(f"Unknown explainer {name!r}; valid names are {list(available_explainers())}.")
    fn = importlib.import_module(_MEMBERS[name]).explain
    params = inspect.signature(fn).parameters
    valid = sorted(p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY and p not in _COMMON)

    @functools.wraps(fn)
    def checked(model: nn.Module, x: np.ndarray, **kwargs: Any) -> Explanation:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"{name} got unknown option(s) {unknown}; its options are {valid}.")
        return fn(model, x, **kwargs)

    checked.options = tuple(valid)  # type: ignore[attr-defined]
    return checked


def explain_all(
    model: nn.Module,
    x: np.ndarray,
    *,
    methods: Sequence[str],
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Explanation]:
    """Run several explainers on the same inputs with the same seed.

    Parameters
    ----------
    model, x, background, task, seed, feature_names, targets
        As for :class:`ExplainerFn`. When ``targets`` is None each method
        explains the predicted class, which is the same for all methods.
    methods : sequence of str
        Registry names, run in this order.
    options : mapping, optional
        Per-method options, e.g. ``{"lime-image": {"num_samples": 300}}``.

    Returns
    -------
    dict of str to Explanation
        One explanation per method, keyed by name.

    Raises
    ------
    ValueError
        For an unknown method, or options for a method not in ``methods``.
    """
    options = dict(options or {})
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ValueError(
            f"options given for {stray}, which are not in methods={list(methods)}; remove them or add the methods."
        )
    return {
        name: get_explainer(name)(
            model,
            x,
            background=background,
            task=task,
            seed=seed,
            feature_names=feature_names,
            targets=targets,
            **dict(options.get(name, {})),
        )
        for name in methods
    }
