"""The vectorised bootstrap gives the intervals of the original per-resample loop."""

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import evaluate


def _loop_ci(metric, y, pred, *, seed, n=evaluate.N_BOOTSTRAP):
    # the pre-vectorisation implementation, kept as the reference
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    values = np.array([float(metric(y[i], pred[i])) for i in idx])
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


@pytest.mark.parametrize("name", ["rmse", "mae", "r2"])
def test_regression_ci_matches_loop(rng, name, monkeypatch):
    y = rng.normal(size=150)
    pred = y + rng.normal(scale=0.5, size=150)
    fn = getattr(evaluate, name)
    expected = _loop_ci(fn, y, pred, seed=3)
    monkeypatch.setattr(evaluate, "_CHUNK_ELEMENTS", 150 * 7)  # several chunks, the last one partial
    got = evaluate.bootstrap_ci(fn, y, pred, seed=3)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got[0] < float(fn(y, pred)) < got[1]


def test_classification_ci_matches_loop_and_sklearn(rng, monkeypatch):
    k = 4
    y = rng.integers(0, k, size=120)
    pred = np.where(rng.random(120) < 0.7, y, rng.integers(0, k, size=120))
    assert float(evaluate.macro_f1(y, pred, k)) == pytest.approx(skm.f1_score(y, pred, average="macro"), rel=1e-12)

    def f1(a, b):
        return evaluate.macro_f1(a, b, k)

    monkeypatch.setattr(evaluate, "_CHUNK_ELEMENTS", 120 * 9)
    for metric in (evaluate.accuracy, f1):
        assert evaluate.bootstrap_ci(metric, y, pred, seed=5) == pytest.approx(
            _loop_ci(metric, y, pred, seed=5), rel=1e-12
        )
    assert evaluate.classification_metrics(y, np.eye(k)[pred], ("a", "b", "c", "d"), seed=0)["macro_f1"] == (
        pytest.approx(skm.f1_score(y, pred, average="macro"), rel=1e-12)
    )


def test_metric_trees_match_loop(rng):
    y = rng.normal(size=80)
    pred = y + rng.normal(scale=0.3, size=80)
    out = evaluate.regression_metrics(y, pred, seed=2)
    for name in ("rmse", "mae", "r2"):
        assert out[f"{name}_ci95"] == pytest.approx(_loop_ci(getattr(evaluate, name), y, pred, seed=2), rel=1e-12)
    k = 3
    yc = rng.integers(0, k, size=90)
    pc = np.where(rng.random(90) < 0.6, yc, rng.integers(0, k, size=90))
    out = evaluate.classification_metrics(yc, np.eye(k)[pc], ("a", "b", "c"), seed=4)
    assert out["accuracy_ci95"] == pytest.approx(_loop_ci(evaluate.accuracy, yc, pc, seed=4), rel=1e-12)
    assert out["macro_f1_ci95"] == pytest.approx(
        _loop_ci(lambda a, b: evaluate.macro_f1(a, b, k), yc, pc, seed=4), rel=1e-12
    )
