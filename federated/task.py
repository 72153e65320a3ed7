"""What the ServerApp and every ClientApp agree on: config, data, model spec, partition, seeds.

The train stage hands the prepared data over as files in a work folder
(``data/<key>.npz|json`` written with :func:`core.data.dump`, ``spec.json``).
A bare ``flwr run .`` has no work folder: then each process prepares the data from
the config itself (the data stage is deterministic given its seed) and the outputs go
to a temporary folder named after the Flower run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core import data as core_data
from core import models, seeds
from core.config import Config, FitConfig
from core.data import Dataset
from core.teacher import fit_config, model_specs
from federated import workdir
from federated.partition import partition
from federated.run_config import AppSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One model's federated training task."""

    cfg: Config
    name: str  # "regressor" or "cnn"
    dataset: Dataset
    spec: Mapping[str, Any]  # core.models.build spec
    fit_cfg: FitConfig  # local optimizer settings (dp_fit under DP)
    model_seed: int  # weights init; partition and client seeds derive from it
    work_dir: Path

    @property
    def fit_key(self) -> str:
        """Config section of the local training settings, for error messages."""
        return f"{self.name}.{'dp_fit' if self.cfg.dp.enabled else 'fit'}"

    def partition(self, split: str = "train") -> list[np.ndarray]:
        """Row indices of every client's share of ``split`` (same on every process)."""
        f = self.cfg.federated
        min_size = self.fit_cfg.batch_size if split == "train" else 0
        return partition(
            self.dataset.y[split],
            n_clients=f.n_clients,
            method=f.partitioner,
            alpha=f.dirichlet_alpha,
            seed=seeds.partition_seed(self.model_seed, split),
            min_size=min_size,
            min_size_key=f"{self.fit_key}.batch_size",
        )


def model_seed(cfg: Config, name: str, settings: AppSettings) -> int:
    """The seed the train stage would give model ``name`` (unless the run-config sets one)."""
    return settings.seed if settings.seed >= 0 else seeds.model_seed(cfg.seed, name)


def load_task(cfg: Config, settings: AppSettings, *, run_id: int) -> Task:
    """The task of this run, from the work folder or (bare ``flwr run``) from the config alone."""
    name = settings.model
    key = models.model_entry(name).dataset
    work_dir = Path(settings.work_dir) if settings.work_dir else workdir.default_work_dir(run_id)
    if (work_dir / "data" / f"{key}.npz").is_file():
        dataset = workdir.read_dataset(work_dir, key)
        spec = json.loads((work_dir / "spec.json").read_text())
    else:
        datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
        dataset, spec = datasets[key], model_specs(cfg, datasets)[name]
    return Task(
        cfg=cfg,
        name=name,
        dataset=dataset,
        spec=spec,
        fit_cfg=fit_config(cfg, name),
        model_seed=model_seed(cfg, name, settings),
        work_dir=work_dir,
    )
