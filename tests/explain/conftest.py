"""Shared fixtures: tiny models and data built from explicit seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_test_models import LINEAR_WEIGHTS, N_FEATURES, make_cnn, seeded
from torch import nn

# Two cores shared with other work; one thread is also faster for tiny models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tabular() -> np.ndarray:
    """(80, 10) standardised-looking features: rows 0-19 explained, 20-79 background."""
    return np.random.default_rng(0).normal(size=(80, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="session")
def mlp() -> nn.Module:
    return seeded(
        1, lambda: nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    )


@pytest.fixture(scope="session")
def linear() -> nn.Module:
    model = nn.Linear(N_FEATURES, 1)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(LINEAR_WEIGHTS[None, :]))
        model.bias.fill_(0.5)
    return nn.Sequential(model).eval()


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """(40, 1, 8, 8) digit-like images in [0, 1]: rows 0-9 explained, 10-39 background."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 0.2, size=(40, 1, 8, 8))
    x[:, :, 2:6, 3:5] += rng.uniform(0.5, 1.0, size=(40, 1, 1, 1))  # a bright stroke
    return x.astype(np.float32)


@pytest.fixture(scope="session")
def cnn() -> nn.Module:
    return make_cnn(1, 8, 8)
