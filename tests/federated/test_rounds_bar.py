"""The launcher's progress bar over federated rounds (issue 27 item 4): it counts what the server checkpoints say."""

from __future__ import annotations

import numpy as np

from auditml_core.config import load_config
from auditml_core.runtime import Runtime
from federated.app import checkpoint, workdir
from federated.launch.simulation import RoundsBar


def _checkpoint(work, model: str, rounds: int) -> None:
    record = {"completed_rounds": rounds, "fingerprint": "f" * 16}
    weights = {"w": np.zeros((50_000,), dtype=np.float32)}  # the bar reads the header, never these
    checkpoint.save(workdir.checkpoint_path(work, model), checkpoint.ServerCheckpoint(weights, {}, record))


def test_the_bar_counts_every_models_completed_rounds_from_the_checkpoint_headers(tmp_path):
    cfg = load_config(None, ["train.mode=federated", "regressor.federated.rounds=4", "cnn.federated.rounds=6"])
    bar = RoundsBar(tmp_path, ["regressor", "cnn"], cfg, Runtime(progress=True))
    try:
        assert bar.bar is not None and bar.bar.total == 10
        bar.update()  # no checkpoint yet
        assert bar.bar.n == 0
        _checkpoint(tmp_path, "regressor", 3)
        bar.update()
        assert bar.bar.n == 3
        _checkpoint(tmp_path, "regressor", 4)
        _checkpoint(tmp_path, "cnn", 2)
        bar.update()
        assert bar.bar.n == 6
        workdir.checkpoint_path(tmp_path, "cnn").write_bytes(b"not a checkpoint")  # ignored, keeps its count
        bar.update()
        assert bar.bar.n == 6
    finally:
        bar.close()


def test_no_bar_without_progress(tmp_path):
    cfg = load_config(None, ["train.mode=federated"])
    bar = RoundsBar(tmp_path, ["regressor"], cfg, Runtime(progress=False))
    _checkpoint(tmp_path, "regressor", 1)
    bar.update()
    assert bar.bar is None
    bar.close()
