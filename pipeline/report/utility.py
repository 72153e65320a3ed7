"""Whether a released model beats a trivial predictor at all: the majority class or the training mean.

A model trained with too much DP noise for its data (user-level DP with few clients, a tiny ε) can finish
at chance and still be released; the report must then say so, whatever the training mode. Read by
:mod:`pipeline.report.content`; the model's test metric and its bootstrap interval come from the
evaluate stage, the trivial predictor is computed here from the data splits.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from auditml_core.data import Dataset
from auditml_core.models import title
from pipeline.report.fmt import number


def _majority(ds: Dataset) -> tuple[float, str]:
    """Test accuracy of always answering the training split's most common class, and that class's name."""
    train = np.asarray(ds.y["train"], dtype=np.int64)
    top = int(np.bincount(train).argmax())
    names = list(getattr(ds, "class_names", []) or [])
    label = str(names[top]) if top < len(names) else str(top)
    return float(np.mean(np.asarray(ds.y["test"], dtype=np.int64) == top)), label


def _mean_r2(ds: Dataset) -> float:
    """Test R² of always predicting the training split's mean target (at most 0; invariant to target scaling)."""
    y = np.asarray(ds.y["test"], dtype=np.float64)
    resid = float(np.sum((y - float(np.mean(ds.y["train"]))) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - resid / total if total > 0 else 0.0


def trivial_baseline(name: str, ds: Dataset, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The trivial predictor's test metric beside the model's, and whether the model beats it.

    ``no_better`` is true when the lower end of the model's 95% bootstrap interval (its value when no
    interval was recorded) does not exceed the trivial predictor's: on this test split the model cannot be
    told apart from one that ignores its input. None when the model has no test metric.
    """
    test = (metrics.get(name) or {}).get("test") or {}
    key = "accuracy" if ds.task == "classification" else "r2"
    value = test.get(key)
    if value is None:
        return None
    if key == "accuracy":
        base, label = _majority(ds)
        predictor = f"always answering the training split's most common class ({label})"
    else:
        base, predictor = _mean_r2(ds), "always predicting the training split's mean target"
    ci = test.get(f"{key}_ci95")
    low = ci[0] if ci else value
    no_better = bool(low <= base)
    shown = f"{number(value, 3)}" + (f" [{number(ci[0], 3)}, {number(ci[1], 3)}]" if ci else "")
    statement = (
        f"The {title(name)} is no better than a trivial predictor: its test {key} {shown} does not clear "
        f"{number(base, 3)}, what {predictor} scores on the same test rows. Do not use it for predictions or read "
        "its explanations as the data's; usual causes are DP noise too large for this data (user-level DP with few "
        "clients: see the noise-to-signal estimate in the privacy record; a small ε), too few epochs or a diverged "
        "learning rate."
        if no_better
        else f"The {title(name)} beats a trivial predictor: its test {key} {shown} clears {number(base, 3)} "
        f"({predictor})."
    )
    return {
        "metric": key,
        "model": value,
        "model_ci95": ci,
        "predictor": predictor,
        "trivial": base,
        "no_better": no_better,
        "statement": statement,
    }
