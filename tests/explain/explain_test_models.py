"""Model builders shared by the explain tests (a module, so tests can import them by a unique name)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_FEATURES = 10
# Only three features matter in the linear model; the faithfulness tests rely on it.
LINEAR_WEIGHTS = np.array([3.0, -2.0, 1.5, 0, 0, 0, 0, 0, 0, 0], dtype=np.float32)


def seeded(seed: int, build):
    """Build a module under a private torch RNG state (leaves the global one alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def make_cnn(channels: int, height: int, width: int, *, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """Conv-ReLU-MaxPool x2 + Linear head: the shape the pipeline's CNN has."""
    return seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width // 4), 32),
            nn.ReLU(),
            nn.Linear(32, n_classes),
        ),
    )
