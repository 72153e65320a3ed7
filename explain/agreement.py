"""Agreement between explanations: two methods, several seeds, two model variants.

Re-exported by :mod:`explain.quality`. Rankings use |attribution|; images are
ranked per pixel with channels summed unless ``sum_channels=False``. Ties are
broken by feature index, so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.stats import spearmanr

from explain._arrays import Result, top_k_indices, unit_attributions
from explain._checks import check_k
from explain.types import Explanation

__all__ = ["AgreementResult", "StabilityResult", "DistanceResult", "agreement", "stability", "explanation_distance"]


def _check_pair(a: Explanation, b: Explanation) -> None:
    if a.values.shape != b.values.shape:
        raise ValueError(
            f"explanations have shapes {a.values.shape} ({a.method}) and {b.values.shape} ({b.method}); "
            "compare explanations of the same inputs."
        )
    if not np.allclose(a.inputs, b.inputs, rtol=1e-5, atol=1e-6):
        raise ValueError(f"{a.method} and {b.method} explain different inputs; explain the same rows with both.")


@dataclass(frozen=True)
class AgreementResult(Result):
    """Per-row agreement of two explanations of the same inputs.

    ``topk``: |top-k(a) ∩ top-k(b)| / k by |attribution|; ``spearman``: rank
    correlation of the signed attributions (NaN where one row is constant);
    ``sign``: fraction of the union of both top-k sets where the signs agree;
    ``flagged``: rows with ``topk < threshold``, or, when ``flag_on == "spearman"``, rows whose
    Spearman is below ``threshold`` (a constant row, NaN, is flagged).
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
    flag_on: str = "topk"


def agreement(
    expl_a: Explanation,
    expl_b: Explanation,
    *,
    k: int,
    threshold: float = 0.5,
    sum_channels: bool = True,
    segments: np.ndarray | None = None,
    flag_on: str = "topk",
) -> AgreementResult:
    """Compare two explanations of the same inputs row by row.

    Parameters
    ----------
    expl_a, expl_b : Explanation
        Explanations of the same inputs (e.g. SHAP and LIME).
    k : int
        Size of the top-k sets, ``1 <= k <= n_features`` (pixels for images).
    threshold : float
        Rows whose top-k agreement (``flag_on="topk"``) or Spearman (``flag_on="spearman"``) is below this
        are flagged.
    sum_channels : bool
        Compare images per pixel (channels summed) rather than per element.
    segments : np.ndarray, optional
        ``(H, W)`` or ``(n, H, W)`` label map: compare images per segment, each
        explanation summed over the segment's pixels, and ``k`` counts
        segments. Use the coarser explanation's segmentation (LIME's cells):
        a segment-level explanation is constant over a cell, so comparing it
        pixel by pixel with a pixel-level one measures the resolution
        difference, not a disagreement.

    Returns
    -------
    AgreementResult

    Raises
    ------
    ValueError
        If the explanations' inputs differ, or ``k`` is out of range.
    """
    if flag_on not in ("topk", "spearman"):
        raise ValueError(f"flag_on={flag_on!r} is not valid; use 'topk' or 'spearman'.")
    _check_pair(expl_a, expl_b)
    a = unit_attributions(expl_a, sum_channels=sum_channels, segments=segments)
    b = unit_attributions(expl_b, sum_channels=sum_channels, segments=segments)
    k = check_k(k, a.shape[1])
    ta, tb = top_k_indices(a, k), top_k_indices(b, k)
    topk, rho, sign = [], [], []
    for i in range(a.shape[0]):
        topk.append(len(set(ta[i]) & set(tb[i])) / k)
        constant = np.ptp(a[i]) == 0 or np.ptp(b[i]) == 0
        rho.append(float("nan") if constant else float(spearmanr(a[i], b[i]).statistic))
        union = np.union1d(ta[i], tb[i])
        sign.append(float((np.sign(a[i, union]) == np.sign(b[i, union])).mean()))
    rho_arr = np.asarray(rho)
    score = np.nan_to_num(rho_arr, nan=-1.0) if flag_on == "spearman" else np.asarray(topk)
    return AgreementResult(
        method_a=expl_a.method,
        method_b=expl_b.method,
        k=k,
        threshold=float(threshold),
        topk=tuple(topk),
        spearman=tuple(rho),
        sign=tuple(sign),
        mean_topk=float(np.mean(topk)),
        mean_spearman=float(np.nanmean(rho_arr)) if np.isfinite(rho_arr).any() else float("nan"),
        mean_sign=float(np.mean(sign)),
        flagged=tuple(int(i) for i in np.flatnonzero(score < threshold)),
        flag_on=flag_on,
    )


@dataclass(frozen=True)
class StabilityResult(Result):
    """Top-k Jaccard similarity between explanations from different seeds, per row."""

    method: str
    k: int
    seeds: tuple[int, ...]
    per_row: tuple[float, ...]
    mean: float
    min: float
    # Spearman of the signed attributions between every seed pair, row by row (pair-major): the
    # method's agreement with itself, against which a disagreement with another method is judged
    spearman: tuple[float, ...] = ()


def stability(
    explain_fn: Callable[..., Explanation],
    x: np.ndarray,
    *,
    seeds: Sequence[int],
    k: int,
    sum_channels: bool = True,
    segments: np.ndarray | None = None,
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
    segments : np.ndarray, optional
        Rank image segments instead of pixels (see :func:`agreement`); ``k``
        then counts segments.

    Returns
    -------
    StabilityResult
        Per row, the mean Jaccard index ``|A ∩ B| / |A ∪ B|`` over all seed pairs; and every
        (seed pair, row) Spearman correlation of the signed attributions (NaN where a row is constant).

    Raises
    ------
    ValueError
        If fewer than two distinct seeds are given, or ``k`` is out of range.
    """
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) < 2:
        raise ValueError(f"seeds={list(seeds)} has fewer than two distinct seeds; pass e.g. seeds=(0, 1, 2).")
    expls = [explain_fn(x, seed=s) for s in seeds]
    units = [unit_attributions(e, sum_channels=sum_channels, segments=segments) for e in expls]
    k = check_k(k, units[0].shape[1])
    tops = [top_k_indices(u, k) for u in units]
    per_row = np.zeros(units[0].shape[0])
    pairs = list(combinations(range(len(seeds)), 2))
    for s, t in pairs:
        for i in range(per_row.shape[0]):
            a, b = set(tops[s][i]), set(tops[t][i])
            per_row[i] += len(a & b) / len(a | b)
    per_row /= len(pairs)
    rho = [
        float(spearmanr(units[s][i], units[t][i]).statistic)
        if np.ptp(units[s][i]) > 0 and np.ptp(units[t][i]) > 0
        else float("nan")
        for s, t in pairs
        for i in range(per_row.shape[0])
    ]
    return StabilityResult(
        method=expls[0].method,
        k=k,
        seeds=seeds,
        per_row=tuple(float(v) for v in per_row),
        mean=float(per_row.mean()),
        min=float(per_row.min()),
        spearman=tuple(rho),
    )


@dataclass(frozen=True)
class DistanceResult(Result):
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
    ga, gb = np.abs(unit_attributions(expl_a)).mean(axis=0), np.abs(unit_attributions(expl_b)).mean(axis=0)
    const = np.ptp(ga) == 0 or np.ptp(gb) == 0
    ta, tb = top_k_indices(ga[None], row.k)[0], top_k_indices(gb[None], row.k)[0]
    return DistanceResult(
        method_a=expl_a.method,
        method_b=expl_b.method,
        k=row.k,
        global_spearman=float("nan") if const else float(spearmanr(ga, gb).statistic),
        global_topk=len(set(ta) & set(tb)) / row.k,
        global_l1=float(np.abs(ga / max(ga.sum(), 1e-300) - gb / max(gb.sum(), 1e-300)).sum()),
        mean_row_spearman=row.mean_spearman,
        mean_row_topk=row.mean_topk,
    )
