"""Small helpers shared by the quality metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from explain.types import Explanation, json_safe

PredictFn = Callable[[np.ndarray], np.ndarray]


class Result:
    """Mixin for the metric dataclasses: a JSON-safe ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (NaN becomes None)."""
        return json_safe(asdict(self))  # type: ignore[call-overload]


def unit_attributions(expl: Explanation, *, sum_channels: bool = True) -> np.ndarray:
    """Attributions as ``(n, U)``: features, or pixels (channels summed) for images."""
    v = expl.values
    if expl.is_image and sum_channels:
        v = v.sum(axis=1)
    return v.reshape(expl.n, -1)


def explained_output(predict: PredictFn, x: np.ndarray, targets: np.ndarray | int | None) -> np.ndarray:
    """``(m,)`` explained output: the regression value, or the logit of ``targets``.

    ``targets`` is None (regression), one class for every row, or ``(m,)`` classes.
    """
    out = np.asarray(predict(x), dtype=np.float64)
    if targets is None:
        return out.reshape(-1)
    if out.ndim != 2:
        raise ValueError(f"predict returned shape {out.shape}; a classifier's predict must return (m, K) logits.")
    if np.ndim(targets) == 0:
        return out[:, int(targets)]
    return out[np.arange(out.shape[0]), np.asarray(targets)]


def top_k_indices(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |v| per row; ties broken by index (stable)."""
    return np.argsort(-np.abs(v), axis=1, kind="stable")[:, :k]
