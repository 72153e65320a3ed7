"""Under DP no file holds the noise-free training loss, and the report says so (#23 item 5).

Before: checkpoints/*.pt (listed as covered by the guarantee) and models/*.json carried the
per-epoch training loss, an exact statistic of the private batches.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from auditml_core import models, training
from auditml_core.config import DPConfig, FitConfig, load_config
from auditml_core.training import checkpoint_bytes, read_checkpoint
from pipeline.report.privacy import privacy_section

FIT = FitConfig(epochs=3, batch_size=16, lr=0.05, max_grad_norm=1.0)
DP = DPConfig(enabled=True, target_epsilon=3.0, accountant="rdp")


def _fit(dp, *, resume=None, blobs=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x.sum(1).astype(np.float32)
    torch.manual_seed(0)
    return training.fit(
        models.build_regressor(n_features=4, hidden_sizes=(4,)),
        x_train=x,
        y_train=y,
        x_val=x[:16],
        y_val=y[:16],
        task="regression",
        fit_cfg=FIT,
        dp=dp,
        device=torch.device("cpu"),
        seed=0,
        resume=resume,
        on_epoch_end=(lambda ck: blobs.append(checkpoint_bytes(ck))) if blobs is not None else None,
    )


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.is_floating_point():
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v)


@pytest.mark.parametrize("dp", [None, DP], ids=["no-dp", "dp"])
def test_no_file_of_a_dp_training_holds_its_training_loss(dp):
    blobs: list[bytes] = []
    res = _fit(dp, blobs=blobs)
    losses = [row["train_loss"] for row in res.history]  # in memory: divergence checks still see them
    assert len(losses) == FIT.epochs and all(np.isfinite(losses))
    written = [dataclasses.asdict(read_checkpoint(b)) for b in blobs] + [json.loads(json.dumps(res.summary()))]
    found = {v for w in written for v in _floats(w)} & set(losses)
    if dp is None:
        assert found == set(losses)  # positive control: without DP the search finds every epoch's loss
    else:
        assert found == set()
        assert all("train_loss" not in row for w in written for row in w["history"])


def test_a_resumed_dp_training_writes_no_training_loss_either():
    blobs: list[bytes] = []
    _fit(DP, blobs=blobs)
    resumed = _fit(DP, resume=read_checkpoint(blobs[0]))
    history = resumed.summary()["history"]
    assert len(history) == FIT.epochs and all("train_loss" not in row for row in history)
    assert all("val_loss" in row for row in history)  # the validation split's curve stays


def _trained(mode_record):
    from types import SimpleNamespace

    from auditml_core.models import MODELS

    return SimpleNamespace(
        models={n: SimpleNamespace(training={"privacy": mode_record, "n_train": 64}) for n in MODELS}
    )


def test_the_report_lists_checkpoints_as_holding_no_training_statistic():
    record = {"epsilon": 1.0, "delta": 1e-5, "accountant_history": None, "accountant": "rdp"}
    central = privacy_section(load_config(None, ["dp.enabled=true"]), _trained(record), {}, None)
    (ck_line,) = [line for line in central["covered"] if line.startswith("checkpoints/*.pt")]
    assert "no training-split statistic" in ck_line
    assert not any("training loss" in line and "models/*.json" in line for line in central["not_covered"])
    federated = privacy_section(
        load_config(None, ["dp.enabled=true", "train.mode=federated"]), _trained(record), {}, None
    )
    assert any("clients' per-round training loss" in line for line in federated["not_covered"])
