"""Randomisation sanity checks (#26 item 4): a null (random vs random), positive controls that must fail, seeds.

The rule under test: over several random models, a row survives randomisation when |Spearman(trained, random)|
is above the threshold beyond seed noise and not below |Spearman(random, random)| beyond seed noise; the check
passes when at most ``max_fraction`` of rows survive. An explainer that does not look at the weights must fail
it; a trained model's verdict must not depend on which random models were drawn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_test_models import seeded
from scipy.stats import spearmanr
from torch import nn

from explain import Explanation, class_randomisation, get_explainer, model_randomisation, randomised_copy
from explain.sanity import SIXT, trainable_layers

SEEDS = (1, 2, 3, 4, 5)


def _expl(values, x, targets=None):
    return Explanation("control", np.asarray(values, dtype=np.float64), None, x, np.zeros(len(x)), targets, None, 0.0)


def _sobel(x):
    """Edge magnitude of each image: a saliency map that is a function of the input alone."""
    img = x[:, 0]
    gx = np.zeros_like(img)
    gy = np.zeros_like(img)
    gx[:, :, 1:-1] = img[:, :, 2:] - img[:, :, :-2]
    gy[:, 1:-1, :] = img[:, 2:, :] - img[:, :-2, :]
    return np.hypot(gx, gy)[:, None]


@pytest.mark.parametrize("control", ["input", "edges"])
def test_explanations_that_ignore_the_weights_fail(control, cnn, images):
    # The positive controls: the input itself (x - baseline) and an edge detector, whatever the model.
    x, bg = images[:10], images[10:]
    values = (x - bg.mean(axis=0)) if control == "input" else _sobel(x)
    seen = []

    def explain_fn(model):
        seen.append(model)
        return _expl(values, x)

    res = model_randomisation(explain_fn, cnn, _expl(values, x), seeds=SEEDS, baseline=bg.mean(axis=0))
    assert not res.passed_signed and not res.passed_abs
    assert res.fraction_signed == res.fraction_abs == 1.0  # every row survives randomisation
    assert res.null_abs == pytest.approx(1.0) and res.difference_abs == pytest.approx(0.0)
    assert len(seen) == len(SEEDS) + len(trainable_layers(cnn)) - 1  # S random models + the cascade's other steps
    assert [s["layers"] for s in res.cascade] == [trainable_layers(cnn)[-d:] for d in range(1, 5)]
    blind = class_randomisation(
        lambda targets: _expl(values, x, targets),
        _expl(values, x, np.zeros(10, dtype=int)),
        n_classes=10,
        seeds=SEEDS,
        baseline=bg.mean(axis=0),
    )
    assert not blind.passed_signed and not blind.passed_abs and blind.citation == SIXT


def test_a_constant_explanation_does_not_pass():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    model = seeded(0, lambda: nn.Sequential(nn.Linear(4, 1)))
    zeros = _expl(np.zeros((6, 4)), x)
    res = model_randomisation(lambda m: zeros, model, zeros, seeds=SEEDS, baseline=np.zeros(4))
    assert not res.passed_signed and res.fraction_signed == 1.0


@pytest.fixture(scope="module")
def trained_mlp():
    """An MLP trained on a target of three of ten features (the others are noise)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 10)).astype(np.float32)
    y = (3 * x[:, 0] - 2 * x[:, 1] + np.abs(x[:, 2])).astype(np.float32)
    model = seeded(0, lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xt).squeeze(1), yt).backward()
        opt.step()
    return model.eval(), x


def _exact(model, x, bg):
    return get_explainer("shap-exact")(model, x, background=bg, task="regression", seed=0)


def test_a_trained_models_verdict_is_the_same_for_every_set_of_random_models(trained_mlp):
    model, x = trained_mlp
    rows, bg = x[:12], x[100:150]
    trained = _exact(model, rows, bg)
    results = [
        model_randomisation(lambda m: _exact(m, rows, bg), model, trained, seeds=range(s, s + 5), baseline=bg.mean(0))
        for s in (10, 20, 30, 40)
    ]
    assert all(r.passed_signed for r in results) and all(r.passed_abs for r in results)
    assert len({(r.passed_signed, r.passed_abs) for r in results}) == 1
    # single draws are noisier than the rule: under one random model alone, some rows would have survived
    assert max(r.fraction_range_abs[1] for r in results) > max(r.fraction_abs for r in results)


def test_the_statistics_match_scipys_spearman_and_the_stated_rule(trained_mlp):
    # Recomputed independently: scipy's spearmanr per row, the null by pairing random models cyclically.
    model, x = trained_mlp
    rows, bg = x[:12], x[100:150]
    trained = _exact(model, rows, bg)
    seeds = (7, 8, 9, 10, 11)
    res = model_randomisation(lambda m: _exact(m, rows, bg), model, trained, seeds=seeds, baseline=bg.mean(0))
    layers = trainable_layers(model)
    randoms = [_exact(randomised_copy(model, seed=s, layers=layers), rows, bg).values for s in seeds]
    for kind, f in (("signed", lambda v: v), ("abs", np.abs)):
        a = f(trained.values)
        t = np.array([[abs(spearmanr(a[i], f(r)[i]).statistic) for i in range(12)] for r in randoms])
        n = np.array(
            [
                [abs(spearmanr(f(randoms[s])[i], f(randoms[(s + 1) % 5])[i]).statistic) for i in range(12)]
                for s in range(5)
            ]
        )
        np.testing.assert_allclose(getattr(res, f"per_row_{kind}"), t.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(getattr(res, f"per_row_null_{kind}"), n.mean(axis=0), atol=1e-12)
        d = t - n
        survive = (t.mean(0) - 2 * t.std(0, ddof=1) / np.sqrt(5) > 0.5) & ~(
            d.mean(0) + 2 * d.std(0, ddof=1) / np.sqrt(5) < 0
        )
        assert getattr(res, f"fraction_{kind}") == pytest.approx(survive.mean())
        assert getattr(res, f"passed_{kind}") == (survive.mean() <= 0.1)
        assert getattr(res, f"difference_{kind}") == pytest.approx(d.mean())
    assert "Adebayo" in res.citation and "beyond seed noise" in res.rule


def test_cascade_steps_nest_and_end_at_the_full_randomisation(trained_mlp):
    model, _ = trained_mlp
    layers = trainable_layers(model)
    assert layers == ["0", "2"]
    head_only = randomised_copy(model, seed=3, layers=["2"])
    both = randomised_copy(model, seed=3, layers=layers)
    assert torch.equal(head_only[2].weight, both[2].weight)  # the head gets the same draw at every step
    assert torch.equal(head_only[0].weight, model[0].weight) and not torch.equal(both[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="choose from"):
        randomised_copy(model, seed=3, layers=["nope"])
