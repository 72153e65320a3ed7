"""What the ServerApp and every ClientApp agree on: config, data, model spec, partition, seeds.

The train stage hands the prepared data over as files in a work folder
(``data/<key>.npz|json`` written with :func:`auditml_core.data.dump`, ``spec/<model>.json``).
A bare ``flwr run .`` has no work folder: then each process prepares the data from
the config itself (the data stage is deterministic given its seed) and the outputs go
to a temporary folder named after the Flower run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from auditml_core import data as core_data
from auditml_core import models, seeds
from auditml_core.config import Config, FitConfig, Schedule, federated_schedule
from auditml_core.data import Dataset
from auditml_core.errors import ConfigError
from auditml_core.teacher import fit_config, model_specs
from federated.app import workdir
from federated.app.partition import partition
from federated.app.run_config import AppSettings, from_run_config

log = logging.getLogger(__name__)


# Under DP a client's expected batch is capped so that it takes at least this many steps per epoch
# (sample rate q <= 1/4): the configured DP batch sizes (128, 256) were chosen for central training
# on the whole split and exceed a client's share (e.g. ~230 rows with 5 clients).
MIN_DP_STEPS_PER_EPOCH = 4


@dataclass(frozen=True)
class Task:
    """One model's federated training task."""

    cfg: Config
    name: str  # "regressor" or "cnn"
    dataset: (
        Dataset | None
    )  # None on a site in per-site mode (its rows are federated.app.site's); row-less on the server
    spec: Mapping[str, Any]  # auditml_core.models.build spec ({} until per-site agreement: federated.app.site.agree)
    fit_cfg: FitConfig  # local optimizer settings (dp_fit under DP), before the per-client DP batch cap
    model_seed: int  # weights init; partition and client seeds derive from it
    work_dir: Path
    ledger_dir: Path | None = None  # emulated clients' ledgers (workdir.ledger_path); None = under work_dir
    checkpoint_dir: Path | None = None  # the server's checkpoint (workdir.checkpoint_path); None = under work_dir
    sites: Mapping[str, Any] | None = (
        None  # per-site mode, server side: what the sites reported (federated.app.site.agree)
    )
    _parts: dict = field(default_factory=dict, compare=False, repr=False)  # split -> partition, computed once

    @property
    def schedule(self) -> Schedule:
        """This model's rounds x local epochs (``<model>.federated``, or ``federated.*`` above 0 for every model)."""
        return federated_schedule(self.cfg, self.name)

    @property
    def fit_key(self) -> str:
        """Config section of the local training settings, for error messages."""
        return f"{self.name}.{'dp_fit' if self.cfg.dp.enabled else 'fit'}"

    def partition(self, split: str = "train") -> list[np.ndarray]:
        """Row indices of every client's share of ``split`` (same on every process).

        Without DP every training share must hold a whole batch (``<model>.fit.batch_size``);
        under DP the batch is capped per client (:meth:`client_fit_cfg`), so one row is enough.
        """
        if split not in self._parts:
            f = self.cfg.federated
            min_size = (1 if self.cfg.dp.enabled else self.fit_cfg.batch_size) if split == "train" else 0
            self._parts[split] = partition(
                self.dataset.y[split],
                n_clients=f.n_clients,
                method=f.partitioner,
                alpha=f.dirichlet_alpha,
                seed=seeds.partition_seed(self.model_seed, split),
                min_size=min_size,
                min_size_key="" if self.cfg.dp.enabled else f"{self.fit_key}.batch_size",
            )
        return self._parts[split]

    def client_batch_size(self, partition_id: int) -> int:
        """The (expected) batch size client ``partition_id`` trains with.

        Under DP: ``min(<model>.dp_fit.batch_size, max(1, n_i // MIN_DP_STEPS_PER_EPOCH))`` for a
        share of ``n_i`` rows; without DP the configured batch size.
        """
        return self.batch_size_for(self.train_sizes()[partition_id])

    def batch_size_for(self, n_rows: int) -> int:
        """The (expected) batch size of a client with ``n_rows`` training rows (see :meth:`client_batch_size`)."""
        b = self.fit_cfg.batch_size
        if not self.cfg.dp.enabled:
            return b
        return min(b, max(1, n_rows // MIN_DP_STEPS_PER_EPOCH))

    def train_sizes(self) -> list[int]:
        """Training rows per client: the sites' reports in per-site mode, else the partition's sizes."""
        if self.sites is not None:
            return [int(n) for n in self.sites["train_sizes"]]
        return [len(p) for p in self.partition()]

    def client_fit_cfg(self, partition_id: int, *, n_rows: int | None = None) -> FitConfig:
        """:attr:`fit_cfg` with client ``partition_id``'s batch size (or that of ``n_rows`` rows, on a site)."""
        b = self.client_batch_size(partition_id) if n_rows is None else self.batch_size_for(n_rows)
        return self.fit_cfg if b == self.fit_cfg.batch_size else dataclasses.replace(self.fit_cfg, batch_size=b)

    def batch_size_record(self) -> dict[str, Any]:
        """What the federation's record says about the per-client batch sizes (and why they differ)."""
        sizes = [self.client_batch_size(i) for i in range(self.cfg.federated.n_clients)]
        out: dict[str, Any] = {"configured": self.fit_cfg.batch_size, "per_client": sizes}
        if any(b != self.fit_cfg.batch_size for b in sizes):
            out["note"] = (
                f"{self.fit_key}.batch_size={self.fit_cfg.batch_size} capped per client at "
                f"max(1, rows // {MIN_DP_STEPS_PER_EPOCH}) so that each DP client takes at least "
                f"{MIN_DP_STEPS_PER_EPOCH} steps per epoch"
            )
        return out


def model_seed(cfg: Config, name: str, settings: AppSettings) -> int:
    """The seed the train stage would give model ``name`` (unless the run-config sets one)."""
    return settings.seed if settings.seed >= 0 else seeds.model_seed(cfg.seed, name)


def load_task(cfg: Config, settings: AppSettings, *, run_id: int) -> Task:
    """The task of this run, from the work folder or (bare ``flwr run``) from the config alone."""
    name = settings.model
    key = models.model_entry(name).dataset
    work_dir = Path(settings.work_dir) if settings.work_dir else workdir.default_work_dir(run_id)
    if settings.sites:  # per-site data: no process of the run-config prepares or reads rows (federated/app/site.py)
        dataset, spec = None, {}
    elif (work_dir / "data" / f"{key}.npz").is_file():
        dataset = workdir.read_dataset(work_dir, key)
        spec = json.loads(workdir.spec_path(work_dir, name).read_text())
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
        ledger_dir=Path(settings.ledger_dir) if settings.ledger_dir else None,
        checkpoint_dir=Path(settings.checkpoint_dir) if settings.checkpoint_dir else None,
    )


# One ClientApp / ServerApp process serves many messages of the same run (simulation: one Ray actor per
# client; deployment: a long-lived `flwr-clientapp` under `--isolation process`). Rebuilding the Config from
# ~100 flat keys and re-reading the dataset for every message cost more than a small model's round, so each
# process keeps the last few tasks, keyed by everything they are built from: the run id, a hash of the whole
# run-config and the size and mtime of the data file (a work folder rewritten under the same settings is
# read again). Bounded (TASK_CACHE_SIZE) so that a process serving many runs does not grow.
TASK_CACHE_SIZE = 2
_TASKS: OrderedDict[str, tuple[Task, AppSettings]] = OrderedDict()


def _cache_key(run_config: Mapping[str, Any], run_id: int) -> str:
    text = json.dumps(dict(sorted(run_config.items())), sort_keys=True, default=str)
    key = f"{run_id}:{hashlib.sha256(text.encode()).hexdigest()}"
    work_dir = str(run_config.get("app.work-dir", ""))
    model = str(run_config.get("app.model", ""))
    if work_dir and model in models.MODELS:
        data = Path(work_dir) / "data" / f"{models.model_entry(model).dataset}.npz"
        try:
            st = data.stat()
            key += f":{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            pass
    return key


def task_for(run_config: Mapping[str, Any], *, run_id: int, model: str | None = None) -> tuple[Task, AppSettings]:
    """The task and app settings of a Flower run-config, built once per process (see ``TASK_CACHE_SIZE``).

    ``model`` picks one model of a run that trains several (``app.model="regressor,cnn"``): the
    one a message names; it must be one of the run's models.

    Raises
    ------
    ConfigError
        For an invalid run-config (never cached).
    """
    if model is not None:
        if model not in [m.strip() for m in str(run_config.get("app.model", "cnn")).split(",")]:
            raise ConfigError(f"the message asks for model {model!r}, which this run (app.model) does not train")
        run_config = {**run_config, "app.model": model}
    key = _cache_key(run_config, run_id)
    if key in _TASKS:
        _TASKS.move_to_end(key)
        return _TASKS[key]
    cfg, settings = from_run_config(run_config)
    entry = (load_task(cfg, settings, run_id=run_id), settings)
    _TASKS[key] = entry
    while len(_TASKS) > TASK_CACHE_SIZE:
        _TASKS.popitem(last=False)
    return entry
