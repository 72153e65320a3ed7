"""LIME members: determinism, value semantics, segmentation."""

from __future__ import annotations

import numpy as np
import pytest
from explain_test_models import LINEAR_WEIGHTS

from explain import get_explainer, grid_segments, make_predict_fn


def _lime_tab(model, x, bg, seed, **kw):
    return get_explainer("lime-tabular")(model, x, background=bg, task="regression", seed=seed, **kw)


def _lime_img(model, x, bg, seed, **kw):
    return get_explainer("lime-image")(model, x, background=bg, task="classification", seed=seed, **kw)


def test_lime_tabular_same_seed_identical_other_seed_differs(mlp, tabular):
    a = _lime_tab(mlp, tabular[:3], tabular[20:], 4, num_samples=300)
    b = _lime_tab(mlp, tabular[:3], tabular[20:], 4, num_samples=300)
    c = _lime_tab(mlp, tabular[:3], tabular[20:], 5, num_samples=300)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.base_values, b.base_values)
    assert not np.array_equal(a.values, c.values)
    # A row's explanation does not depend on the rows explained with it.
    single = _lime_tab(mlp, tabular[:1], tabular[20:], 4, num_samples=300)
    np.testing.assert_array_equal(single.values[0], a.values[0])


def test_lime_tabular_recovers_linear_contributions(linear, tabular):
    e = _lime_tab(linear, tabular[:5], tabular[20:], 0)
    exact = LINEAR_WEIGHTS * (tabular[:5] - tabular[20:].mean(axis=0))
    # Ridge (alpha=1) shrinks the coefficients slightly: measured max error 0.04 on values up to 3.6.
    np.testing.assert_allclose(e.values, exact, atol=0.1)
    assert np.all(e.extras["score"] > 0.99)
    # base + values is the surrogate's prediction at x.
    np.testing.assert_allclose(e.base_values + e.values.sum(axis=1), e.extras["local_pred"], rtol=1e-6)
    assert e.extras["coefficients"].shape == (5, 10)


def test_lime_image_same_seed_identical(cnn, images):
    a = _lime_img(cnn, images[:3], images[10:], 9, num_samples=200)
    b = _lime_img(cnn, images[:3], images[10:], 9, num_samples=200)
    c = _lime_img(cnn, images[:3], images[10:], 10, num_samples=200)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    assert a.values.shape == (3, 1, 8, 8) and a.extras["n_segments"] == [16, 16, 16]
    np.testing.assert_array_equal(a.targets, make_predict_fn(cnn, task="classification")(images[:3]).argmax(1))


def test_lime_image_values_are_constant_within_a_segment(cnn, images):
    e = _lime_img(cnn, images[:2], images[10:], 0, num_samples=200, cell_size=4)
    seg = e.extras["segments"][0]
    assert seg.max() == 3
    for s in range(4):
        cell = e.values[0, 0][seg == s]
        assert np.ptp(cell) == 0
    # Segment weights are spread over pixels: per-image sum equals the surrogate's weights.
    np.testing.assert_allclose(e.base_values + e.values.reshape(2, -1).sum(axis=1), e.extras["local_pred"], rtol=1e-6)


def test_quiet_sampler_matches_lime(cnn, images):
    from lime.lime_image import LimeImageExplainer

    from explain.lime_image import _lime_explainer_class

    image = np.transpose(images[0], (1, 2, 0)).astype(np.float64)
    fudged = np.zeros_like(image)
    seg = grid_segments(8, 8, cell_size=2)
    predict = make_predict_fn(cnn, task="classification")
    fn = lambda hwc: predict(np.transpose(hwc, (0, 3, 1, 2)))  # noqa: E731
    ours = _lime_explainer_class()(random_state=3).data_labels(image, fudged, seg, fn, 50)
    theirs = LimeImageExplainer(random_state=3).data_labels(image, fudged, seg, fn, 50, batch_size=10)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)


def test_lime_image_slic_and_callable_segmentation(cnn, images):
    e = _lime_img(cnn, images[:1], images[10:], 0, num_samples=100, segmentation="slic", n_segments=8)
    assert 1 <= e.extras["n_segments"][0] <= 16
    halves = lambda img: (np.arange(img.shape[1])[None, :] >= 4).repeat(img.shape[0], 0).astype(int)  # noqa: E731
    e = _lime_img(cnn, images[:1], images[10:], 0, num_samples=100, segmentation=halves)
    assert e.extras["n_segments"] == [2]


def test_grid_segments_cover_image_in_row_major_cells():
    seg = grid_segments(8, 8, cell_size=2)
    assert seg.shape == (8, 8) and seg.max() == 15
    assert np.all(np.bincount(seg.ravel()) == 4)
    assert seg[0, 2] == 1 and seg[2, 0] == 4
    assert grid_segments(7, 7, cell_size=3).max() == 8  # ragged edge cells
    with pytest.raises(ValueError, match="cell_size=0 is not valid"):
        grid_segments(8, 8, cell_size=0)
