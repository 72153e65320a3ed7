"""Partial dependence (scikit-learn on a wrapped predict function), dependence and error-example plots."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from explain import Explanation, plots
from explain.dependence import partial_dependence, strongest_interaction

PNG = b"\x89PNG\r\n\x1a\n"


def test_pdp_of_a_linear_model_is_a_straight_line_with_its_slope():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    w, b = np.array([0.5, -2.0, 3.25, 0.0]), 0.7
    for f in range(4):
        res = partial_dependence(lambda a: a @ w + b, X, f, grid_resolution=15)
        slopes = np.diff(res.average) / np.diff(res.grid)
        np.testing.assert_allclose(slopes, w[f], atol=1e-5)
        # The PDP at each grid value is the mean of the ICE curves; every ICE curve has the same slope.
        np.testing.assert_allclose(res.average, res.individual.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(np.diff(res.individual, axis=1) / np.diff(res.grid), w[f], atol=1e-5)
        assert res.individual.shape == (40, len(res.grid))
        assert res.grid.min() >= X[:, f].min() and res.grid.max() <= X[:, f].max()


def test_partial_dependence_rejects_bad_inputs():
    X = np.zeros((5, 3))
    with pytest.raises(ValueError, match="feature=3 is out of range"):
        partial_dependence(lambda a: a.sum(axis=1), X, 3)
    with pytest.raises(ValueError, match="2-D table"):
        partial_dependence(lambda a: a.sum(axis=1), X[0], 0)


def test_strongest_interaction_finds_the_multiplying_feature():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4))
    # f = x0 * x2: the SHAP values of x0 are proportional to x0 * x2, so x2 explains their spread.
    values = np.column_stack([0.5 * x[:, 0] * x[:, 2], np.zeros(200), 0.5 * x[:, 0] * x[:, 2], np.zeros(200)])
    assert strongest_interaction(values, x, 0) == 2


def test_dependence_pdp_and_misclassified_plots_are_pngs_and_close_their_figures():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 3))
    expl = Explanation(
        method="shap-exact",
        values=x * np.array([1.0, -0.5, 0.2]),
        inputs=x,
        outputs=x.sum(axis=1),
        base_values=np.zeros(30),
        targets=None,
        feature_names=("a", "b", "c"),
        seconds=0.0,
    )
    before = plt.get_fignums()
    res = partial_dependence(lambda a: a.sum(axis=1), x, 1, grid_resolution=5)
    imgs = rng.random(size=(12, 1, 8, 8))
    truth, pred = np.arange(12) % 3, (np.arange(12) + (np.arange(12) % 2)) % 3
    for png in (
        plots.dependence_png(expl, feature=0, interaction=1),
        plots.dependence_png(expl, feature=2),
        plots.pdp_ice_png(res, feature_name="b", output_label="y"),
        plots.misclassified_grid_png(imgs, truth, pred, class_names=["0", "1", "2"], per_class=2),
    ):
        assert png.startswith(PNG) and len(png) > 1000
    assert plt.get_fignums() == before
    with pytest.raises(ValueError, match="interaction=5 is out of range"):
        plots.dependence_png(expl, feature=0, interaction=5)
