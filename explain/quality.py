"""How far to trust an explanation: additivity, faithfulness, agreement, stability.

Pure functions over :class:`~explain.types.Explanation` objects and a
``predict`` function (``(m, *feature_shape) -> (m,)`` for regression or
``(m, K)`` logits; :func:`explain.make_predict_fn` builds one from a model).
Each returns a small frozen dataclass whose ``to_dict()`` is JSON-safe.

Images are compared per pixel: attributions are summed over channels, and a
pixel is removed or inserted in all channels at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from explain._checks import check_k, check_positive_int, check_seed
from explain.types import Explanation, json_safe

__all__ = [
    "AdditivityResult", "DeletionInsertionResult", "AgreementResult", "StabilityResult", "DistanceResult",
    "additivity_error", "deletion_insertion", "agreement", "stability", "explanation_distance",
]
PredictFn = Callable[[np.ndarray], np.ndarray]


class _Result:
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (NaN becomes None)."""
        return json_safe(asdict(self))  # type: ignore[call-overload]


def _units(expl: Explanation, *, sum_channels: bool = True) -> np.ndarray:
    """Attributions as ``(n, U)``: features, or pixels (channels summed) for images."""
    v = expl.values
    if expl.is_image and sum_channels:
        v = v.sum(axis=1)
    return v.reshape(expl.n, -1)


def _explained_output(predict: PredictFn, x: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    out = np.asarray(predict(x), dtype=np.float64)
    if targets is None:
        return out.reshape(-1)
    if out.ndim != 2:
        raise ValueError(f"predict returned shape {out.shape}; a classifier's predict must return (m, K) logits.")
    return out[np.arange(out.shape[0]), targets] if targets.shape == (out.shape[0],) else out[:, int(targets)]


def _topk(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |v| per row; ties broken by index (stable)."""
    return np.argsort(-np.abs(v), axis=1, kind="stable")[:, :k]


@dataclass(frozen=True)
class AdditivityResult(_Result):
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
    out = expl.outputs if predict is None else _explained_output(predict, expl.inputs, expl.targets)
    err = np.abs(expl.base_values + expl.values.reshape(expl.n, -1).sum(axis=1) - out)
    scale = max(float(np.abs(out - expl.base_values).mean()), 1e-12)
    return AdditivityResult(
        method=expl.method, n=expl.n, max_abs_error=float(err.max()), mean_abs_error=float(err.mean()),
        max_rel_error=float(err.max() / scale), mean_rel_error=float(err.mean() / scale), scale=scale,
    )


@dataclass(frozen=True)
class DeletionInsertionResult(_Result):
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
    shape = expl.feature_shape
    try:
        base = np.broadcast_to(np.asarray(baseline, dtype=np.float64), shape)
    except ValueError as err:
        raise ValueError(
            f"baseline of shape {np.shape(baseline)} does not broadcast to the feature shape {shape}; "
            "pass a scalar or e.g. background.mean(axis=0)."
        ) from err
    scores = _units(expl)  # (n, U)
    n_units = scores.shape[1]
    n_steps = min(n_steps, n_units)
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    counts = np.round(fractions * n_units).astype(int)  # units removed at each step
    x_units = expl.inputs.reshape((expl.n,) + ((shape[0], -1) if expl.is_image else (-1,)))
    b_units = base.reshape((shape[0], -1) if expl.is_image else (-1,))
    curves = np.zeros((expl.n, 2, 1 + n_random, n_steps + 1))  # (row, del/ins, order, step)
    for i in range(expl.n):
        orders = [np.argsort(-scores[i], kind="stable")] + [rng.permutation(n_units) for _ in range(n_random)]
        batch = []
        for order in orders:
            rank = np.empty(n_units, dtype=int)
            rank[order] = np.arange(n_units)
            top = rank[None, :] < counts[:, None]  # (steps, U): unit among the first `count`
            if expl.is_image:
                top = top[:, None, :]  # same pixel in every channel
            batch.append(np.where(top, b_units, x_units[i]))  # deletion
            batch.append(np.where(top, x_units[i], b_units))  # insertion
        inputs = np.concatenate(batch).reshape((-1,) + shape)
        tgt = None if expl.targets is None else expl.targets[i]
        out = _explained_output(predict, inputs, tgt).reshape(len(orders), 2, n_steps + 1)
        curves[i] = out.transpose(1, 0, 2)
    auc = np.trapezoid(curves, fractions, axis=-1)  # (n, 2, orders)
    rand = auc[:, :, 1:].mean(axis=2)  # (n, 2)
    mean_curve = curves.mean(axis=0)
    f_x, f_b = curves[:, 0, 0, 0], curves[:, 0, 0, -1]
    return DeletionInsertionResult(
        method=expl.method, n=expl.n, n_steps=n_steps, n_random=n_random, seed=int(seed),
        deletion_auc=float(auc[:, 0, 0].mean()), insertion_auc=float(auc[:, 1, 0].mean()),
        random_deletion_auc=float(rand[:, 0].mean()), random_insertion_auc=float(rand[:, 1].mean()),
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


def _check_pair(a: Explanation, b: Explanation) -> None:
    if a.values.shape != b.values.shape:
        raise ValueError(
            f"explanations have shapes {a.values.shape} ({a.method}) and {b.values.shape} ({b.method}); "
            "compare explanations of the same inputs."
        )
    if not np.allclose(a.inputs, b.inputs, rtol=1e-5, atol=1e-6):
        raise ValueError(f"{a.method} and {b.method} explain different inputs; explain the same rows with both.")


@dataclass(frozen=True)
class AgreementResult(_Result):
    """Per-row agreement of two explanations of the same inputs.

    ``topk``: |top-k(a) ∩ top-k(b)| / k by |attribution|; ``spearman``: rank
    correlation of the signed attributions (NaN where one row is constant);
    ``sign``: fraction of the union of both top-k sets where the signs agree;
    ``flagged``: rows with ``topk < threshold``.
    """

    method_a: str
    method_b: str
    k: int
    threshold: float
    topk: tuple[float, ...]
    spearman: tuple[float, ...]
    sign: tuple[float, ...]
    mean_topk: float
    mean_spearman: float
    mean_sign: float
    flagged: tuple[int, ...]


def agreement(
    expl_a: Explanation, expl_b: Explanation, *, k: int, threshold: float = 0.5, sum_channels: bool = True
) -> AgreementResult:
    """Compare two explanations of the same inputs row by row.

    Parameters
    ----------
    expl_a, expl_b : Explanation
        Explanations of the same inputs (e.g. SHAP and LIME).
    k : int
        Size of the top-k sets, ``1 <= k <= n_features`` (pixels for images).
    threshold : float
        Rows whose top-k agreement is below this are flagged.
    sum_channels : bool
        Compare images per pixel (channels summed) rather than per element.

    Returns
    -------
    AgreementResult

    Raises
    ------
    ValueError
        If the explanations' inputs differ, or ``k`` is out of range.
    """
    _check_pair(expl_a, expl_b)
    a, b = _units(expl_a, sum_channels=sum_channels), _units(expl_b, sum_channels=sum_channels)
    k = check_k(k, a.shape[1])
    ta, tb = _topk(a, k), _topk(b, k)
    topk, rho, sign = [], [], []
    for i in range(a.shape[0]):
        topk.append(len(set(ta[i]) & set(tb[i])) / k)
        constant = np.ptp(a[i]) == 0 or np.ptp(b[i]) == 0
        rho.append(float("nan") if constant else float(spearmanr(a[i], b[i]).statistic))
        union = np.union1d(ta[i], tb[i])
        sign.append(float((np.sign(a[i, union]) == np.sign(b[i, union])).mean()))
    rho_arr = np.asarray(rho)
    return AgreementResult(
        method_a=expl_a.method, method_b=expl_b.method, k=k, threshold=float(threshold),
        topk=tuple(topk), spearman=tuple(rho), sign=tuple(sign),
        mean_topk=float(np.mean(topk)),
        mean_spearman=float(np.nanmean(rho_arr)) if np.isfinite(rho_arr).any() else float("nan"),
        mean_sign=float(np.mean(sign)),
        flagged=tuple(int(i) for i in np.flatnonzero(np.asarray(topk) < threshold)),
    )


@dataclass(frozen=True)
class StabilityResult(_Result):
    """Top-k Jaccard similarity between explanations from different seeds, per row."""

    method: str
    k: int
    seeds: tuple[int, ...]
    per_row: tuple[float, ...]
    mean: float
    min: float


def stability(
    explain_fn: Callable[..., Explanation], x: np.ndarray, *, seeds: Sequence[int], k: int, sum_channels: bool = True
) -> StabilityResult:
    """How much a stochastic explainer's top-k features change with its seed.

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(x, seed=s) -> Explanation``, e.g.
        ``functools.partial(get_explainer("lime-tabular"), model, background=bg, task="regression")``.
    x : np.ndarray
        Inputs to explain.
    seeds : sequence of int
        At least two distinct seeds.
    k : int
        Size of the top-k sets.
    sum_channels : bool
        Rank image pixels with channels summed.

    Returns
    -------
    StabilityResult
        Per row, the mean Jaccard index ``|A ∩ B| / |A ∪ B|`` over all seed pairs.

    Raises
    ------
    ValueError
        If fewer than two distinct seeds are given, or ``k`` is out of range.
    """
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) < 2:
        raise ValueError(f"seeds={list(seeds)} has fewer than two distinct seeds; pass e.g. seeds=(0, 1, 2).")
    expls = [explain_fn(x, seed=s) for s in seeds]
    units = [_units(e, sum_channels=sum_channels) for e in expls]
    k = check_k(k, units[0].shape[1])
    tops = [_topk(u, k) for u in units]
    per_row = np.zeros(units[0].shape[0])
    pairs = list(combinations(range(len(seeds)), 2))
    for s, t in pairs:
        for i in range(per_row.shape[0]):
            a, b = set(tops[s][i]), set(tops[t][i])
            per_row[i] += len(a & b) / len(a | b)
    per_row /= len(pairs)
    return StabilityResult(
        method=expls[0].method, k=k, seeds=seeds, per_row=tuple(float(v) for v in per_row),
        mean=float(per_row.mean()), min=float(per_row.min()),
    )


@dataclass(frozen=True)
class DistanceResult(_Result):
    """How differently two models (or explainers) attribute the same inputs.

    Global terms use mean |attribution| per feature: ``global_spearman`` (rank
    correlation), ``global_topk`` (top-k overlap), ``global_l1`` (L1 distance
    of the importances normalised to sum 1, in [0, 2]). ``mean_row_*`` average
    the per-row :func:`agreement`.
    """

    method_a: str
    method_b: str
    k: int
    global_spearman: float
    global_topk: float
    global_l1: float
    mean_row_spearman: float
    mean_row_topk: float


def explanation_distance(expl_a: Explanation, expl_b: Explanation, *, k: int = 5) -> DistanceResult:
    """Compare the explanations of two model variants on the same inputs.

    Parameters
    ----------
    expl_a, expl_b : Explanation
        E.g. non-private vs private model, or teacher vs student, same method.
    k : int
        Size of the top-k sets.

    Returns
    -------
    DistanceResult

    Raises
    ------
    ValueError
        If the inputs differ or ``k`` is out of range.
    """
    row = agreement(expl_a, expl_b, k=k)
    ga, gb = np.abs(_units(expl_a)).mean(axis=0), np.abs(_units(expl_b)).mean(axis=0)
    const = np.ptp(ga) == 0 or np.ptp(gb) == 0
    ta, tb = _topk(ga[None], row.k)[0], _topk(gb[None], row.k)[0]
    return DistanceResult(
        method_a=expl_a.method, method_b=expl_b.method, k=row.k,
        global_spearman=float("nan") if const else float(spearmanr(ga, gb).statistic),
        global_topk=len(set(ta) & set(tb)) / row.k,
        global_l1=float(np.abs(ga / max(ga.sum(), 1e-300) - gb / max(gb.sum(), 1e-300)).sum()),
        mean_row_spearman=row.mean_spearman, mean_row_topk=row.mean_topk,
    )
