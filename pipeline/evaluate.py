"""Stage ``evaluate``: test-set metrics with bootstrap confidence intervals.

Regressor (and its Ridge baseline): RMSE, MAE, R² in the target's original units.
CNN: accuracy, macro-F1, per-class recall and precision, confusion matrix.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from sklearn import metrics as skm

from core import training
from core.artifacts import json_bytes, read_json
from core.config import Config
from core.data import Dataset
from core.models import MODELS
from pipeline.train import TrainOutput

N_BOOTSTRAP = 1000  # resamples for the 95% confidence intervals


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    pred: np.ndarray,
    *,
    seed: int,
    n: int = N_BOOTSTRAP,
) -> list[float]:
    """Percentile 95% confidence interval of ``metric(y, pred)`` over ``n`` seeded resamples of the rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    values = np.array([metric(y[i], pred[i]) for i in idx])
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def regression_metrics(y: np.ndarray, pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """RMSE, MAE and R² (original units) with bootstrap 95% CIs."""

    def rmse(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    def mae(a, b):
        return float(np.mean(np.abs(a - b)))

    def r2(a, b):
        return float(1.0 - np.sum((a - b) ** 2) / np.sum((a - a.mean()) ** 2))

    out = {}
    for name, fn in (("rmse", rmse), ("mae", mae), ("r2", r2)):
        out[name] = fn(y, pred)
        out[f"{name}_ci95"] = bootstrap_ci(fn, y, pred, seed=seed)
    out["n"] = int(len(y))
    return out


def _macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    # Confusion-matrix arithmetic: ~100x faster than sklearn.metrics.f1_score inside a bootstrap loop.
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)))


def classification_metrics(
    y: np.ndarray, logits: np.ndarray, class_names: tuple[str, ...], *, seed: int
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall/precision and the confusion matrix, with bootstrap CIs."""
    k = len(class_names)
    labels = np.arange(k)
    pred = logits.argmax(axis=1)

    def acc(a, b):
        return float(np.mean(a == b))

    def f1(a, b):
        return _macro_f1(a, b, k)

    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    precision = skm.precision_score(y, pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": acc(y, pred),
        "accuracy_ci95": bootstrap_ci(acc, y, pred, seed=seed),
        "macro_f1": f1(y, pred),
        "macro_f1_ci95": bootstrap_ci(f1, y, pred, seed=seed),
        "per_class_recall": {c: float(r) for c, r in zip(class_names, recall)},
        "per_class_precision": {c: float(p) for c, p in zip(class_names, precision)},
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": list(class_names),
        "n": int(len(y)),
    }


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Metrics of every trained model on the test split (and validation, for reference).

    Parameters
    ----------
    inputs : ``{"data": ..., "train": ...}`` outputs of the earlier stages.

    Returns
    -------
    ``{"regressor": {...}, "ridge": {...}, "cnn": {...}}`` JSON-safe metric trees.
    """
    trained: TrainOutput = inputs["train"]
    out: dict[str, Any] = {}
    for name, entry in MODELS.items():
        ds: Dataset = inputs["data"][entry.dataset]
        model = trained.models[name].build()
        out[name] = {
            split: _metrics(ds, split, training.predict(model, ds.x[split]), seed=seed) for split in ("test", "val")
        }
    tab: Dataset = inputs["data"][MODELS["regressor"].dataset]
    out["ridge"] = {
        split: _metrics(tab, split, trained.ridge.predict(tab.x[split]), seed=seed) for split in ("test", "val")
    }
    return out


def _metrics(ds: Dataset, split: str, pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Metrics of raw model outputs ``pred`` against ``split``'s labels (regression in original units)."""
    if ds.task == "regression":
        return regression_metrics(ds.target_to_original(ds.y[split]), ds.target_to_original(pred), seed=seed)
    return classification_metrics(ds.y[split], pred, ds.class_names, seed=seed)


def dump(out: Mapping[str, Any]) -> dict[str, bytes]:
    return {"metrics/evaluation.json": json_bytes(out)}


def load(read) -> dict[str, Any]:
    return read_json(read("metrics/evaluation.json"))
