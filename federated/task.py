"""What the ServerApp and every ClientApp agree on: config, data, model spec, partition, seeds.

The train stage hands the prepared data over as files in a work folder
(``data/<key>.npz|json`` written with :func:`pipeline.data.dump`, ``spec.json``).
A bare ``flwr run .`` has no work folder: then each process prepares the data from
the config itself (the data stage is deterministic given its seed) and the outputs go
to a temporary folder named after the Flower run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline import data as data_stage
from pipeline.config import Config, FitConfig
from pipeline.data import Dataset
from pipeline.runtime import derive_seed
from pipeline.rundir import atomic_write

from federated.partition import partition
from federated.run_config import AppSettings

log = logging.getLogger(__name__)
DATASET_OF = {"regressor": "tabular", "cnn": "images"}  # model -> the dataset it trains on


@dataclass(frozen=True)
class Task:
    """One model's federated training task."""

    cfg: Config
    name: str  # "regressor" or "cnn"
    dataset: Dataset
    spec: Mapping[str, Any]  # pipeline.models.build spec
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
            self.dataset.y[split], n_clients=f.n_clients, method=f.partitioner, alpha=f.dirichlet_alpha,
            seed=derive_seed(self.model_seed, "partition", split), min_size=min_size,
            min_size_key=f"{self.fit_key}.batch_size",
        )


def default_work_dir(run_id: int) -> Path:
    """Where a bare ``flwr run .`` keeps its data-free outputs (server checkpoint, result, client state)."""
    return Path(tempfile.gettempdir()) / f"auditable-flwr-run-{run_id}"


def model_seed(cfg: Config, name: str, settings: AppSettings) -> int:
    """The seed the train stage would give model ``name`` (unless the run-config sets one)."""
    return settings.seed if settings.seed >= 0 else derive_seed(derive_seed(cfg.seed, "train"), name)


def write_inputs(work_dir: Path, *, name: str, dataset: Dataset, spec: Mapping[str, Any]) -> None:
    """Write what the Flower run reads: the dataset (pipeline.data.dump format) and the model spec."""
    for rel, payload in data_stage.dump({DATASET_OF[name]: dataset}).items():
        atomic_write(work_dir / rel, payload)
    atomic_write(work_dir / "spec.json", json.dumps(dict(spec), sort_keys=True).encode())


def _read_dataset(work_dir: Path, key: str) -> Dataset:
    # pipeline.data.load rebuilds both datasets; only ours was written, so both names read
    # our files and we keep ours. Reusing load keeps one reader of the format.
    other = {"tabular": "images", "images": "tabular"}[key]
    return data_stage.load(lambda rel: (work_dir / rel.replace(f"data/{other}.", f"data/{key}.")).read_bytes())[key]


def load_task(cfg: Config, settings: AppSettings, *, run_id: int) -> Task:
    """The task of this run, from the work folder or (bare ``flwr run``) from the config alone."""
    from pipeline.train import fit_config, model_specs

    name = settings.model
    key = DATASET_OF[name]
    work_dir = Path(settings.work_dir) if settings.work_dir else default_work_dir(run_id)
    if (work_dir / "data" / f"{key}.npz").is_file():
        dataset = _read_dataset(work_dir, key)
        spec = json.loads((work_dir / "spec.json").read_text())
    else:
        datasets = data_stage.run(cfg, {}, seed=derive_seed(cfg.seed, "data"))
        dataset, spec = datasets[key], model_specs(cfg, datasets)[name]
    return Task(cfg=cfg, name=name, dataset=dataset, spec=spec, fit_cfg=fit_config(cfg, name),
                model_seed=model_seed(cfg, name, settings), work_dir=work_dir)
