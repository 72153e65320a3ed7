"""Per-model federated schedules (issue 25 item 8): each model of one federation trains its own rounds x local
epochs, and under DP each model's clients plan σ for that model's own schedule (ε checked by dp-accounting)."""

import math

import pytest
from fed_helpers import InProcessGrid, make_cfg, server_context

from auditml_core import training
from auditml_core.privacy.dp_sgd import steps_per_epoch
from auditml_core.teacher import model_specs
from federated.app.run_config import to_run_config
from federated.app.server_app import main
from federated.app.workdir import read_result, write_inputs

MODELS = {"regressor": "tabular", "cnn": "images"}
# Different in both numbers, so that a schedule taken from the wrong model (or the global keys) shows.
OWN = ["regressor.federated.rounds=2", "regressor.federated.local_epochs=3", "cnn.federated.rounds=3"]
OWN += ["cnn.federated.local_epochs=1"]


def _federation(tmp_path, digits_data, *overrides):
    """Both models in one in-process federation, as the train stage runs them (app.model="regressor,cnn")."""
    # federated.rounds / local_epochs = 0: each model's own schedule (fed_helpers' TINY_FED sets them for every model)
    cfg = make_cfg("federated.rounds=0", "federated.local_epochs=0", *overrides)
    specs = model_specs(cfg, digits_data)
    for name, key in MODELS.items():
        write_inputs(tmp_path, name=name, dataset=digits_data[key], spec=specs[name])
    rc = to_run_config(cfg, work_dir=str(tmp_path), model=",".join(MODELS), node_wait_s=2.0)
    main(InProcessGrid(rc, cfg.federated.n_clients), server_context(rc))
    return cfg, {name: read_result(tmp_path, name)[1] for name in MODELS}


def test_each_model_trains_its_own_rounds_and_local_epochs(tmp_path, digits_data, monkeypatch):
    calls = []
    fit = training.fit

    def spy(model, **kwargs):
        calls.append((kwargs["task"], kwargs["epochs"], kwargs["dp_total_epochs"]))
        return fit(model, **kwargs)

    monkeypatch.setattr(training, "fit", spy)  # what every client's train handler calls
    cfg, records = _federation(tmp_path, digits_data, *OWN)
    n = cfg.federated.n_clients
    # The clients: every round each client trains its model's own local epochs (σ, under DP, for its own total).
    assert calls.count(("regression", 3, 6)) == 2 * n and calls.count(("classification", 1, 3)) == 3 * n
    assert len(calls) == 5 * n
    # The server: each model's strategy ran its own rounds, and its record says so and where they came from.
    reg, cnn = records["regressor"], records["cnn"]
    assert [h["round"] for h in reg["history"]] == [1, 2] and reg["completed_rounds"] == 2
    assert [h["round"] for h in cnn["history"]] == [1, 2, 3] and cnn["completed_rounds"] == 3
    assert (reg["rounds"], reg["local_epochs"], cnn["rounds"], cnn["local_epochs"]) == (2, 3, 3, 1)
    assert reg["schedule"] == "regressor.federated.rounds x regressor.federated.local_epochs = 2 x 3"
    assert cnn["schedule"] == "cnn.federated.rounds x cnn.federated.local_epochs = 3 x 1"


def test_federated_rounds_above_zero_sets_every_models_schedule(tmp_path, digits_data, monkeypatch):
    calls = []
    fit = training.fit
    monkeypatch.setattr(training, "fit", lambda model, **kw: calls.append(kw["epochs"]) or fit(model, **kw))
    cfg, records = _federation(tmp_path, digits_data, *OWN, "federated.rounds=1", "federated.local_epochs=2")
    assert [(r["rounds"], r["local_epochs"], r["completed_rounds"]) for r in records.values()] == [(1, 2, 1)] * 2
    assert calls == [2] * (2 * cfg.federated.n_clients)
    assert records["cnn"]["schedule"] == "federated.rounds (every model) x federated.local_epochs (every model) = 1 x 2"


def _dp_accounting_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps by Google's dp-accounting RDP (not Opacus, not our code)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def test_under_dp_each_models_accountant_covers_its_own_rounds(tmp_path, digits_data):
    """σ is planned per model for that model's own rounds x local epochs: after its last round each client's ε
    (Opacus) equals dp-accounting's ε of its own steps and lands on the budget. Planned for the other model's
    rounds, the same σ would end far from the budget (the control below)."""
    dp = ["dp.enabled=true", "dp.accountant=rdp", "dp.public_pretrain_epochs=0", "dp.target_epsilon=3.0"]
    own = {"regressor": (1, 2), "cnn": (3, 1)}
    overrides = [f"{m}.federated.{k}={v}" for m, s in own.items() for k, v in zip(("rounds", "local_epochs"), s)]
    cfg, records = _federation(tmp_path, digits_data, *dp, *overrides)
    target = cfg.dp.target_epsilon
    for name, (rounds, local_epochs) in own.items():
        rec = records[name]
        assert rec["completed_rounds"] == rounds and rec["schedule"].startswith(f"{rounds} x {local_epochs}: set for")
        other_rounds = own["cnn" if name == "regressor" else "regressor"][0]
        for pid, client in rec["privacy"]["per_client"].items():
            n_rows, batch = rec["partition"]["sizes"][int(pid)], rec["batch_size"]["per_client"][int(pid)]
            per_epoch = steps_per_epoch(n_rows, batch)
            sigma, q = client["noise_multiplier"], client["sample_rate"]
            assert q == pytest.approx(1 / per_epoch)
            steps = rounds * local_epochs * per_epoch
            history = client["accountant_history"]  # (σ, q, steps), equal entries merged
            assert {(s, r) for s, r, _ in history} == {(sigma, q)} and sum(n for *_, n in history) == steps
            independent = _dp_accounting_epsilon(sigma, q, steps, cfg.dp.delta)
            final = rec["client_epsilon"][pid][-1]
            assert math.isclose(final, independent, rel_tol=2e-3), (name, pid, final, independent)
            assert 0.97 * target <= final <= target, (name, pid, final)  # σ landed on the budget after ITS rounds
            wrong = _dp_accounting_epsilon(sigma, q, other_rounds * local_epochs * per_epoch, cfg.dp.delta)
            assert abs(wrong - target) > 0.1 * target, (name, wrong)  # the control: other rounds are visible
