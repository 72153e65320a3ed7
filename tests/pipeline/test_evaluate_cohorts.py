"""Cohort error analysis (regressor) and per-class errors (CNN) of the evaluate stage."""

import numpy as np
from sklearn.metrics import confusion_matrix

from pipeline.evaluate import classification_metrics, cohort_errors, per_class_errors


def _rows_of(cohort, x):
    """Rows satisfying a cohort's recorded conditions, evaluated here independently of the tree."""
    mask = np.ones(len(x), dtype=bool)
    for c in cohort["conditions"]:
        col = x[:, c["feature_index"]]
        mask &= col <= c["threshold"] if c["op"] == "<=" else col > c["threshold"]
    return mask


def test_cohorts_partition_the_rows_and_average_to_the_overall_mae():
    rng = np.random.default_rng(0)
    n = 137
    x = rng.normal(size=(n, 4))
    y = rng.normal(size=n) * 40 + 150
    pred = y + rng.normal(size=n) * (5 + 20 * (x[:, 2] > 0.5))  # worse where feature c > 0.5
    out = cohort_errors(x, ["a", "b", "c", "d"], y, pred, seed=3, max_depth=2)
    cohorts = out["cohorts"]
    assert 2 <= len(cohorts) <= 4
    masks = np.array([_rows_of(c, x) for c in cohorts])
    assert (masks.sum(axis=0) == 1).all()  # every row in exactly one cohort
    overall = np.mean(np.abs(y - pred))
    assert abs(out["overall_mae"] - overall) < 1e-12
    for c, mask in zip(cohorts, masks):
        assert c["n"] == mask.sum() >= out["min_leaf_rows"] == int(np.ceil(0.1 * n))
        assert abs(c["mae"] - np.mean(np.abs(y - pred)[mask])) < 1e-9
        lo, hi = c["mae_ci95"]
        assert lo <= hi
    assert abs(sum(c["n"] * c["mae"] for c in cohorts) / n - overall) < 1e-9
    assert [c["mae"] for c in cohorts] == sorted((c["mae"] for c in cohorts), reverse=True)
    assert "c > " in cohorts[0]["rule"]  # the planted worst region is found
    assert "descriptive" in out


def test_min_leaf_size_bounds_the_number_of_cohorts():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=30)
    out = cohort_errors(x, [], y, y + rng.normal(size=30), seed=0, max_depth=3, min_leaf_fraction=0.4)
    assert all(c["n"] >= 12 for c in out["cohorts"]) and len(out["cohorts"]) <= 2
    assert sum(c["n"] for c in out["cohorts"]) == 30


def test_per_class_errors_sum_to_the_confusion_matrix_rows():
    rng = np.random.default_rng(2)
    k = 4
    y = rng.integers(0, k, size=200)
    logits = rng.normal(size=(200, k))
    logits[np.arange(200), y] += 1.0
    out = classification_metrics(y, logits, tuple(str(i) for i in range(k)), seed=0)
    cm = np.array(out["confusion_matrix"])
    np.testing.assert_array_equal(cm, confusion_matrix(y, logits.argmax(axis=1), labels=range(k)))
    for i, row in enumerate(out["per_class_errors"]):
        assert row["support"] == cm[i].sum() and row["correct"] + row["errors"] == cm[i].sum()
        assert row["correct"] == cm[i, i]
        others = np.delete(cm[i], i)
        assert row["most_confused_count"] == others.max()
        assert cm[i, int(row["most_confused_with"])] == others.max() and row["most_confused_with"] != str(i)
        assert abs(row["recall"] - out["per_class_recall"][str(i)]) < 1e-12


def test_a_class_without_errors_has_no_confusion_partner():
    out = per_class_errors(np.array([[5, 0], [2, 3]]), ("a", "b"))
    assert out[0]["most_confused_with"] is None and out[0]["errors"] == 0
    assert out[1] == {
        "class": "b",
        "support": 5,
        "correct": 3,
        "errors": 2,
        "recall": 0.6,
        "most_confused_with": "a",
        "most_confused_count": 2,
    }
