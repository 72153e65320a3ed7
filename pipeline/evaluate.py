"""Stage ``evaluate``: test-set metrics with bootstrap confidence intervals.

Regressor (and its Ridge baseline): RMSE, MAE, R² in the target's original units,
MAE/RMSE/bias per subgroup of ``sex`` and ``age`` bands where the table has those features, and
the cohorts of a shallow error-analysis tree (where the model is worst; descriptive).
CNN: accuracy, macro-F1, per-class recall and precision, confusion matrix, per-class errors
(most-confused-with class).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, count
from sklearn import metrics as skm
from torch import nn

from auditml_core import placement, training
from auditml_core.artifacts import json_bytes, read_json
from auditml_core.codebook import show_condition, show_value, units
from auditml_core.config import Config
from auditml_core.data import Dataset
from auditml_core.models import MODELS
from auditml_core.teacher import TrainedModel
from pipeline.train import TrainOutput

N_BOOTSTRAP = 1000  # resamples for the 95% confidence intervals
# Features whose groups a regulated reader asks about; each one present in a table gets a subgroup table.
SUBGROUP_FEATURES = ("sex", "age")
N_AGE_BANDS = 3  # equal-count bands of a continuous subgroup feature (tertiles of the test split)
COHORT_MAX_DEPTH = 2  # depth of the error-analysis tree: at most 2^depth cohorts, each a readable rule
COHORT_MIN_LEAF_FRACTION = 0.1  # smallest cohort as a share of the split's rows (no cohort of a handful of rows)


_CHUNK_ELEMENTS = 1 << 22  # resampled values gathered at once (~32 MiB per float64 array)


def bootstrap_cis(
    statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]], n_rows: int, *, seed: int, n: int = N_BOOTSTRAP
) -> dict[str, list[float]]:
    """Percentile 95% confidence intervals of several statistics over the same ``n`` seeded resamples.

    Vectorised: the resample indices are drawn in chunks of whole resamples (c, n_rows), and
    ``statistic(idx)`` returns ``{name: (c,) values}`` for a chunk. The chunks are consecutive draws
    of one generator, so the indices are those of drawing all ``(n, n_rows)`` at once, and every
    statistic sees the resamples a per-metric loop with the same seed drew.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n_rows))
    values: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, rows):
        idx = rng.integers(0, n_rows, size=(min(rows, n - start), n_rows))  # (c, N)
        for name, v in statistic(idx).items():
            values.setdefault(name, []).append(np.asarray(v, dtype=np.float64).reshape(-1))
    out = {}
    for name, chunks in values.items():
        lo, hi = np.nanpercentile(np.concatenate(chunks), [2.5, 97.5])
        out[name] = [float(lo), float(hi)]
    return out


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
    y: np.ndarray,
    pred: np.ndarray,
    *,
    seed: int,
    n: int = N_BOOTSTRAP,
) -> list[float]:
    """Percentile 95% CI of ``metric(y, pred)``; ``metric`` computes row-wise on (c, N) arrays."""
    return bootstrap_cis(lambda idx: {"m": metric(y[idx], pred[idx])}, len(y), seed=seed, n=n)["m"]


def rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root mean squared error along the last axis."""
    return np.sqrt(np.mean((a - b) ** 2, axis=-1))


def mae(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute error along the last axis."""
    return np.mean(np.abs(a - b), axis=-1)


def r2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Coefficient of determination of ``b`` predicting ``a``, along the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant resample has no R² (nan, skipped)
        return 1.0 - np.sum((a - b) ** 2, axis=-1) / np.sum((a - a.mean(axis=-1, keepdims=True)) ** 2, axis=-1)


def accuracy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal entries along the last axis."""
    return np.mean(a == b, axis=-1)


def regression_metrics(y: np.ndarray, pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """RMSE, MAE and R² (original units) with bootstrap 95% CIs (one set of resamples for all three)."""
    err = y - pred  # (N,): gathered once per resample instead of y and pred for each metric

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        e, yb = err[idx], y[idx]  # (c, N)
        sq = e**2
        with np.errstate(divide="ignore", invalid="ignore"):  # a constant resample has no R² (nan, skipped)
            r2_b = 1.0 - np.sum(sq, axis=-1) / np.sum((yb - yb.mean(axis=-1, keepdims=True)) ** 2, axis=-1)
        return {"rmse": np.sqrt(np.mean(sq, axis=-1)), "mae": np.mean(np.abs(e), axis=-1), "r2": r2_b}

    cis = bootstrap_cis(statistic, len(y), seed=seed)
    out: dict[str, Any] = {}
    for name, fn in (("rmse", rmse), ("mae", mae), ("r2", r2)):
        out[name] = float(fn(y, pred))
        out[f"{name}_ci95"] = cis[name]
    out["n"] = int(len(y))
    return out


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 over ``k`` classes along the last axis of integer label arrays (1-D -> scalar)."""
    # Confusion-matrix arithmetic (one bincount for all resamples): ~100x faster than sklearn's f1_score.
    y2, p2 = np.atleast_2d(y), np.atleast_2d(pred)  # (c, N)
    c = y2.shape[0]
    codes = np.arange(c)[:, None] * (k * k) + y2 * k + p2
    f1 = _f1_of_confusion(np.bincount(codes.ravel(), minlength=c * k * k).reshape(c, k, k))
    return f1 if np.ndim(y) > 1 else f1[0]


def _f1_of_confusion(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in ``cm`` (c, k, k) -> (c,)."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)  # (c, k)
    denom = cm.sum(axis=1) + cm.sum(axis=2)
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(axis=1)


def classification_metrics(
    y: np.ndarray, logits: np.ndarray, class_names: tuple[str, ...], *, seed: int
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall/precision and the confusion matrix, with bootstrap CIs."""
    k = len(class_names)
    labels = np.arange(k)
    pred = logits.argmax(axis=1)

    correct, codes = y == pred, y * k + pred  # (N,): one gather each per resample

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        c = idx.shape[0]
        cm = np.bincount((np.arange(c)[:, None] * (k * k) + codes[idx]).ravel(), minlength=c * k * k)
        return {"accuracy": np.mean(correct[idx], axis=-1), "macro_f1": _f1_of_confusion(cm.reshape(c, k, k))}

    cis = bootstrap_cis(statistic, len(y), seed=seed)

    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    precision = skm.precision_score(y, pred, labels=labels, average=None, zero_division=0)
    cm = skm.confusion_matrix(y, pred, labels=labels)
    return {
        "accuracy": float(accuracy(y, pred)),
        "accuracy_ci95": cis["accuracy"],
        "macro_f1": float(macro_f1(y, pred, k)),
        "macro_f1_ci95": cis["macro_f1"],
        "per_class_recall": {c: float(r) for c, r in zip(class_names, recall)},
        "per_class_precision": {c: float(p) for c, p in zip(class_names, precision)},
        "confusion_matrix": cm.tolist(),
        "per_class_errors": per_class_errors(cm, class_names),
        "class_names": list(class_names),
        "n": int(len(y)),
    }


def device_placement(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    builders: Mapping[str, Callable[[], nn.Module]],
    *,
    cuda_available: bool | None = None,
) -> placement.Placement:
    """Where the evaluate stage predicts: batches of up to 1024 test and validation rows per model."""
    work = []
    for name, entry in MODELS.items():
        ds = datasets[entry.dataset]
        n = len(ds.y["test"]) + len(ds.y["val"])
        work.append((builders[name], tuple(ds.x["test"].shape[1:]), min(n, 1024), n))
    return placement.stage_placement("evaluate", requested=cfg.train.device, work=work, cuda_available=cuda_available)


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
    where = device_placement(cfg, inputs["data"], {n: trained.models[n].build for n in MODELS})
    if runtime is not None:
        runtime.record_placement(where)
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, entry in MODELS.items():
        ds: Dataset = inputs["data"][entry.dataset]
        model = trained.models[name].build().to(where.torch_device)
        preds[name] = {s: training.predict(model, ds.x[s], device=where.torch_device) for s in ("test", "val")}
        out[name] = {split: _metrics(ds, split, preds[name][split], seed=seed) for split in ("test", "val")}
        if name in trained.public_only:
            out[name]["public_only"] = public_only_comparison(
                ds, trained.models[name], trained.public_only[name], seed=seed
            )
    tab: Dataset = inputs["data"][MODELS["regressor"].dataset]
    preds["ridge"] = {s: trained.ridge.predict(tab.x[s]) for s in ("test", "val")}
    out["ridge"] = {split: _metrics(tab, split, preds["ridge"][split], seed=seed) for split in ("test", "val")}
    for name in ("regressor", "ridge"):  # the test split's error cohorts, looked up again on the validation split
        cohorts = out[name]["test"].get("cohorts")
        if cohorts:
            replicate_cohorts(cohorts, tab, "val", preds[name]["val"], seed=seed)
    out["regressor"]["vs_ridge"] = baseline_comparison(
        tab, preds["regressor"]["test"], preds["ridge"]["test"], seed=seed
    )
    return out


def baseline_comparison(ds: Dataset, model_pred: np.ndarray, ridge_pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """The regressor against its Ridge baseline on the test split: R² difference with a paired bootstrap interval.

    Both predict the same resampled test rows (a paired difference, as :func:`public_only_comparison`).
    When the interval contains 0 the two cannot be told apart on this test split.
    """
    y, p_model, p_ridge = (ds.target_to_original(v) for v in (ds.y["test"], model_pred, ridge_pred))

    def gain(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"gain": r2(y[idx], p_model[idx]) - r2(y[idx], p_ridge[idx])}

    value = float(r2(y, p_model) - r2(y, p_ridge))
    interval = bootstrap_cis(gain, len(y), seed=seed)["gain"]
    distinguishable = bool(interval[0] > 0 or interval[1] < 0)
    return {
        "metric": "r2",
        "value": value,
        "ci95": interval,
        "distinguishable": distinguishable,
        "better": None if not distinguishable else ("regressor" if value > 0 else "ridge"),
        "n": int(len(y)),
        "method": "regressor minus Ridge test R²; paired percentile bootstrap over the test rows",
    }


def replicate_cohorts(
    cohorts: dict[str, Any], ds: Dataset, split: str, pred: np.ndarray, *, seed: int
) -> dict[str, Any]:
    """Add to each cohort (found on the test split) its rows, MAE and MAE ratio on another split, in place.

    The tree that found the cohorts was fitted on the test rows it describes; the same rules applied to
    ``split`` (rows the tree never saw) say whether a cohort's excess error holds up: ``replicates`` is
    True when its MAE there is above that split's overall MAE beyond the bootstrap interval, False when
    its MAE ratio there is at most 1, None in between (same direction, not confirmed) or with no rows.
    """
    x = _dataset_units(ds, split)
    y, p = ds.target_to_original(ds.y[split]), ds.target_to_original(pred)
    abs_err = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(p, dtype=np.float64))
    overall = float(abs_err.mean()) if len(abs_err) else 0.0
    for c in cohorts["cohorts"]:
        mask = np.ones(len(abs_err), dtype=bool)
        for cond in c["conditions"]:
            col = x[:, cond["feature_index"]]
            mask &= col <= cond["threshold"] if cond["op"] == "<=" else col > cond["threshold"]
        e = abs_err[mask]
        rep: dict[str, Any] = {"split": split, "n": int(mask.sum()), "overall_mae": overall}
        if len(e):
            ci95 = bootstrap_cis(lambda idx, e=e: {"m": e[idx].mean(axis=-1)}, len(e), seed=seed)["m"]
            ratio = float(e.mean() / overall) if overall > 0 else None
            verdict = None if ratio is None else (True if ci95[0] > overall else (False if ratio <= 1 else None))
            rep |= {"mae": float(e.mean()), "mae_ci95": ci95, "mae_ratio": ratio, "replicates": verdict}
        else:
            rep |= {"mae": None, "mae_ci95": None, "mae_ratio": None, "replicates": None}
        c["replication"] = rep
    cohorts["replication_note"] = (
        f"each cohort's rule applied to the {split} split, which the tree never saw: it replicates when its MAE "
        f"there is above the {split} split's overall MAE beyond its 95% bootstrap interval; a ratio at most 1 "
        "means it does not"
    )
    return cohorts


def public_only_comparison(
    ds: Dataset, released: TrainedModel, public_state: Mapping[str, Any], *, seed: int
) -> dict[str, Any]:
    """The public-only baseline (the same architecture after public pretraining alone) against the released model.

    Returns its test metrics and ``private_gain``: the released model's headline test metric minus the
    baseline's, with a paired 95% bootstrap interval (the same resampled test rows for both models). A gain
    whose interval reaches 0 means DP training on the private split added nothing measurable.
    """
    baseline = TrainedModel(spec=released.spec, state_dict=public_state, training={}).build()
    x, y = ds.x["test"], ds.y["test"]
    p_released, p_public = training.predict(released.build(), x), training.predict(baseline, x)
    if ds.task == "regression":
        key, metric = "r2", r2
        y_eval, released_pred, public_pred = (ds.target_to_original(v) for v in (y, p_released, p_public))
    else:
        key, metric = "accuracy", accuracy
        y_eval, released_pred, public_pred = y, p_released.argmax(axis=1), p_public.argmax(axis=1)

    def gain(idx: np.ndarray) -> dict[str, np.ndarray]:
        # The same resampled rows (c, N) for both models: a paired difference.
        return {"gain": metric(y_eval[idx], released_pred[idx]) - metric(y_eval[idx], public_pred[idx])}

    value = float(metric(y_eval, released_pred) - metric(y_eval, public_pred))
    interval = bootstrap_cis(gain, len(y_eval), seed=seed)["gain"]
    return {
        "description": "the same architecture after public pretraining only (no private record), on the test split",
        "metric": key,
        "test": _metrics(ds, "test", p_public, seed=seed),
        "private_gain": {
            "metric": key,
            "value": value,
            "ci95": interval,
            "measurable": bool(interval[0] > 0),
            "method": "released minus public-only test metric; paired percentile bootstrap over test rows",
        },
    }


def _metrics(ds: Dataset, split: str, pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Metrics of raw model outputs ``pred`` against ``split``'s labels (regression in original units)."""
    if ds.task == "regression":
        y, p = ds.target_to_original(ds.y[split]), ds.target_to_original(pred)
        out = regression_metrics(y, p, seed=seed)
        groups = subgroup_metrics(ds, split, y, p, seed=seed)
        if groups:
            out["subgroups"] = groups
        out["cohorts"] = cohort_errors(
            _dataset_units(ds, split), list(ds.feature_names or []), y, p, seed=seed, codebook=ds.codebook
        )
        return out
    out = classification_metrics(ds.y[split], pred, ds.class_names, seed=seed)
    if ds.groups:
        # the same key as the regressor's tables: the report's subgroup verdict reads accuracy rows there too
        out["subgroups"] = {
            "group": classification_group_metrics(ds.y[split], pred.argmax(axis=1), ds.groups[split], seed=seed)
        }
    return out


def _bias(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of prediction minus target (signed; scikit-learn and Fairlearn have no such metric)."""
    return float(np.mean(np.asarray(y_pred) - np.asarray(y_true)))


def _macro_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (balanced accuracy without its warnings)."""
    return float(skm.recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def _frame_summary(mf: MetricFrame, names: tuple[str, ...], ratio_names: tuple[str, ...]) -> dict[str, Any]:
    """MetricFrame's between-group differences (max - min) and ratios (min / max) as JSON-safe numbers."""
    diff, ratio = mf.difference(method="between_groups"), mf.ratio(method="between_groups")

    def num(v: Any) -> float | None:
        return float(v) if np.isfinite(v) else None  # a ratio over a group with metric 0 has no value

    return {
        "differences": {k: num(diff[k]) for k in names},
        "ratios": {k: num(ratio[k]) for k in ratio_names},
        "method": "fairlearn.metrics.MetricFrame: by_group, difference(method='between_groups') = largest minus "
        "smallest group value, ratio(method='between_groups') = smallest over largest; 95% intervals per group: "
        f"percentile bootstrap ({N_BOOTSTRAP} resamples of the group's rows)",
    }


def _frame(metrics: Mapping[str, Callable], y: np.ndarray, pred: np.ndarray, codes: np.ndarray) -> MetricFrame:
    """One MetricFrame over integer group ``codes`` (kept in code order, not the labels' string order)."""
    return MetricFrame(
        metrics={"n": count, **metrics}, y_true=y, y_pred=pred, sensitive_features=pd.Series(codes, name="group")
    )


REGRESSION_GROUP_METRICS: dict[str, Callable] = {
    "mae": skm.mean_absolute_error,
    "rmse": skm.root_mean_squared_error,
    "bias": _bias,
}
CLASSIFICATION_GROUP_METRICS: dict[str, Callable] = {"accuracy": skm.accuracy_score, "macro_recall": _macro_recall}


def subgroup_metrics(ds: Dataset, split: str, y: np.ndarray, pred: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Error per group of each :data:`SUBGROUP_FEATURES` feature the table has, through Fairlearn's ``MetricFrame``.

    A feature with at most 5 distinct values is split by value; a continuous one into
    :data:`N_AGE_BANDS` equal-count bands of the split. Values are in the dataset's units (for
    scikit-learn's diabetes data: already mean-centred and scaled, so a band is a range of scaled
    values, not years). A ``data.codebook`` names coded values (``sex = female (1)``) and gives bands their units.
    MetricFrame computes each group's MAE, RMSE and bias and their between-group differences and ratios;
    each group's 95% intervals are the project's percentile bootstrap over that group's rows.

    Returns
    -------
    dict
        ``{feature: {"kind", "groups": [{"group", "n", "mae", "mae_ci95", "rmse", "rmse_ci95", "bias",
        "bias_ci95"}], "mae_gap", "differences", "ratios", "method"}}``; ``bias`` is mean(prediction - target),
        ``mae_gap`` (= ``differences["mae"]``) the largest minus the smallest group MAE.
    """
    names = list(ds.feature_names or [])
    x = _dataset_units(ds, split)
    out: dict[str, Any] = {}
    for feat in (f for f in SUBGROUP_FEATURES if f in names):
        col = x[:, names.index(feat)]
        values, codes = np.unique(np.round(col, 6), return_inverse=True)
        if len(values) <= 5:
            kind = "value"
            labels = [f"{feat} = {show_value(ds.codebook, feat, v)}" for v in values]
        else:
            kind = f"{N_AGE_BANDS} equal-count bands"
            edges = np.quantile(col, np.linspace(0, 1, N_AGE_BANDS + 1))
            codes = np.clip(np.searchsorted(edges, col, side="right") - 1, 0, N_AGE_BANDS - 1)
            unit = f" {units(ds.codebook, feat)}".rstrip()
            labels = [f"{feat} in [{edges[b]:.4g}, {edges[b + 1]:.4g}]{unit}" for b in range(N_AGE_BANDS)]
        mf = _frame(REGRESSION_GROUP_METRICS, y, pred, codes)
        groups = []
        for code, row in mf.by_group.iterrows():  # only the groups with rows, in code order
            mask = codes == code
            yy, err = y[mask], pred[mask] - y[mask]
            cis = bootstrap_cis(  # the same resamples for all three; mae_ci95 is what bootstrap_ci(mae, ...) gave
                lambda idx, e=err: {
                    "mae": np.mean(np.abs(e[idx]), axis=-1),
                    "rmse": np.sqrt(np.mean(e[idx] ** 2, axis=-1)),
                    "bias": np.mean(e[idx], axis=-1),
                },
                len(yy),
                seed=seed,
            )
            groups.append({"group": labels[int(code)], "n": int(row["n"])})
            for name in REGRESSION_GROUP_METRICS:
                groups[-1] |= {name: float(row[name]), f"{name}_ci95": cis[name]}
        summary = _frame_summary(mf, ("mae", "rmse", "bias"), ("mae", "rmse"))  # a ratio of signed biases means nothing
        out[feat] = {"kind": kind, "groups": groups, "mae_gap": summary["differences"]["mae"], **summary}
    return out


def classification_group_metrics(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Accuracy and macro recall per group of the images' ``group`` labels, through Fairlearn's ``MetricFrame``.

    Parameters
    ----------
    y, pred : ``(n,)`` true and predicted class indices.
    groups : ``(n,)`` group labels (str) of the same rows.
    seed : seeds each group's bootstrap.

    Returns
    -------
    dict
        ``{"kind", "groups": [{"group", "n", "accuracy", "accuracy_ci95", "macro_recall", "macro_recall_ci95"}],
        "accuracy_gap", "differences", "ratios", "method"}``; ``macro_recall`` is the mean recall over the classes
        the group has, ``accuracy_gap`` (= ``differences["accuracy"]``) the largest minus the smallest group accuracy.
    """
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    labels, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    mf = _frame(CLASSIFICATION_GROUP_METRICS, y, pred, codes)
    k = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    out = []
    for code, row in mf.by_group.iterrows():
        mask = codes == code
        correct, yy = y[mask] == pred[mask], y[mask]

        def statistic(idx: np.ndarray, correct=correct, yy=yy) -> dict[str, np.ndarray]:
            # per resample: recall of each class = correct rows of that class / rows of that class, averaged over
            # the classes the resample holds (what _macro_recall computes on one sample), by one bincount
            c = idx.shape[0]
            flat = (np.arange(c)[:, None] * k + yy[idx]).ravel()
            support = np.bincount(flat, minlength=c * k).reshape(c, k)
            hits = np.bincount(flat, weights=correct[idx].ravel(), minlength=c * k).reshape(c, k)
            with np.errstate(invalid="ignore"):
                recall = np.nanmean(np.where(support > 0, hits / np.maximum(support, 1), np.nan), axis=1)
            return {"accuracy": correct[idx].mean(axis=-1), "macro_recall": recall}

        cis = bootstrap_cis(statistic, int(mask.sum()), seed=seed)
        out.append({"group": str(labels[int(code)]), "n": int(row["n"])})
        for name in CLASSIFICATION_GROUP_METRICS:
            out[-1] |= {name: float(row[name]), f"{name}_ci95": cis[name]}
    summary = _frame_summary(mf, ("accuracy", "macro_recall"), ("accuracy", "macro_recall"))
    return {"kind": "value", "groups": out, "accuracy_gap": summary["differences"]["accuracy"], **summary}


def _dataset_units(ds: Dataset, split: str) -> np.ndarray:
    """The split's features in the dataset's own units (the standardisation undone)."""
    x_mean = np.asarray(ds.preprocessing.get("x_mean", 0.0), dtype=np.float64)
    x_std = np.asarray(ds.preprocessing.get("x_std", 1.0), dtype=np.float64)
    return np.asarray(ds.x[split], dtype=np.float64) * x_std + x_mean


def cohort_errors(
    x: np.ndarray,
    feature_names: list[str],
    y: np.ndarray,
    pred: np.ndarray,
    *,
    seed: int,
    max_depth: int = COHORT_MAX_DEPTH,
    min_leaf_fraction: float = COHORT_MIN_LEAF_FRACTION,
    codebook: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where the model is worst: a shallow regression tree on the features predicting the absolute error.

    The idea of the error-analysis tree in Microsoft's Responsible AI Toolbox, with scikit-learn's
    ``DecisionTreeRegressor`` (that toolbox's tree comes with a dashboard this static report cannot
    embed). Each leaf is a cohort described by a rule on the features (dataset units); its MAE gets
    a bootstrap CI. The leaves partition the rows, so the row-weighted mean of the cohort MAEs is the
    overall MAE. Descriptive only: the tree is fitted on the very rows it describes (the test split),
    so the worst cohort's MAE is optimistic about being the worst and needs fresh data to confirm.

    Parameters
    ----------
    x : ``(n, F)`` features in dataset units.
    feature_names : ``F`` names (``x0, ...`` if empty).
    y, pred : ``(n,)`` targets and predictions (target units).
    seed : seeds the tree's tie-breaking and the bootstrap.
    max_depth : tree depth (2 or 3 keeps rules readable).
    min_leaf_fraction : smallest cohort as a share of ``n``.
    codebook : ``data.codebook`` (normalised): rules on coded columns name the labels, thresholds carry units.

    Returns
    -------
    dict
        ``{"method", "max_depth", "min_leaf_rows", "n", "overall_mae", "cohorts": [{"rule", "n", "share",
        "mae", "mae_ci95", "mae_ratio", "bias"}], "descriptive": note}``, cohorts sorted by MAE, worst first.
    """
    from sklearn.tree import DecisionTreeRegressor

    x = np.asarray(x, dtype=np.float64)
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    names = list(feature_names) or [f"x{i}" for i in range(x.shape[1])]
    abs_err = np.abs(y - pred)
    n = len(y)
    min_leaf = max(1, int(np.ceil(min_leaf_fraction * n)))
    tree = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=min_leaf, random_state=seed % 2**32)
    tree.fit(x, abs_err)
    leaves = tree.apply(x)
    conditions = _leaf_conditions(tree.tree_, names)
    overall = float(abs_err.mean())
    cohorts = [
        _cohort(leaves == leaf, conditions[int(leaf)], y=y, pred=pred, overall=overall, seed=seed, codebook=codebook)
        for leaf in np.unique(leaves)
    ]
    cohorts.sort(key=lambda c: -c["mae"])
    return {
        "method": "scikit-learn DecisionTreeRegressor on the features, predicting |target - prediction|",
        "max_depth": int(max_depth),
        "min_leaf_rows": min_leaf,
        "n": int(n),
        "overall_mae": overall,
        "cohorts": cohorts,
        "descriptive": "found on the same rows it describes: a description of where the errors of this split lie, "
        "not a tested finding; confirm a cohort on new data before acting on it",
    }


def _leaf_conditions(t: Any, names: list[str]) -> dict[int, list[dict[str, Any]]]:
    """The path to every node of a fitted sklearn tree (``tree_``): its conditions, root first, by node id."""
    conditions: dict[int, list[dict[str, Any]]] = {0: []}
    for node in range(t.node_count):  # parents come before children in sklearn's node order
        left, right = t.children_left[node], t.children_right[node]
        if left == -1:
            continue
        f, thr = int(t.feature[node]), float(t.threshold[node])
        conditions[left] = conditions[node] + [{"feature": names[f], "feature_index": f, "op": "<=", "threshold": thr}]
        conditions[right] = conditions[node] + [{"feature": names[f], "feature_index": f, "op": ">", "threshold": thr}]
    return conditions


def _cohort(
    mask: np.ndarray,
    conditions: list[dict[str, Any]],
    *,
    y: np.ndarray,
    pred: np.ndarray,
    overall: float,
    seed: int,
    codebook: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One leaf's cohort (rows ``mask``): its rule, size, MAE with a bootstrap CI, MAE over the overall MAE, bias."""
    e = np.abs(y[mask] - pred[mask])
    return {
        "rule": " and ".join(show_condition(codebook, c["feature"], c["op"], c["threshold"]) for c in conditions)
        or "all rows",
        "conditions": conditions,
        "n": int(mask.sum()),
        "share": float(mask.mean()),
        "mae": float(e.mean()),
        "mae_ci95": bootstrap_cis(lambda idx: {"m": e[idx].mean(axis=-1)}, len(e), seed=seed)["m"],
        "mae_ratio": float(e.mean() / overall) if overall > 0 else None,
        "bias": float(np.mean(pred[mask] - y[mask])),
    }


def per_class_errors(cm: np.ndarray, class_names: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """Per true class: support, recall, errors and the class it is most often mistaken for (from the confusion matrix).

    Returns
    -------
    list of dict
        ``{"class", "support", "correct", "errors", "recall", "most_confused_with", "most_confused_count"}``;
        ``most_confused_with`` is None for a class with no errors.
    """
    cm = np.asarray(cm, dtype=np.int64)
    out = []
    for i, name in enumerate(class_names):
        row = cm[i].copy()
        support, correct = int(row.sum()), int(row[i])
        row[i] = -1
        j = int(np.argmax(row))
        confused = int(row[j]) if row[j] > 0 else 0
        out.append(
            {
                "class": str(name),
                "support": support,
                "correct": correct,
                "errors": support - correct,
                "recall": correct / support if support else None,
                "most_confused_with": str(class_names[j]) if confused else None,
                "most_confused_count": confused,
            }
        )
    return out


def dump(out: Mapping[str, Any]) -> dict[str, bytes]:
    return {"metrics/evaluation.json": json_bytes(out)}


def load(read) -> dict[str, Any]:
    return read_json(read("metrics/evaluation.json"))
