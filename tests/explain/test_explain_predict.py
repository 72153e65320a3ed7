"""make_predict_fn: a CNN is evaluated in channels-last layout (speed), with the plain forward pass's values."""

from __future__ import annotations

import numpy as np
import torch
from explain_test_models import make_cnn

from explain import make_predict_fn


def test_cnn_predict_matches_the_plain_forward_pass_and_follows_weight_changes(images):
    model = make_cnn(1, 8, 8, seed=3)
    predict = make_predict_fn(model, task="classification")
    with torch.no_grad():
        plain = model(torch.from_numpy(images)).double().numpy()
    out = predict(images)
    assert out.shape == plain.shape
    # the same function in another memory order: equal up to float32 rounding, not approximately
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    with torch.no_grad():  # a weight changed in place after the predict function was made: it must see it
        next(model.parameters()).mul_(-2.0)
        changed = model(torch.from_numpy(images)).double().numpy()
    assert np.abs(changed - plain).max() > 1e-2  # positive control: the change moves the outputs
    np.testing.assert_allclose(predict(images), changed, rtol=1e-5, atol=1e-5 * np.abs(changed).max())
