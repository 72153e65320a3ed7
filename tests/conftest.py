"""Shared test set-up: one torch thread (2-core machines), small generated data."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_overrides():
    """Overrides for a whole pipeline run in seconds (see tests/tiny.py)."""
    from tests.tiny import ALL

    return list(ALL)
