"""SHAP members: additivity, base values, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_test_models import LINEAR_WEIGHTS, N_FEATURES
from torch import nn

from explain import additivity_error, get_explainer, make_predict_fn


def _explain(name, model, x, bg, task="regression", **kw):
    return get_explainer(name)(model, x, background=bg, task=task, seed=kw.pop("seed", 0), **kw)


@pytest.mark.parametrize("name", ["shap-deep", "shap-kernel"])
def test_exact_explainers_are_additive_on_mlp(name, mlp, tabular):
    e = _explain(name, mlp, tabular[:20], tabular[20:])
    res = additivity_error(e, make_predict_fn(mlp, task="regression"))
    # float32 model: measured max relative error ~6e-7; 1e-4 leaves room for BLAS differences only.
    assert res.max_rel_error <= 1e-4, res
    np.testing.assert_allclose(e.base_values, make_predict_fn(mlp, task="regression")(tabular[20:]).mean(), rtol=1e-5)


def test_deep_is_additive_on_cnn_for_predicted_and_given_classes(cnn, images):
    predict = make_predict_fn(cnn, task="classification")
    e = _explain("shap-deep", cnn, images[:6], images[10:], task="classification")
    np.testing.assert_array_equal(e.targets, predict(images[:6]).argmax(axis=1))
    assert additivity_error(e, predict).max_rel_error <= 1e-4  # measured ~7e-6 (float32)
    targets = np.array([0, 3, 3, 7, 9, 1])
    e2 = _explain("shap-deep", cnn, images[:6], images[10:], task="classification", targets=targets)
    np.testing.assert_array_equal(e2.targets, targets)
    np.testing.assert_allclose(e2.outputs, predict(images[:6])[np.arange(6), targets], rtol=1e-6)
    np.testing.assert_allclose(e2.base_values, predict(images[10:]).mean(axis=0)[targets], rtol=1e-5)
    assert additivity_error(e2, predict).max_rel_error <= 1e-4


def test_deep_and_kernel_recover_linear_model_exactly(linear, tabular):
    exact = LINEAR_WEIGHTS * (tabular[:5] - tabular[20:].mean(axis=0))
    for name in ("shap-deep", "shap-kernel"):
        e = _explain(name, linear, tabular[:5], tabular[20:])
        np.testing.assert_allclose(e.values, exact, atol=1e-5)


def test_gradient_explainer_is_approximately_additive(mlp, tabular, cnn, images):
    # Expected gradients are a Monte-Carlo estimate: measured mean relative error
    # 0.12 (MLP) and 0.07 (CNN) at nsamples=200, max 0.25. Bounds sit ~1.5x above.
    e = _explain("shap-gradient", mlp, tabular[:20], tabular[20:])
    res = additivity_error(e)
    assert res.mean_rel_error <= 0.2 and res.max_rel_error <= 0.4, res
    e = _explain("shap-gradient", cnn, images[:6], images[10:], task="classification")
    res = additivity_error(e)
    assert res.mean_rel_error <= 0.2 and res.max_rel_error <= 0.4, res


def test_gradient_explainer_exact_on_linear_model_up_to_background_draws(linear, tabular):
    # On a linear model the gradient is constant, so the only error is which
    # background rows were drawn: values = w * (x - mean of drawn rows).
    e = _explain("shap-gradient", linear, tabular[:3], tabular[20:], nsamples=2000)
    exact = LINEAR_WEIGHTS * (tabular[:3] - tabular[20:].mean(axis=0))
    np.testing.assert_allclose(e.values, exact, atol=0.15)
    assert np.all(e.values[:, 3:] == 0)


@pytest.mark.parametrize("name", ["shap-deep", "shap-gradient", "shap-kernel"])
def test_same_seed_same_values(name, mlp, tabular):
    kw = {"nsamples": 50} if name == "shap-gradient" else {"nsamples": 100} if name == "shap-kernel" else {}
    a = _explain(name, mlp, tabular[:4], tabular[20:40], seed=11, **kw)
    b = _explain(name, mlp, tabular[:4], tabular[20:40], seed=11, **kw)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.extras["seed"] == 11


def test_gradient_row_values_do_not_depend_on_batch(mlp, tabular):
    full = _explain("shap-gradient", mlp, tabular[:4], tabular[20:40], nsamples=50, seed=5)
    row = _explain("shap-gradient", mlp, tabular[:1], tabular[20:40], nsamples=50, seed=5)
    np.testing.assert_array_equal(full.values[:1], row.values)
    other = _explain("shap-gradient", mlp, tabular[:1], tabular[20:40], nsamples=50, seed=6)
    assert not np.array_equal(other.values, row.values)


def test_deep_leaves_no_shap_state_on_custom_module(images):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))

        def forward(self, x):
            return self.head(self.features(x))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Net().eval()
    e = _explain("shap-deep", net, images[:2], images[10:20], task="classification")
    assert additivity_error(e).max_rel_error <= 1e-4
    for m in net.modules():
        assert not hasattr(m, "x") and not hasattr(m, "y")
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_kernel_classifier_explains_target_logit(tabular):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        clf = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    e = _explain("shap-kernel", clf, tabular[:4], tabular[20:40], task="classification")
    assert additivity_error(e, make_predict_fn(clf, task="classification")).max_rel_error <= 1e-4


def test_deep_refuses_model_it_cannot_propagate(images):
    class FunctionalRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(144, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.nn.functional.relu(self.conv(x)) ** 2, 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = FunctionalRelu().eval()
    with pytest.raises(ValueError, match="miss the model output.*use shap-gradient"):
        _explain("shap-deep", net, images[:2], images[10:20], task="classification")
    e = _explain("shap-deep", net, images[:2], images[10:20], task="classification", check_additivity=False)
    assert e.extras["max_additivity_gap"] > 1e-3
