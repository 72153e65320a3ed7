"""shap-exact against closed forms and shap's own KernelExplainer; reference error; randomisation; cell agreement."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch
from explain_test_models import LINEAR_WEIGHTS, N_FEATURES
from torch import nn

from explain import (
    Explanation,
    agreement,
    class_randomisation,
    get_explainer,
    grid_segments,
    make_predict_fn,
    model_randomisation,
    randomised_copy,
    reference_error,
)
from explain.shap_exact import coalition_weights


def _exact(model, x, bg, task="regression", **kw):
    return get_explainer("shap-exact")(model, x, background=bg, task=task, seed=0, **kw)


def test_coalition_weights_sum_to_one_for_every_feature():
    for f in (1, 2, 5, 10):
        w = coalition_weights(f)
        assert sum(comb(f - 1, s) * w[s] for s in range(f)) == pytest.approx(1.0, abs=1e-12)


def test_linear_model_gives_coef_times_distance_to_background_mean(linear, tabular):
    # Interventional Shapley values of f(x) = w.x + b are w_j (x_j - mean_b b_j), in closed form.
    e = _exact(linear, tabular[:8], tabular[20:])
    np.testing.assert_allclose(e.values, LINEAR_WEIGHTS * (tabular[:8] - tabular[20:].mean(axis=0)), atol=1e-5)
    assert e.extras["n_coalitions"] == 2**N_FEATURES


def test_matches_shap_kernel_with_every_coalition_on_a_relu_mlp(mlp, tabular):
    # With F = 10 <= 11, shap's KernelExplainer ("auto") enumerates all 2^F - 2 coalitions: an independent exact
    # computation (a weighted regression instead of the Shapley sum). Measured max difference 1.5e-9.
    e = _exact(mlp, tabular[:5], tabular[20:])
    k = get_explainer("shap-kernel")(mlp, tabular[:5], background=tabular[20:], task="regression", seed=0)
    np.testing.assert_allclose(e.values, k.values, atol=1e-6)
    np.testing.assert_allclose(e.base_values, k.base_values, atol=1e-6)
    err = reference_error(e, k, k=3)
    assert err.max_rel_error < 1e-4 and err.pearson > 0.999999 and err.topk == 1.0


def test_values_add_up_to_output_and_explain_the_given_class(mlp, tabular, cnn):
    e = _exact(mlp, tabular[:6], tabular[20:])
    gap = e.base_values + e.values.sum(axis=1) - make_predict_fn(mlp, task="regression")(tabular[:6])
    assert np.abs(gap).max() < 1e-5  # float32 model outputs
    clf = nn.Sequential(nn.Linear(N_FEATURES, 4)).eval()
    targets = np.array([0, 3, 1])
    e = _exact(clf, tabular[:3], tabular[20:], task="classification", targets=targets)
    w = clf[0].weight.detach().numpy()[targets]
    np.testing.assert_allclose(e.values, w * (tabular[:3] - tabular[20:].mean(axis=0)), atol=1e-5)


def test_too_many_features_is_refused_with_the_alternatives(tabular):
    model = nn.Sequential(nn.Linear(N_FEATURES, 1)).eval()
    with pytest.raises(ValueError, match=r"F=10 exceeds max_features=8.*shap-kernel or shap-deep"):
        _exact(model, tabular[:2], tabular[20:], max_features=8)


def test_deep_explainer_error_against_exact_is_measured_not_assumed(mlp, tabular):
    # DeepLIFT is additive but not Shapley on a ReLU MLP: its error is > 0, and 0 against itself.
    deep = get_explainer("shap-deep")(mlp, tabular[:10], background=tabular[20:], task="regression", seed=0)
    exact = _exact(mlp, tabular[:10], tabular[20:])
    err = reference_error(deep, exact, k=3)
    assert err.max_abs_error > 1e-4
    same = reference_error(exact, exact, k=3)
    assert same.max_abs_error == 0 and same.pearson == pytest.approx(1.0) and same.topk == 1.0
    with pytest.raises(ValueError, match="explain different inputs"):
        reference_error(deep, exact, k=3, rows=np.arange(1, 11) % 10)


def test_randomised_copy_changes_every_layer_is_seeded_and_leaves_the_model(mlp):
    before = [p.detach().clone() for p in mlp.parameters()]
    a, b, c = randomised_copy(mlp, seed=3), randomised_copy(mlp, seed=3), randomised_copy(mlp, seed=4)
    for p0, p_mlp, pa, pb, pc in zip(before, mlp.parameters(), a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p0, p_mlp)  # the trained model is untouched
        assert not torch.equal(pa, p0) and torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert not a.training


def test_randomisation_check_fails_an_explanation_that_ignores_the_model(mlp, tabular):
    x, bg = tabular[:10], tabular[20:]
    trained = _exact(mlp, x, bg)
    # An "explainer" that returns the same attributions whatever the weights: correlation 1, must fail.
    blind = model_randomisation(lambda m: trained, mlp, trained, seeds=(1, 2, 3), baseline=bg.mean(axis=0))
    assert blind.spearman_signed == pytest.approx(1.0) and not blind.passed_signed and not blind.passed_abs
    real = model_randomisation(lambda m: _exact(m, x, bg), mlp, trained, seeds=(1, 2, 3), baseline=bg.mean(axis=0))
    assert 0 <= real.spearman_signed <= 1 and real.passed_signed == (real.fraction_signed <= real.max_fraction)
    assert "cascade from the head" in real.randomisation and "above 0.5" in real.rule


def _image_expl(method, values, inputs):
    n = len(values)
    return Explanation(method, values, None, inputs, np.zeros(n), np.zeros(n, dtype=int), None, 0.0)


def test_agreement_at_cell_resolution_removes_the_resolution_artefact():
    # A pixel-level map and the cell-level map with the same total per 2x2 cell (LIME's spreading rule) carry
    # the same information at cell resolution; per pixel they look like a disagreement.
    rng = np.random.default_rng(0)
    inputs = rng.uniform(size=(5, 1, 8, 8))
    pixel = rng.normal(size=(5, 1, 8, 8))
    seg = grid_segments(8, 8, cell_size=2)
    cell_sum = np.stack([np.bincount(seg.ravel(), weights=p[0].ravel(), minlength=16) for p in pixel])
    blocky = (cell_sum[:, seg] / 4)[:, None]  # (5, 1, 8, 8), constant over each cell
    a, b = _image_expl("shap-deep", pixel, inputs), _image_expl("lime-image", blocky, inputs)
    cells = agreement(a, b, k=2, segments=seg)
    assert cells.mean_topk == 1.0 and cells.mean_spearman == pytest.approx(1.0) and not cells.flagged
    pixels = agreement(a, b, k=8)
    assert pixels.mean_topk < 1.0


def test_class_randomisation_explains_another_class_and_states_its_rule(cnn, images):
    deep = get_explainer("shap-deep")
    kw = dict(background=images[10:], task="classification", seed=0)
    trained = deep(cnn, images[:5], **kw)
    seen = []

    def explain_other(targets):
        seen.append(targets)
        return deep(cnn, images[:5], targets=targets, **kw)

    res = class_randomisation(explain_other, trained, n_classes=10, seeds=(1, 2, 3), baseline=images[10:].mean(axis=0))
    assert all((s != trained.targets).all() and s.min() >= 0 and s.max() <= 9 for s in seen)
    assert (seen[0] != seen[1]).all() and (seen[1] != seen[2]).all()  # distinct other classes per row across draws
    assert res.passed_signed == (res.fraction_signed <= res.max_fraction) and "other classes" in res.randomisation
    with pytest.raises(ValueError, match="needs a classifier"):
        class_randomisation(explain_other, trained, n_classes=1, seeds=(1,), baseline=0.0)
