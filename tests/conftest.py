"""Shared test set-up: one torch thread (2-core machines), small generated data."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# A configuration small enough for end-to-end tests: a few epochs, tiny models.
TINY_OVERRIDES = [
    "regressor.hidden_sizes=[8]", "regressor.fit.epochs=3", "regressor.dp_fit.epochs=2",
    "cnn.channels=[4]", "cnn.hidden=8", "cnn.fit.epochs=2", "cnn.dp_fit.epochs=2", "dp.public_pretrain_epochs=2",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)
