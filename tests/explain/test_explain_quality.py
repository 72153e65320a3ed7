"""Quality metrics: known answers on hand-made arrays, faithfulness on a linear model."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from explain import (
    Explanation,
    additivity_error,
    agreement,
    deletion_insertion,
    explanation_distance,
    get_explainer,
    make_predict_fn,
    stability,
)


def _e(values, *, method="m", inputs=None, base=None, outputs=None, targets=None):
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    return Explanation(
        method=method,
        values=values,
        base_values=base,
        inputs=np.zeros_like(values) if inputs is None else inputs,
        outputs=np.zeros(n) if outputs is None else outputs,
        targets=targets,
        feature_names=None,
        seconds=0.0,
        extras={},
    )


def test_agreement_identical_is_one_disjoint_is_zero():
    a = _e([[5, 4, 3, 0.1, 0.2, 0.0], [1, 2, 3, 4, 5, 6]])
    res = agreement(a, a, k=3)
    assert res.topk == (1.0, 1.0) and res.mean_spearman == pytest.approx(1.0) and res.mean_sign == 1.0
    assert res.flagged == ()
    b = _e([[0, 0.1, 0.2, 5, 4, 3], [6, 5, 4, 3, 2, 1]])  # top-3 sets swapped
    res = agreement(a, b, k=3, threshold=0.5)
    assert res.topk == (0.0, 0.0) and res.flagged == (0, 1)
    assert res.spearman[1] == pytest.approx(-1.0)
    json.dumps(res.to_dict(), allow_nan=False)


def test_agreement_partial_overlap_and_signs():
    a = _e([[4, 3, 2, 1]])
    b = _e([[4, -3, 0, 2]])  # top-2: {0,1} vs {0,1}; top-3: {0,1,2} vs {0,1,3}
    assert agreement(a, b, k=3).topk == (pytest.approx(2 / 3),)
    # union {0,1,2,3}: signs agree on 0 and 3, disagree on 1, 2 (2 > 0 vs 0).
    assert agreement(a, b, k=3).sign == (0.5,)
    assert agreement(a, b, k=2).sign == (0.5,)


def test_agreement_on_images_sums_channels():
    v = np.zeros((1, 3, 2, 2))
    v[0, :, 0, 0] = [1, 1, 1]  # pixel (0, 0): 3 in total, but spread over channels
    v[0, 2, 1, 1] = 2  # the largest single element
    w = np.zeros((1, 3, 2, 2))
    w[0, 0, 0, 0] = 3
    a, b = _e(v), _e(w)
    assert agreement(a, b, k=1).topk == (1.0,)
    assert agreement(a, b, k=1, sum_channels=False).topk == (0.0,)


def test_agreement_constant_row_gives_nan_spearman_as_null():
    res = agreement(_e([[1, 1, 1]]), _e([[1, 2, 3]]), k=1)
    assert np.isnan(res.spearman[0])
    assert res.to_dict()["mean_spearman"] is None


def test_agreement_rejects_bad_k_and_different_inputs():
    a = _e(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"k=5 is not valid for 4 features; pass an integer in \[1, 4\]"):
        agreement(a, a, k=5)
    with pytest.raises(ValueError, match="explain different inputs"):
        agreement(a, _e(np.ones((2, 4)), inputs=np.ones((2, 4))), k=2)
    with pytest.raises(ValueError, match="compare explanations of the same inputs"):
        agreement(a, _e(np.ones((2, 5))), k=2)


def test_stability_known_answers():
    fixed = lambda x, *, seed: _e(np.tile([3.0, 2, 1, 0], (2, 1)))  # noqa: E731
    res = stability(fixed, None, seeds=(0, 1, 2), k=2)
    assert res.per_row == (1.0, 1.0) and res.mean == 1.0 and res.min == 1.0

    def flipping(x, *, seed):
        return _e(np.array([[3.0, 2, 0, 0]]) if seed == 0 else np.array([[0.0, 0, 3, 2]]))

    res = stability(flipping, None, seeds=(0, 1), k=2)
    assert res.mean == 0.0
    half = lambda x, *, seed: _e(np.array([[3.0, 2, 0, 0]]) if seed == 0 else np.array([[3.0, 0, 2, 0]]))  # noqa: E731
    assert stability(half, None, seeds=(0, 1), k=2).mean == pytest.approx(1 / 3)  # |{0}| / |{0,1,2}|
    with pytest.raises(ValueError, match="fewer than two distinct seeds"):
        stability(fixed, None, seeds=(1, 1), k=2)


def test_explanation_distance_identical_and_reversed():
    a = _e([[4.0, 3, 2, 1], [4, 3, 2, 1]])
    same = explanation_distance(a, a, k=2)
    assert same.global_spearman == pytest.approx(1.0) and same.global_topk == 1.0 and same.global_l1 == 0.0
    rev = explanation_distance(a, _e([[1.0, 2, 3, 4], [1, 2, 3, 4]]), k=2)
    assert rev.global_spearman == pytest.approx(-1.0) and rev.global_topk == 0.0 and rev.global_l1 == pytest.approx(0.8)


def test_additivity_error_known_and_refuses_lime():
    e = _e([[1.0, 2.0]], base=np.array([0.5]), outputs=np.array([3.6]))
    res = additivity_error(e)
    assert res.max_abs_error == pytest.approx(0.1) and res.max_rel_error == pytest.approx(0.1 / 3.1)
    with pytest.raises(ValueError, match="additivity is a SHAP property"):
        additivity_error(_e([[1.0]], method="lime-tabular", base=np.zeros(1)))
    with pytest.raises(ValueError, match="additivity is a SHAP property"):
        additivity_error(_e([[1.0]], method="shap-deep"))


def test_deletion_on_known_linear_model():
    w = np.array([3.0, 2.0, 1.0, 0.0])
    predict = lambda x: x @ w  # noqa: E731
    x = np.ones((1, 4))
    good = _e(w[None] * x, inputs=x, outputs=predict(x))
    bad = _e(-w[None] * x, inputs=x, outputs=predict(x))  # ranks the important features last
    r = deletion_insertion(good, predict, baseline=0.0, n_steps=4, seed=0, n_random=20)
    assert r.deletion_curve == (6.0, 3.0, 1.0, 0.0, 0.0)
    assert r.insertion_curve == (0.0, 3.0, 5.0, 6.0, 6.0)
    assert r.deletion_auc == pytest.approx(np.trapezoid([6, 3, 1, 0, 0], dx=0.25))
    assert r.deletion_gain > 0 and r.insertion_gain > 0 and r.deletion_win_rate == 1.0
    assert r.output_scale == 6.0
    rb = deletion_insertion(bad, predict, baseline=0.0, n_steps=4, seed=0, n_random=20)
    assert rb.deletion_gain < 0 and rb.insertion_gain < 0
    json.dumps(r.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match=r"baseline of shape \(3,\) does not broadcast to the feature shape \(4,\)"):
        deletion_insertion(good, predict, baseline=np.zeros(3), n_steps=4, seed=0)


def test_faithfulness_beats_random_and_shap_lime_agree_on_linear_model(linear, tabular):
    x, bg = tabular[:20], tabular[20:]
    predict = make_predict_fn(linear, task="regression")
    shap_e = get_explainer("shap-deep")(linear, x, background=bg, task="regression", seed=0)
    lime_e = get_explainer("lime-tabular")(linear, x, background=bg, task="regression", seed=0)
    for e in (shap_e, lime_e):
        r = deletion_insertion(e, predict, baseline=bg.mean(axis=0), n_steps=10, seed=1, n_random=5)
        assert r.deletion_auc < r.random_deletion_auc and r.insertion_auc > r.random_insertion_auc
        assert r.deletion_win_rate >= 0.9 and r.insertion_win_rate >= 0.9
    agree = agreement(shap_e, lime_e, k=3)
    assert agree.mean_topk >= 0.95 and agree.mean_sign >= 0.95 and agree.mean_spearman >= 0.8
    explain_fn = functools.partial(
        get_explainer("lime-tabular"), linear, background=bg, task="regression", num_samples=300
    )
    stab = stability(explain_fn, x[:5], seeds=(0, 1, 2), k=3)
    assert stab.min >= 0.5 and stab.mean >= 0.8  # only 3 features matter, so their ranking is stable


def test_deletion_on_images_removes_pixels_in_all_channels():
    w = np.zeros((2, 2, 2))
    w[:, 0, 0] = 1.0  # only pixel (0, 0) matters, in both channels
    predict = lambda x: (x * w).reshape(len(x), -1).sum(axis=1)  # noqa: E731
    x = np.ones((1, 2, 2, 2))
    e = _e(w[None].copy(), inputs=x, outputs=predict(x))
    r = deletion_insertion(e, predict, baseline=0.0, n_steps=4, seed=0, n_random=2)
    assert r.deletion_curve == (2.0, 0.0, 0.0, 0.0, 0.0)
