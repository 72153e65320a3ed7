"""Public pretraining: DP runs get it; a non-private run only when asked, so references compare like with like."""

import numpy as np
import torch

from auditml_core.config import load_config
from auditml_core.data import Dataset
from auditml_core.models import build_regressor
from auditml_core.teacher import public_pretrain


def _table():
    rng = np.random.default_rng(0)
    x = {s: rng.normal(size=(n, 3)).astype(np.float32) for s, n in (("train", 20), ("public", 12))}
    y = {s: v.sum(axis=1).astype(np.float32) for s, v in x.items()}
    return Dataset(name="tabular", task="regression", x=x, y=y, index={s: np.arange(len(v)) for s, v in x.items()})


def test_non_private_runs_are_pretrained_only_when_asked():
    ds = _table()
    for overrides, expected in (
        ([], None),
        (["dp.enabled=true"], 2),
        (["dp.pretrain_non_private=true"], 2),
        (["dp.pretrain_non_private=true", "dp.public_pretrain_epochs=0"], None),
    ):
        cfg = load_config(None, ["dp.public_pretrain_epochs=2", *overrides])
        model = build_regressor(n_features=3, hidden_sizes=(4,))
        before = [p.detach().clone() for p in model.parameters()]
        record = public_pretrain(cfg, "regressor", model, ds, device=torch.device("cpu"), seed=0)
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        if expected is None:
            assert record is None and not changed, overrides
        else:
            assert record["epochs"] == expected and record["split"] == "public" and changed, overrides
