"""Feature dependence of a tabular model: partial dependence and ICE curves, and SHAP interaction partners.

Partial dependence is computed by scikit-learn's :func:`sklearn.inspection.partial_dependence`
(``method="brute"``, ``kind="both"``), not by hand: a well-kept implementation an auditor
already knows. It needs a fitted scikit-learn regressor, so a torch model's predict function is
wrapped in :class:`PredictFnRegressor`, a minimal ``BaseEstimator``/``RegressorMixin`` whose
``predict`` calls the function. The grid and the rows averaged over are whatever ``X`` the caller
passes (the explain stage passes the public background, never private training rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.inspection import partial_dependence as sk_partial_dependence

from explain._model import scoped_numpy_seed

__all__ = ["PredictFnRegressor", "PartialDependenceResult", "partial_dependence", "strongest_interaction"]


class PredictFnRegressor(RegressorMixin, BaseEstimator):
    """A scikit-learn regressor around an already trained ``predict(X) -> (n,)`` function.

    ``fit`` learns nothing (the model is trained elsewhere); it only records the input width, which
    is what scikit-learn's fitted-check and input validation look at.

    Parameters
    ----------
    predict_fn : maps an ``(n, F)`` float array to ``(n,)`` (or ``(n, 1)``) outputs.
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray]):
        self.predict_fn = predict_fn

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> PredictFnRegressor:
        """Record the input width; returns self."""
        self.n_features_in_ = int(np.asarray(X).shape[1])
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The wrapped function's outputs, flattened to ``(n,)``."""
        return np.asarray(self.predict_fn(np.asarray(X, dtype=np.float64)), dtype=np.float64).reshape(len(X))


@dataclass(frozen=True)
class PartialDependenceResult:
    """Partial dependence of the output on one feature."""

    feature: int  # column index
    grid: np.ndarray  # (G,) feature values
    average: np.ndarray  # (G,) mean output over the rows of X at each grid value (the PDP)
    individual: np.ndarray  # (n, G) each row's output with the feature set to each grid value (ICE)


def partial_dependence(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    X: np.ndarray,
    feature: int,
    *,
    grid_resolution: int = 20,
    percentiles: tuple[float, float] = (0.05, 0.95),
) -> PartialDependenceResult:
    """PDP and ICE curves of ``predict_fn`` for one feature, over the rows of ``X``.

    Parameters
    ----------
    predict_fn : ``(n, F) -> (n,)`` model outputs.
    X : ``(n, F)`` rows averaged over; the grid spans their ``percentiles`` of the feature.
    feature : column index.
    grid_resolution : at most this many grid values (fewer if the feature has fewer distinct values).
    percentiles : the grid's range as quantiles of the feature in ``X``.

    Raises
    ------
    ValueError
        If ``X`` is not 2-D or ``feature`` is out of range.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D table (n, F); got shape {X.shape}.")
    if not 0 <= feature < X.shape[1]:
        raise ValueError(f"feature={feature} is out of range; pass 0 <= feature < {X.shape[1]}.")
    est = PredictFnRegressor(predict_fn).fit(X)
    res = sk_partial_dependence(
        est, X, [feature], kind="both", method="brute", grid_resolution=grid_resolution, percentiles=percentiles
    )
    return PartialDependenceResult(
        feature=int(feature),
        grid=np.asarray(res["grid_values"][0], dtype=np.float64),
        average=np.asarray(res["average"][0], dtype=np.float64),
        individual=np.asarray(res["individual"][0], dtype=np.float64),
    )


def strongest_interaction(values: np.ndarray, inputs: np.ndarray, feature: int) -> int:
    """The feature shap's dependence plot would colour ``feature`` by (``shap.utils.approximate_interactions``).

    Computed here rather than left to ``shap.plots.scatter(color=...)`` so the report can name it;
    shap shuffles with numpy's global RNG, so the call is seeded (and the global state restored).
    """
    from shap.utils import approximate_interactions

    with scoped_numpy_seed(0):
        order = approximate_interactions(feature, np.asarray(values), np.asarray(inputs))
    return int(order[0])
