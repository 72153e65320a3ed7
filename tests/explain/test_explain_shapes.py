"""Every image explainer on the CNN input shapes the pipeline uses."""

from __future__ import annotations

import numpy as np
import pytest
from explain_test_models import make_cnn

from explain import additivity_error, deletion_insertion, get_explainer, make_predict_fn

OPTIONS = {"shap-deep": {}, "shap-gradient": {"nsamples": 30}, "lime-image": {"num_samples": 100}}


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 16, 16), (3, 28, 28)])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_image_explainers_on_shape(name, shape):
    model = make_cnn(*shape)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(2, *shape)).astype(np.float32)
    bg = rng.uniform(0, 1, size=(6, *shape)).astype(np.float32)
    e = get_explainer(name)(model, x, background=bg, task="classification", seed=0, **OPTIONS[name])
    assert e.values.shape == (2, *shape) and np.isfinite(e.values).all()
    assert e.targets.shape == (2,) and e.base_values.shape == (2,)
    if name == "shap-deep":
        assert additivity_error(e).max_rel_error <= 1e-4
    if name == "lime-image":
        assert e.extras["n_segments"] == [16, 16]  # default grid: 4 x 4 cells at every size
    r = deletion_insertion(
        e, make_predict_fn(model, task="classification"), baseline=bg.mean(axis=0), n_steps=8, seed=0
    )
    assert len(r.deletion_curve) == 9
