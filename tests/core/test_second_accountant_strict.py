"""The second accountant tolerates no understatement and replays a schedule it derives itself (#23 item 6).

Before: a recorded ε up to 2 % below dp-accounting's PLD passed, and the replayed history was the
record's own, so a record that understated its steps or sample rate agreed with itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from auditml_core import models, training
from auditml_core.config import DPConfig, FitConfig, load_config
from auditml_core.models import MODELS
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy.second_accountant import check_epsilon, derived_history, independent_epsilons
from pipeline.report.privacy import privacy_section

pytest.importorskip("dp_accounting")


def test_an_epsilon_just_below_pld_is_an_understatement():
    history = [(1.1, 0.1, 40)]
    pld, rdp = independent_epsilons(history, delta=1e-5)
    assert not check_epsilon(history, delta=1e-5, recorded_epsilon=pld * 0.99).agrees  # passed with the 2 % slack
    assert not check_epsilon(history, delta=1e-5, recorded_epsilon=pld - 1e-9).agrees
    assert check_epsilon(history, delta=1e-5, recorded_epsilon=pld).agrees
    assert check_epsilon(history, delta=1e-5, recorded_epsilon=rdp * 1.01).agrees  # overstating is safe


@pytest.mark.parametrize(("n", "batch"), [(1078, 256), (265, 128), (300, 30), (97, 97), (10, 64)])
def test_the_derived_schedule_is_the_one_opacus_samples(n, batch):
    """q and steps per epoch as Opacus' own DPDataLoader derives them from a batch size."""
    from opacus.data_loader import DPDataLoader

    ds = torch.utils.data.TensorDataset(torch.zeros(n, 1))
    opacus_loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(ds, batch_size=batch))
    ((sigma, q, steps),) = derived_history(n_records=n, batch_size=batch, epochs=3, noise_multiplier=1.3)
    assert sigma == 1.3 and q == opacus_loader.sample_rate and steps == 3 * len(opacus_loader)


def test_a_real_dp_fit_spends_exactly_the_derived_schedule(rng):
    x = rng.normal(size=(70, 4)).astype(np.float32)
    y = x.sum(1).astype(np.float32)
    fit_cfg = FitConfig(epochs=3, batch_size=16, lr=0.05, max_grad_norm=1.0)
    dp = DPConfig(enabled=True, target_epsilon=3.0, accountant="rdp")
    torch.manual_seed(0)
    res = training.fit(
        models.build_regressor(n_features=4, hidden_sizes=(4,)),
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=fit_cfg,
        dp=dp,
        device=torch.device("cpu"),
        seed=0,
    )
    rec = res.privacy
    derived = derived_history(n_records=70, batch_size=16, epochs=3, noise_multiplier=rec["noise_multiplier"])
    assert privacy.merge_history(rec["accountant_history"]) == derived


def _trained(record: dict) -> SimpleNamespace:
    return SimpleNamespace(
        models={name: SimpleNamespace(training={"privacy": record, "n_train": 100}) for name in MODELS}
    )


def test_a_record_whose_history_understates_its_steps_disagrees():
    # n = 100, batch 20, 8 epochs: 40 steps at q = 0.2. The record claims 10 steps and the ε of 10 steps.
    schedule = [f"{m}.dp_fit.batch_size=20" for m in MODELS] + [f"{m}.dp_fit.epochs=8" for m in MODELS]
    cfg = load_config(None, ["dp.enabled=true", *schedule])
    short = [(1.1, 0.2, 10)]
    eps_short = privacy.epsilon_of(short, delta=1e-5, accountant="rdp")
    record = {
        "epsilon": eps_short,
        "delta": 1e-5,
        "target_epsilon": 50.0,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "sample_rate": 0.2,
        "total_steps": 10,
        "accountant_history": short,
        "accountant": "rdp",
        "opacus_version": "1.6.0",
        "noise_source": "os-csprng",
    }
    assert check_epsilon(short, delta=1e-5, recorded_epsilon=eps_short).agrees  # consistent with itself
    p = privacy_section(cfg, _trained(record), {}, None)
    for name in MODELS:
        chk = p["independent_checks"][name]
        (c,) = chk["checks"]
        assert not chk["agrees"] and c["derived_steps"] == 40 and c["derived_sample_rate"] == pytest.approx(0.2)
        assert c["recorded_history_covers_derived"] is False
    assert "DISAGREES" in p["statement"]
    assert any("it understates" in line and "40 steps" in line for line in p["caveats"])
    # the honest record of the same training agrees
    full = [(1.1, 0.2, 40)]
    honest = {**record, "epsilon": privacy.epsilon_of(full, delta=1e-5, accountant="rdp"), "accountant_history": full}
    ok = privacy_section(cfg, _trained(honest), {}, None)
    assert all(ok["independent_checks"][name]["agrees"] for name in MODELS)
    assert ok["independent_checks"]["cnn"]["checks"][0]["recorded_history_covers_derived"] is True
