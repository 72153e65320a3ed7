"""Stage ``data``: load, validate, split and standardise both datasets (the work is :mod:`auditml_core.data`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from auditml_core import data as core_data
from auditml_core.config import Config
from auditml_core.data import Datasets


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> Datasets:
    """Prepare both datasets from the configured sources (no earlier stage is read).

    Raises
    ------
    DataError
        For any data that cannot be used as given; the message says how to fix it.
    """
    return core_data.prepare(cfg, seed=seed)


def dump(datasets: Datasets) -> dict[str, bytes]:
    """The prepared splits (.npz) and their descriptions (.json)."""
    return core_data.dump(datasets)


def load(read: Callable[[str], bytes]) -> Datasets:
    """Rebuild the stage output from the run directory."""
    return core_data.load(read)
