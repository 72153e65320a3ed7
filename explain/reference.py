"""How far an approximate attribution is from a reference one on the same inputs.

An approximate explainer (DeepLIFT-based ``shap-deep``, sampled
``shap-gradient``) can be additive and still far from the Shapley values it
stands for. :func:`reference_error` measures the gap against a reference
explanation of the same rows: exact enumeration (``shap-exact``) where it is
affordable, a sampling estimate with many coalitions (``shap-kernel``)
otherwise. The reference's own error is not zero when it samples; say which
it was next to the numbers.

One number over a few images is not a worst case: the per-image errors are
kept, and :func:`quantile_interval` states a percentile of them with a
distribution-free interval (order statistics: the chance that the ``q``
quantile lies below the ``j``-th smallest of ``n`` values is a binomial tail).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from explain._arrays import Result, top_k_indices
from explain._checks import check_k
from explain.types import Explanation

__all__ = ["ReferenceErrorResult", "quantile_interval", "reference_error"]


def quantile_interval(values: np.ndarray, q: float, *, level: float = 0.95) -> dict[str, float | None]:
    """The ``q`` quantile of ``values`` with a distribution-free interval from order statistics.

    The interval ``[x_(l), x_(u)]`` (1-based order statistics) is the narrowest pair with each tail
    ``P(Binomial(n, q) < l)`` and ``P(Binomial(n, q) >= u)`` at most ``(1 - level) / 2``; a side no order
    statistic reaches at that level is None (e.g. no upper bound for the 90th percentile of 10 values).
    ``coverage`` is the interval's exact coverage when both sides exist.

    Parameters
    ----------
    values : the sample (finite values; NaN dropped).
    q : the quantile, in (0, 1).
    level : the confidence level, in (0, 1).

    Returns
    -------
    dict with ``estimate`` (linear-interpolation quantile), ``lower``, ``upper``, ``coverage``, ``n``.
    """
    if not 0 < q < 1 or not 0 < level < 1:
        raise ValueError(f"q={q} and level={level} must both be in (0, 1).")
    x = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    n = len(x)
    if n == 0:
        return {"estimate": None, "lower": None, "upper": None, "coverage": None, "n": 0}
    tail = (1 - level) / 2
    ranks = np.arange(1, n + 1)
    low_ok = ranks[binom.cdf(ranks - 1, n, q) <= tail]  # P(B < j) = P(B <= j - 1)
    high_ok = ranks[binom.sf(ranks - 1, n, q) <= tail]  # P(B >= j)
    lo, hi = (int(low_ok.max()) if len(low_ok) else None), (int(high_ok.min()) if len(high_ok) else None)
    coverage = None if lo is None or hi is None else float(binom.cdf(hi - 1, n, q) - binom.cdf(lo - 1, n, q))
    return {
        "estimate": float(np.quantile(x, q)),
        "lower": None if lo is None else float(x[lo - 1]),
        "upper": None if hi is None else float(x[hi - 1]),
        "coverage": coverage,
        "n": n,
    }


@dataclass(frozen=True)
class ReferenceErrorResult(Result):
    """Per-row error of ``method`` against ``reference``, summarised over rows.

    ``max_rel_error``: largest ``max_j |a_j - r_j| / max_j |r_j|`` over rows
    (error relative to the row's largest reference value); ``mean_rel_error``:
    mean over rows of ``sum |a - r| / sum |r|``; ``pearson``: mean per-row
    Pearson correlation; ``topk``: mean per-row overlap of the top-k elements by
    |value|; ``max_abs_error``: largest absolute difference, in output units.
    ``per_row_max_rel_error`` keeps each row's value; ``median_max_rel_error`` and
    ``p90_max_rel_error`` are :func:`quantile_interval` summaries of it, and
    ``exceed_max_probability`` = 1 / (n + 1) is the chance that one more row (exchangeable
    with these) has a larger error than the largest seen.
    """

    method: str
    reference: str
    n: int
    k: int
    max_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    pearson: float
    min_pearson: float
    topk: float
    rows: tuple[int, ...]
    per_row_max_rel_error: tuple[float, ...] = ()
    median_max_rel_error: dict | None = None
    p90_max_rel_error: dict | None = None
    exceed_max_probability: float | None = None


def reference_error(
    expl: Explanation, reference: Explanation, *, k: int, rows: np.ndarray | None = None
) -> ReferenceErrorResult:
    """Compare ``expl`` with a reference explanation of the same inputs, element by element.

    Parameters
    ----------
    expl : Explanation
        The explanation to judge (e.g. ``shap-deep``).
    reference : Explanation
        The reference on the same inputs, or on ``expl``'s rows ``rows``.
    k : int
        Size of the top-k sets (elements: features or pixel-channels).
    rows : np.ndarray, optional
        Indices into ``expl`` of the rows ``reference`` explains (default: all).

    Returns
    -------
    ReferenceErrorResult

    Raises
    ------
    ValueError
        If the two do not explain the same inputs, or ``k`` is out of range.
    """
    rows = np.arange(expl.n) if rows is None else np.asarray(rows, dtype=int).reshape(-1)
    a = expl.values[rows].reshape(len(rows), -1)
    r = reference.values.reshape(reference.n, -1)
    if a.shape != r.shape or not np.allclose(expl.inputs[rows], reference.inputs, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"{expl.method} rows {rows.tolist()} and the {reference.method} reference explain different inputs "
            f"(shapes {a.shape} and {r.shape}); explain the same rows with both."
        )
    if expl.targets is not None and reference.targets is not None and (expl.targets[rows] != reference.targets).any():
        raise ValueError("the reference explains different classes; pass targets=expl.targets[rows] to it.")
    k = check_k(k, a.shape[1])
    err = np.abs(a - r)
    scale = np.maximum(np.abs(r).max(axis=1), 1e-300)
    pearson = np.array(
        [np.corrcoef(a[i], r[i])[0, 1] if np.ptp(a[i]) > 0 and np.ptp(r[i]) > 0 else np.nan for i in range(len(r))]
    )
    ta, tr = top_k_indices(a, k), top_k_indices(r, k)
    topk = [len(set(ta[i]) & set(tr[i])) / k for i in range(len(r))]
    per_row = err.max(axis=1) / scale
    return ReferenceErrorResult(
        method=expl.method,
        reference=reference.method,
        n=len(rows),
        k=k,
        max_abs_error=float(err.max()),
        max_rel_error=float(per_row.max()),
        mean_rel_error=float((err.sum(axis=1) / np.maximum(np.abs(r).sum(axis=1), 1e-300)).mean()),
        pearson=float(np.nanmean(pearson)) if np.isfinite(pearson).any() else float("nan"),
        min_pearson=float(np.nanmin(pearson)) if np.isfinite(pearson).any() else float("nan"),
        topk=float(np.mean(topk)),
        rows=tuple(int(i) for i in rows),
        per_row_max_rel_error=tuple(float(v) for v in per_row),
        median_max_rel_error=quantile_interval(per_row, 0.5),
        p90_max_rel_error=quantile_interval(per_row, 0.9),
        exceed_max_probability=1.0 / (len(rows) + 1),
    )
