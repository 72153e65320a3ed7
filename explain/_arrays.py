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


def unit_attributions(
    expl: Explanation, *, sum_channels: bool = True, segments: np.ndarray | None = None
) -> np.ndarray:
    """Attributions as ``(n, U)``: features, pixels (channels summed) for images, or segments.

    With ``segments`` (an ``(H, W)`` label map, or ``(n, H, W)`` one per image,
    labels ``0 .. S-1``) image attributions are summed per segment, ``(n, S)``:
    the resolution at which a pixel-level and a segment-level explanation
    (LIME's cells) can be compared like with like.
    """
    v = expl.values
    if expl.is_image and (sum_channels or segments is not None):
        v = v.sum(axis=1)
    if segments is None or not expl.is_image:
        return v.reshape(expl.n, -1)
    seg = np.broadcast_to(np.asarray(segments, dtype=np.int64), v.shape)
    n_seg = int(seg.max()) + 1
    out = np.zeros((expl.n, n_seg))
    for i in range(expl.n):
        out[i] = np.bincount(seg[i].ravel(), weights=v[i].ravel(), minlength=n_seg)
    return out


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
