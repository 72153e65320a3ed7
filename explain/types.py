"""The one result type every explainer returns, and JSON helpers.

Conventions (shared by every member of the registry):

* ``values`` has the shape of ``inputs``: ``(n, F)`` for tabular rows,
  ``(n, C, H, W)`` for images. A value is the attribution of that input element
  toward ``outputs``.
* ``outputs`` is the model output being explained, always on the model's own
  scale: the regression value, or the **logit** of the explained class for a
  classifier (never a probability), so SHAP and LIME explain the same number.
* ``base_values`` is the reference the attributions are measured from: the mean
  model output over the background for SHAP (so ``base + values.sum() ~= output``),
  the local surrogate's intercept for LIME (see :mod:`explain.lime_tabular` and
  :mod:`explain.lime_image`), ``None`` where a method has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["Explanation", "json_safe"]

# Arrays up to this many elements are written out in full by `json_safe`;
# larger ones are summarised by shape, to keep records small.
_MAX_JSON_ARRAY = 256


def json_safe(value: Any) -> Any:
    """Convert ``value`` into something :func:`json.dumps` accepts.

    NaN and infinities become ``None`` (JSON has no NaN); numpy scalars become
    Python scalars; small arrays become lists, large ones a ``{"shape": ...}``
    summary; mappings and sequences are converted recursively.

    Parameters
    ----------
    value : Any
        The object to convert.

    Returns
    -------
    Any
        A JSON-serialisable object.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        if value.size > _MAX_JSON_ARRAY:
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return [json_safe(v) for v in value.tolist()] if value.ndim else json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return repr(value)


def _frozen_array(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Explanation:
    """Attributions for ``n`` explained inputs, from one explainer.

    Parameters
    ----------
    method : str
        Registry name of the explainer, e.g. ``"shap-deep"``, ``"lime-image"``.
    values : np.ndarray
        ``(n, *feature_shape)`` attributions toward ``outputs``.
    base_values : np.ndarray or None
        ``(n,)`` reference output (SHAP: mean output over the background;
        LIME: surrogate intercept), or ``None``.
    inputs : np.ndarray
        ``(n, *feature_shape)`` the explained inputs.
    outputs : np.ndarray
        ``(n,)`` model output explained: regression value, or class logit.
    targets : np.ndarray or None
        ``(n,)`` explained class index for classifiers; ``None`` for regression.
    feature_names : tuple of str or None
        One name per feature for tabular inputs.
    seconds : float
        Wall time to compute, in seconds.
    extras : Mapping
        Method-specific details (seed, n_samples, LIME ``score`` per row, ...).

    Raises
    ------
    ValueError
        If the array shapes disagree with each other.

    Notes
    -----
    Arrays are copied and made read-only, so an Explanation cannot change
    after it is made.
    """

    method: str
    values: np.ndarray
    base_values: np.ndarray | None
    inputs: np.ndarray
    outputs: np.ndarray
    targets: np.ndarray | None
    feature_names: tuple[str, ...] | None
    seconds: float
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = _frozen_array(np.asarray(self.values, dtype=np.float64))
        inputs = _frozen_array(np.asarray(self.inputs, dtype=np.float64))
        if values.shape != inputs.shape or values.ndim < 2:
            raise ValueError(
                f"values shape {values.shape} must equal inputs shape {inputs.shape} and be "
                "(n, *feature_shape); build the Explanation from matching arrays."
            )
        n = values.shape[0]
        outputs = _frozen_array(np.asarray(self.outputs, dtype=np.float64).reshape(-1))
        if outputs.shape != (n,):
            raise ValueError(f"outputs has shape {outputs.shape}; expected ({n},), one per explained row.")
        base = self.base_values
        if base is not None:
            base = _frozen_array(np.asarray(base, dtype=np.float64).reshape(-1))
            if base.shape != (n,):
                raise ValueError(f"base_values has shape {base.shape}; expected ({n},) or None.")
        targets = self.targets
        if targets is not None:
            targets = _frozen_array(np.asarray(targets, dtype=np.int64).reshape(-1))
            if targets.shape != (n,):
                raise ValueError(f"targets has shape {targets.shape}; expected ({n},) or None.")
        names = self.feature_names
        if names is not None:
            names = tuple(str(s) for s in names)
            if values.ndim != 2 or len(names) != values.shape[1]:
                raise ValueError(
                    f"feature_names has {len(names)} names for feature shape {values.shape[1:]}; "
                    "give one name per tabular feature, or None for images."
                )
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "base_values", base)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "seconds", float(self.seconds))
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as its constructor arguments (a mappingproxy does not pickle); rebuilt read-only as made."""
        args = (getattr(self, f.name) for f in fields(self))
        return (type(self), tuple(dict(a) if isinstance(a, MappingProxyType) else a for a in args))

    @property
    def n(self) -> int:
        """Number of explained rows or images."""
        return int(self.values.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(F,)`` or ``(C, H, W)``."""
        return tuple(int(s) for s in self.values.shape[1:])

    @property
    def is_image(self) -> bool:
        """Whether the inputs are images ``(n, C, H, W)``."""
        return self.values.ndim == 4

    def mean_abs(self) -> np.ndarray:
        """Mean absolute attribution over rows, shape ``feature_shape``."""
        return np.abs(self.values).mean(axis=0)

    def names(self) -> tuple[str, ...]:
        """Feature names, or ``x0, x1, ...`` where none were given (tabular)."""
        if self.feature_names is not None:
            return self.feature_names
        return tuple(f"x{i}" for i in range(int(np.prod(self.feature_shape))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no full attribution arrays).

        Returns
        -------
        dict
            Method, sizes, timings, mean output/base, additivity gap where a base
            value exists, mean |attribution| per feature (tabular) or per channel
            plus the ten strongest pixels (images), and JSON-safe extras.
        """
        d: dict[str, Any] = {
            "method": self.method,
            "n": self.n,
            "feature_shape": list(self.feature_shape),
            "seconds": self.seconds,
            "seconds_per_row": self.seconds / max(self.n, 1),
            "mean_output": float(self.outputs.mean()),
            "mean_base_value": None if self.base_values is None else float(self.base_values.mean()),
        }
        if self.base_values is not None:
            gap = self.base_values + self.values.reshape(self.n, -1).sum(axis=1) - self.outputs
            d["max_abs_additivity_gap"] = float(np.abs(gap).max())
        if self.targets is not None:
            classes, counts = np.unique(self.targets, return_counts=True)
            d["target_counts"] = {str(int(c)): int(k) for c, k in zip(classes, counts)}
        mean_abs = self.mean_abs()
        if self.is_image:
            d["mean_abs_attribution_by_channel"] = [float(v) for v in mean_abs.mean(axis=(1, 2))]
            pixel = mean_abs.sum(axis=0)  # (H, W)
            order = np.argsort(-pixel, axis=None, kind="stable")[:10]
            d["top_pixels"] = [
                {"h": int(h), "w": int(w), "mean_abs": float(pixel[h, w])}
                for h, w in zip(*np.unravel_index(order, pixel.shape))
            ]
        else:
            d["mean_abs_attribution"] = {name: float(v) for name, v in zip(self.names(), mean_abs)}
        d["extras"] = json_safe(dict(self.extras))
        return json_safe(d)
