"""How far an approximate attribution is from a reference one on the same inputs.

An approximate explainer (DeepLIFT-based ``shap-deep``, sampled
``shap-gradient``) can be additive and still far from the Shapley values it
stands for. :func:`reference_error` measures the gap against a reference
explanation of the same rows: exact enumeration (``shap-exact``) where it is
affordable, a sampling estimate with many coalitions (``shap-kernel``)
otherwise. The reference's own error is not zero when it samples; say which
it was next to the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explain._arrays import Result, top_k_indices
from explain._checks import check_k
from explain.types import Explanation

__all__ = ["ReferenceErrorResult", "reference_error"]


@dataclass(frozen=True)
class ReferenceErrorResult(Result):
    """Per-row error of ``method`` against ``reference``, summarised over rows.

    ``max_rel_error``: largest ``max_j |a_j - r_j| / max_j |r_j|`` over rows
    (error relative to the row's largest reference value); ``mean_rel_error``:
    mean over rows of ``sum |a - r| / sum |r|``; ``pearson``: mean per-row
    Pearson correlation; ``topk``: mean per-row overlap of the top-k elements by
    |value|; ``max_abs_error``: largest absolute difference, in output units.
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
    return ReferenceErrorResult(
        method=expl.method,
        reference=reference.method,
        n=len(rows),
        k=k,
        max_abs_error=float(err.max()),
        max_rel_error=float((err.max(axis=1) / scale).max()),
        mean_rel_error=float((err.sum(axis=1) / np.maximum(np.abs(r).sum(axis=1), 1e-300)).mean()),
        pearson=float(np.nanmean(pearson)) if np.isfinite(pearson).any() else float("nan"),
        min_pearson=float(np.nanmin(pearson)) if np.isfinite(pearson).any() else float("nan"),
        topk=float(np.mean(topk)),
        rows=tuple(int(i) for i in rows),
    )
