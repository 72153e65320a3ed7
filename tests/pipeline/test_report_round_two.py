"""The auditor's report, round two (#26): statements checked against what the run actually did.

Each test failed on the code before the fix it guards.
"""

import numpy as np
import torch

from auditml_core import models, training
from auditml_core.config import DPConfig, FitConfig
from pipeline.report import html_page


def _fit_record(*, dp: bool, patience: int) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    torch.manual_seed(0)
    res = training.fit(
        models.build_regressor(n_features=3, hidden_sizes=(4,)),
        x_train=x,
        y_train=y,
        x_val=x[:16],
        y_val=y[:16],
        task="regression",
        fit_cfg=FitConfig(epochs=2, batch_size=16, lr=1e-2),
        dp=DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=50.0) if dp else None,
        device=torch.device("cpu"),
        seed=0,
        patience=patience,
    )
    return res.summary()


def _val_role(*, dp: bool, patience: int) -> str:
    record = _fit_record(dp=dp, patience=patience)
    content = {
        "privacy": {"enabled": dp},
        "models": {"regressor": {"title": "MLP regressor", "training": record}},
        "data": {"tabular": {"task": "regression", "sizes": {"train": 64, "val": 16}, "provenance": {}}},
    }
    html = html_page.render_section("data", content)
    return html.split("<td>val</td><td>16</td><td>", 1)[1].split("</td>", 1)[0]


def test_the_validation_split_is_not_said_to_early_stop_a_dp_run():
    # #26 item 2: under DP the provenance said "validation / early stopping"; fit turns early stopping off under DP.
    role = _val_role(dp=True, patience=5)
    assert "early stopping off under DP" in role and "early stopping chose" not in role
    role = _val_role(dp=False, patience=0)
    assert "early stopping off" in role and "early stopping chose" not in role
    role = _val_role(dp=False, patience=5)
    assert role == "validation metrics; early stopping chose the released epoch of: MLP regressor"
