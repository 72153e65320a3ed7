"""The federated work folder: the one place that knows its layout.

::

    <work>/data/<dataset>.npz|json     the prepared dataset (auditml_core.data.dump format)   [launcher -> apps]
    <work>/spec/<model>.json           the model's spec                               [launcher -> apps]
    <work>/run_config.toml             the Flower run-config                          [launcher -> flwr run]
    <work>/server/<model>.checkpoint.safetensors   the server's checkpoint (resume)   [ServerApp]
                                                   (or <app.checkpoint-dir>/...: the run directory's)
    <work>/clients/<model>/client-<i>.json         client i's privacy ledger          [ClientApp]
                                                   (or <app.ledger-dir>/<model>/...: the run directory's)
    <work>/result/<model>.safetensors|json|error.json   final weights, record, error  [ServerApp -> launcher]
    <work>/logs/, <work>/flwr-home/    process logs, Flower's own settings             [launcher]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from auditml_core import data as core_data
from auditml_core import models
from auditml_core.artifacts import atomic_write, read_json, read_state_dict
from auditml_core.data import Dataset


def default_work_dir(run_id: int) -> Path:
    """Where a bare ``flwr run .`` keeps its data-free outputs (server checkpoint, result, client state)."""
    return Path(tempfile.gettempdir()) / f"auditable-flwr-run-{run_id}"


def write_inputs(work_dir: Path, *, name: str, dataset: Dataset, spec: Mapping[str, Any]) -> None:
    """Write what the Flower run reads: the dataset (auditml_core.data.dump format) and the model spec."""
    for rel, payload in core_data.dump({models.model_entry(name).dataset: dataset}).items():
        atomic_write(work_dir / rel, payload)
    atomic_write(spec_path(work_dir, name), json.dumps(dict(spec), sort_keys=True).encode())


def spec_path(work_dir: Path, model: str) -> Path:
    """Where the model spec of ``model`` lies (one per model: one run may train several)."""
    return work_dir / "spec" / f"{model}.json"


def read_dataset(work_dir: Path, key: str) -> Dataset:
    """The dataset :func:`write_inputs` wrote."""
    # auditml_core.data.load rebuilds both datasets; only ours was written, so both names read
    # our files and we keep ours. Reusing load keeps one reader of the format.
    other = {"tabular": "images", "images": "tabular"}[key]
    return core_data.load(lambda rel: (work_dir / rel.replace(f"data/{other}.", f"data/{key}.")).read_bytes())[key]


def checkpoint_path(work_dir: Path, model: str, *, checkpoint_dir: Path | None = None) -> Path:
    """Where the server keeps model ``model``'s checkpoint: ``<checkpoint_dir>/<model>.checkpoint.safetensors``.

    ``checkpoint_dir`` (``app.checkpoint-dir``) defaults to ``<work>/server``; the pipeline sets it inside its run
    directory, so the checkpoint a resumed run reads is the one the server wrote (no copy that could lag).
    """
    return (checkpoint_dir or work_dir / "server") / f"{model}.checkpoint.safetensors"


def ledger_path(work_dir: Path, model: str, partition_id: int, *, ledger_dir: Path | None = None) -> Path:
    """An emulated client's own ledger file: ``<ledger_dir>/<model>/client-<i>.json``.

    ``ledger_dir`` (``app.ledger-dir``) defaults to ``<work>/clients``; the pipeline sets it inside its run
    directory, so that what a client reserves before training is what a resumed run reads (no copy between).
    """
    return (ledger_dir or work_dir / "clients") / model / f"client-{partition_id}.json"


def result_paths(work_dir: Path, model: str) -> tuple[Path, Path, Path]:
    """(weights, record, error) files the train stage reads."""
    out = work_dir / "result"
    return out / f"{model}.safetensors", out / f"{model}.json", out / f"{model}.error.json"


def read_result(work_dir: Path, model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The final weights and record a finished run wrote."""
    weights_path, record_path, _ = result_paths(work_dir, model)
    return read_state_dict(weights_path.read_bytes()), read_json(record_path.read_bytes())


def read_error(work_dir: Path, model: str) -> dict[str, Any] | None:
    """The error the ServerApp wrote down, if it failed."""
    path = result_paths(work_dir, model)[2]
    return json.loads(path.read_text()) if path.is_file() else None
