"""Registry lookup and the errors raised for bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explain import available_explainers, explain_all, get_explainer

NAMES = ("lime-image", "lime-tabular", "shap-deep", "shap-exact", "shap-gradient", "shap-kernel", "shap-permutation")


def test_available_names():
    assert available_explainers() == NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown explainer 'shap-tree'") as err:
        get_explainer("shap-tree")
    for name in NAMES:
        assert name in str(err.value)


def test_unknown_option_lists_valid_options(mlp, tabular):
    fn = get_explainer("lime-tabular")
    assert fn.options == ("kernel_width", "num_samples")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_samples'\].*num_samples"):
        fn(mlp, tabular[:2], background=tabular[20:], task="regression", seed=0, n_samples=10)


def _call(name, model, x, **kw):
    args = dict(background=kw.pop("background"), task=kw.pop("task", "regression"), seed=kw.pop("seed", 0))
    return get_explainer(name)(model, x, **args, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"x_shape": (2, 10, 1)}, r"x has shape \(2, 10, 1\); expected"),
        ({"x_shape": (0, 10)}, "x is empty"),
        ({"background_rows": 0}, "background is empty"),
        ({"bg_features": 9}, r"background rows have shape \(9,\) but x rows have shape \(10,\)"),
        ({"task": "ranking"}, "task='ranking' is not valid; use one of"),
        ({"seed": -1}, "seed=-1 is not valid"),
        ({"seed": None}, "seed=None is not valid"),
        ({"feature_names": ["a"]}, "feature_names has 1 names but x has 10 features"),
        ({"targets": np.array([0, 1])}, "targets were given for task='regression'"),
        ({"x_nan": True}, "NaN or infinite"),
    ],
)
def test_bad_inputs_raise_value_error_naming_value(mlp, tabular, kw, match):
    x = tabular[:2].copy()
    if "x_shape" in kw:
        x = np.zeros(kw.pop("x_shape"), dtype=np.float32)
    if kw.pop("x_nan", False):
        x[0, 0] = np.nan
    bg = tabular[20 : 20 + kw.pop("background_rows", 10), : kw.pop("bg_features", 10)]
    with pytest.raises(ValueError, match=match):
        _call("shap-deep", mlp, x, background=bg, **kw)


def test_classifier_target_checks(cnn, images):
    fn = get_explainer("shap-deep")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\]"):
        fn(cnn, images[:2], background=images[10:], task="classification", seed=0, targets=np.array([0, 10]))
    with pytest.raises(ValueError, match="task='regression' but the model returns 10 outputs"):
        fn(cnn, images[:2], background=images[10:], task="regression", seed=0)


def test_explainer_refuses_wrong_input_kind(mlp, cnn, tabular, images):
    with pytest.raises(ValueError, match=r"shap-exact explains tabular \(n, F\) inputs, not shape \(2, 1, 8, 8\)"):
        _call("shap-exact", cnn, images[:2], background=images[10:], task="classification")
    with pytest.raises(ValueError, match=r"lime-image explains image \(n, C, H, W\) inputs"):
        _call("lime-image", mlp, tabular[:2], background=tabular[20:], task="classification")
    with pytest.raises(ValueError, match="lime-image explains classifiers"):
        _call("lime-image", cnn, images[:2], background=images[10:], task="regression")


def test_model_in_training_mode_is_refused(tabular):
    model = nn.Sequential(nn.Linear(10, 1))  # training mode by default
    with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
        _call("shap-deep", model, tabular[:2], background=tabular[20:])


def test_bad_option_values(mlp, cnn, tabular, images):
    with pytest.raises(ValueError, match="num_samples=0 is not valid"):
        _call("lime-tabular", mlp, tabular[:1], background=tabular[20:], num_samples=0)
    with pytest.raises(ValueError, match="segmentation='quickshift' is not valid"):
        _call("lime-image", cnn, images[:1], background=images[10:], task="classification", segmentation="quickshift")
    with pytest.raises(ValueError, match="cell_size=9 exceeds the image side 8"):
        _call("lime-image", cnn, images[:1], background=images[10:], task="classification", cell_size=9)


def test_explain_all_runs_each_method_on_same_rows(mlp, tabular):
    out = explain_all(
        mlp,
        tabular[:3],
        methods=["shap-deep", "lime-tabular"],
        background=tabular[20:60],
        task="regression",
        seed=3,
        options={"lime-tabular": {"num_samples": 200}},
    )
    assert list(out) == ["shap-deep", "lime-tabular"]
    np.testing.assert_array_equal(out["shap-deep"].outputs, out["lime-tabular"].outputs)
    with pytest.raises(ValueError, match=r"options given for \['shap-kernel'\]"):
        explain_all(
            mlp,
            tabular[:1],
            methods=["shap-deep"],
            background=tabular[20:],
            task="regression",
            seed=0,
            options={"shap-kernel": {}},
        )


def test_global_rng_state_is_untouched(mlp, tabular):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    for name in ("shap-gradient", "shap-kernel", "lime-tabular"):
        _call(name, mlp, tabular[:2], background=tabular[20:40])
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_model_with_leftover_opacus_hooks_is_refused(tabular):
    def capture_activations_hook(module, inputs, output):  # stands in for Opacus' hook
        return None

    capture_activations_hook.__module__ = "opacus.grad_sample.grad_sample_module"
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    handle = model[0].register_forward_hook(capture_activations_hook)
    try:
        with pytest.raises(ValueError, match=r"Opacus hooks on \['Linear'\].*fresh model"):
            _call("shap-deep", model, tabular[:2], background=tabular[20:])
    finally:
        handle.remove()
    _call("shap-deep", model, tabular[:2], background=tabular[20:])  # fine once the hook is gone


def test_input_kind_error_does_not_mask_nan_error(mlp, tabular):
    x = tabular[:2].copy()
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        _call("lime-tabular", mlp, x, background=tabular[20:])


def test_real_opacus_wrapper_and_hooks_are_refused(tabular):
    opacus = pytest.importorskip("opacus")
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 1))
    gsm = opacus.GradSampleModule(model)
    gsm.eval()
    with pytest.raises(ValueError, match="wrapped by Opacus"):
        _call("shap-deep", gsm, tabular[:2], background=tabular[20:])
    with pytest.raises(ValueError, match="Opacus hooks"):
        _call("shap-deep", gsm._module, tabular[:2], background=tabular[20:])
    gsm.remove_hooks()
    e = _call("shap-deep", gsm._module, tabular[:2], background=tabular[20:])
    assert e.values.shape == (2, 10)


def test_the_tabular_shap_method_follows_the_feature_count():
    """Issue 24 item 10: exact enumeration up to its cap, sampled orderings beyond it (chosen before any work)."""
    from explain import shap_exact, tabular_shap_method
    from explain.registry import MAX_EXACT_FEATURES

    assert MAX_EXACT_FEATURES == shap_exact.MAX_FEATURES
    assert tabular_shap_method(MAX_EXACT_FEATURES) == "shap-exact"
    assert tabular_shap_method(MAX_EXACT_FEATURES + 1) == "shap-permutation"


def test_permutation_shap_is_additive_seeded_and_close_to_exact_enumeration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    rng = np.random.default_rng(0)
    x, bg = rng.normal(size=(3, 12)).astype(np.float32), rng.normal(size=(10, 12)).astype(np.float32)
    state = np.random.get_state()[1].copy()
    a = _call("shap-permutation", model, x, background=bg, seed=4)
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's global RNG is left alone
    np.testing.assert_array_equal(a.values, _call("shap-permutation", model, x, background=bg, seed=4).values)
    assert not np.array_equal(a.values, _call("shap-permutation", model, x, background=bg, seed=5).values)
    assert np.abs(a.base_values + a.values.sum(axis=1) - a.outputs).max() < 1e-5  # additive by construction
    exact = _call("shap-exact", model, x, background=bg)
    err = np.abs(a.values - exact.values).max(axis=1) / np.abs(exact.values).max(axis=1)
    assert err.max() < 0.2  # a sampling estimate of the same values (measured ~0.03-0.08 at F = 10-16)
