"""How far to trust an explanation: additivity, faithfulness, agreement, stability.

Pure functions over :class:`~explain.types.Explanation` objects and a
``predict`` function (``(m, *feature_shape) -> (m,)`` for regression or
``(m, K)`` logits; :func:`explain.make_predict_fn` builds one from a model).
Each returns a small frozen dataclass whose ``to_dict()`` is JSON-safe.

Agreement, stability and distance live in :mod:`explain.agreement` and are
re-exported here. Images are compared per pixel: attributions are summed over channels, and a
pixel is removed or inserted in all channels at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explain._arrays import PredictFn, Result, explained_output, unit_attributions
from explain._checks import check_positive_int, check_seed
from explain.agreement import (
    AgreementResult,
    DistanceResult,
    StabilityResult,
    agreement,
    explanation_distance,
    stability,
)
from explain.types import Explanation

__all__ = [
    "AdditivityResult",
    "DeletionInsertionResult",
    "AgreementResult",
    "StabilityResult",
    "DistanceResult",
    "additivity_error",
    "deletion_insertion",
    "agreement",
    "stability",
    "explanation_distance",
]


@dataclass(frozen=True)
class AdditivityResult(Result):
    """``|base + sum(values) - output|`` over rows; relative to mean ``|output - base|``."""

    method: str
    n: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    scale: float  # mean |output - base|, the magnitude the values must explain


def additivity_error(expl: Explanation, predict: PredictFn | None = None) -> AdditivityResult:
    """Check that SHAP values sum to the model output minus the base value.

    Parameters
    ----------
    expl : Explanation
        A SHAP explanation (``base_values`` not None).
    predict : callable, optional
        If given, the outputs are recomputed from the model rather than taken
        from ``expl.outputs``.

    Returns
    -------
    AdditivityResult

    Raises
    ------
    ValueError
        If ``expl`` has no base values, or is a LIME explanation (its
        ``base + values`` equals its surrogate's prediction; judge LIME by
        ``extras["score"]`` instead).
    """
    if expl.base_values is None or expl.method.startswith("lime"):
        raise ValueError(
            f"additivity is a SHAP property and {expl.method!r} has no comparable base value; "
            "use it on shap-* explanations (for LIME read extras['score'])."
        )
    out = expl.outputs if predict is None else explained_output(predict, expl.inputs, expl.targets)
    err = np.abs(expl.base_values + expl.values.reshape(expl.n, -1).sum(axis=1) - out)
    scale = max(float(np.abs(out - expl.base_values).mean()), 1e-12)
    return AdditivityResult(
        method=expl.method,
        n=expl.n,
        max_abs_error=float(err.max()),
        mean_abs_error=float(err.mean()),
        max_rel_error=float(err.max() / scale),
        mean_rel_error=float(err.mean() / scale),
        scale=scale,
    )


@dataclass(frozen=True)
class DeletionInsertionResult(Result):
    """Deletion/insertion AUCs (x axis: fraction of features, in [0, 1]).

    ``deletion_gain = random_deletion_auc - deletion_auc`` and
    ``insertion_gain = insertion_auc - random_insertion_auc``: positive means
    the attribution order beats a random order. ``*_win_rate``: fraction of
    rows where it does. ``output_scale``: mean ``|f(x) - f(baseline)|``, to
    compare gains across models. Curves are means over rows.
    """

    method: str
    n: int
    n_steps: int
    n_random: int
    seed: int
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    deletion_gain: float
    insertion_gain: float
    deletion_win_rate: float
    insertion_win_rate: float
    output_scale: float
    fractions: tuple[float, ...]
    deletion_curve: tuple[float, ...]
    insertion_curve: tuple[float, ...]
    random_deletion_curve: tuple[float, ...]
    random_insertion_curve: tuple[float, ...]


def deletion_insertion(
    expl: Explanation,
    predict: PredictFn,
    *,
    baseline: float | np.ndarray,
    n_steps: int = 16,
    seed: int,
    n_random: int = 3,
) -> DeletionInsertionResult:
    """Faithfulness by removing (deletion) or adding (insertion) features in attribution order.

    Features (pixels for images) are ranked by decreasing signed attribution.
    Deletion replaces the top ones with ``baseline`` step by step and tracks the
    explained output; insertion starts from ``baseline`` and restores them.
    The same is done for ``n_random`` seeded random orders per row.

    Parameters
    ----------
    expl : Explanation
        The explanation to test.
    predict : callable
        ``(m, *feature_shape) -> (m,)`` or ``(m, K)`` logits.
    baseline : float or np.ndarray
        Value of a removed feature: a scalar or an array broadcastable to the
        feature shape (e.g. the background mean).
    n_steps : int
        Number of steps from nothing to all features removed (capped at the
        number of features).
    seed : int
        Seed of the random orders.
    n_random : int
        Random orders per row averaged into the random reference.

    Returns
    -------
    DeletionInsertionResult

    Raises
    ------
    ValueError
        If ``baseline`` does not broadcast to the feature shape or an integer
        argument is out of range.
    """
    n_steps = check_positive_int("n_steps", n_steps)
    n_random = check_positive_int("n_random", n_random)
    rng = np.random.default_rng(check_seed(seed))
    base = _feature_baseline(baseline, expl.feature_shape)
    scores = unit_attributions(expl)  # (n, U)
    n_steps = min(n_steps, scores.shape[1])
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    curves = np.zeros((expl.n, 2, 1 + n_random, n_steps + 1))  # (row, del/ins, order, step)
    for i in range(expl.n):
        orders = [np.argsort(-scores[i], kind="stable")] + [rng.permutation(scores.shape[1]) for _ in range(n_random)]
        curves[i] = _row_curves(expl, i, predict=predict, base=base, orders=orders, fractions=fractions)
    return _summary(expl, curves, fractions, n_random=n_random, seed=seed)


def _feature_baseline(baseline: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``baseline`` broadcast to the feature shape, float64; a ValueError naming the shapes if it does not fit."""
    try:
        return np.broadcast_to(np.asarray(baseline, dtype=np.float64), shape)
    except ValueError as err:
        raise ValueError(
            f"baseline of shape {np.shape(baseline)} does not broadcast to the feature shape {shape}; "
            "pass a scalar or e.g. background.mean(axis=0)."
        ) from err


def _row_curves(
    expl: Explanation,
    i: int,
    *,
    predict: PredictFn,
    base: np.ndarray,
    orders: list[np.ndarray],
    fractions: np.ndarray,
) -> np.ndarray:
    """Row ``i``'s explained output as the first units of each order are removed (deletion) or restored (insertion).

    Returns ``(2, orders, steps)``: deletion then insertion, orders as given, one point per fraction.
    """
    shape = expl.feature_shape
    n_units = len(orders[0])
    counts = np.round(fractions * n_units).astype(int)  # units removed at each step
    x_units = expl.inputs[i].reshape((shape[0], -1) if expl.is_image else (-1,))
    b_units = base.reshape((shape[0], -1) if expl.is_image else (-1,))
    batch = []
    for order in orders:
        rank = np.empty(n_units, dtype=int)
        rank[order] = np.arange(n_units)
        top = rank[None, :] < counts[:, None]  # (steps, U): unit among the first `count`
        if expl.is_image:
            top = top[:, None, :]  # same pixel in every channel
        batch.append(np.where(top, b_units, x_units))  # deletion
        batch.append(np.where(top, x_units, b_units))  # insertion
    inputs = np.concatenate(batch).reshape((-1,) + shape)
    tgt = None if expl.targets is None else expl.targets[i]
    out = explained_output(predict, inputs, tgt).reshape(len(orders), 2, len(fractions))
    return out.transpose(1, 0, 2)


def _summary(
    expl: Explanation, curves: np.ndarray, fractions: np.ndarray, *, n_random: int, seed: int
) -> DeletionInsertionResult:
    """AUCs, gains over the random orders, win rates and mean curves from the per-row ``curves``."""
    auc = np.trapezoid(curves, fractions, axis=-1)  # (n, 2, orders)
    rand = auc[:, :, 1:].mean(axis=2)  # (n, 2)
    mean_curve = curves.mean(axis=0)
    f_x, f_b = curves[:, 0, 0, 0], curves[:, 0, 0, -1]
    return DeletionInsertionResult(
        method=expl.method,
        n=expl.n,
        n_steps=len(fractions) - 1,
        n_random=n_random,
        seed=int(seed),
        deletion_auc=float(auc[:, 0, 0].mean()),
        insertion_auc=float(auc[:, 1, 0].mean()),
        random_deletion_auc=float(rand[:, 0].mean()),
        random_insertion_auc=float(rand[:, 1].mean()),
        deletion_gain=float((rand[:, 0] - auc[:, 0, 0]).mean()),
        insertion_gain=float((auc[:, 1, 0] - rand[:, 1]).mean()),
        deletion_win_rate=float((auc[:, 0, 0] < rand[:, 0]).mean()),
        insertion_win_rate=float((auc[:, 1, 0] > rand[:, 1]).mean()),
        output_scale=float(np.abs(f_x - f_b).mean()),
        fractions=tuple(float(f) for f in fractions),
        deletion_curve=tuple(float(v) for v in mean_curve[0, 0]),
        insertion_curve=tuple(float(v) for v in mean_curve[1, 0]),
        random_deletion_curve=tuple(float(v) for v in mean_curve[0, 1:].mean(axis=0)),
        random_insertion_curve=tuple(float(v) for v in mean_curve[1, 1:].mean(axis=0)),
    )
