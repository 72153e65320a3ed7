"""User-level DP says when its noise drowns the model (auditml_core.privacy.user_level.aggregate_noise), and the
report says when a released model is no better than a trivial predictor (pipeline.report.utility), any mode."""

import logging
import math

import numpy as np
import pytest

from auditml_core.config import federated_schedule, load_config
from auditml_core.data import Dataset
from auditml_core.privacy import user_level
from pipeline.report.utility import trivial_baseline

REGRESSOR_WEIGHTS = 385  # the default MLP regressor on the 10 diabetes features: 10·32 + 32 + 32 + 1


def _plan(*overrides):
    cfg = load_config(None, ["train.mode=federated", "client_dp.enabled=true", *overrides])
    rounds = federated_schedule(cfg, "regressor").rounds  # the regressor's own rounds (the weights are its)
    return user_level.plan_user_dp(cfg.client_dp, rounds=rounds, n_clients=cfg.federated.n_clients)


def test_the_noise_estimate_is_the_noise_the_aggregate_adds():
    # Independent check: run the real DP-FedAvg aggregate with no client (pure noise) and measure the noise.
    plan = _plan("federated.n_clients=20", "client_dp.target_epsilon=8")
    noise = user_level.aggregate_noise(plan, n_parameters=REGRESSOR_WEIGHTS)
    rng = np.random.default_rng(0)
    zero = [np.zeros(REGRESSOR_WEIGHTS)]
    norms = []
    for _ in range(200):
        new, _ = user_level.dp_fedavg_aggregate(
            zero,
            [],
            clipping_norm=plan.clipping_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_clients=plan.expected_clients,
            rng=rng,
        )
        norms.append(np.linalg.norm(new[0]))
    assert np.mean(norms) == pytest.approx(noise["noise_norm_per_round"], rel=0.02)
    assert noise["noise_to_signal"] == pytest.approx(
        np.mean(norms) / plan.clipping_norm / math.sqrt(plan.rounds), rel=0.02
    )


def test_the_defaults_are_flagged_by_name_and_enough_clients_are_not():
    plan = _plan()  # 5 clients, ε = 3, q = 1, the DP rounds: what the issue saw at chance
    noise = user_level.aggregate_noise(plan, n_parameters=REGRESSOR_WEIGHTS)
    assert noise["dominated"] and noise["noise_to_signal"] > 4
    line = user_level.noise_warning("MLP regressor", plan, noise)
    assert line.startswith("MLP regressor: user-level DP will drown the model") and "federated.n_clients" in line
    more = _plan(f"federated.n_clients={noise['clients_needed']}")
    enough = user_level.aggregate_noise(more, n_parameters=REGRESSOR_WEIGHTS)
    assert enough["noise_to_signal"] <= 0.5 and not enough["dominated"]
    assert user_level.noise_warning("MLP regressor", more, enough) is None


def test_the_federated_preflight_warns_before_any_process_starts(tmp_path, caplog):
    from auditml_core.teacher import fit_config, model_specs
    from federated.app.task import Task
    from federated.launch.simulation import _preflight
    from pipeline import data

    cfg = load_config(None, ["train.mode=federated", "client_dp.enabled=true"])
    datasets = data.run(cfg, {}, seed=0)
    task = Task(
        cfg=cfg,
        name="regressor",
        dataset=datasets["tabular"],
        spec=model_specs(cfg, datasets)["regressor"],
        fit_cfg=fit_config(cfg, "regressor"),
        model_seed=0,
        work_dir=tmp_path,
    )
    with caplog.at_level(logging.WARNING):
        _preflight(task)
    assert any("MLP regressor: user-level DP will drown the model" in r.getMessage() for r in caplog.records)


def _dataset(task, y_train, y_test):
    x = {s: np.zeros((len(y), 2), np.float32) for s, y in (("train", y_train), ("test", y_test))}
    names = ("a", "b", "c") if task == "classification" else ()
    index = {s: np.arange(len(y)) for s, y in (("train", y_train), ("test", y_test))}
    return Dataset(name="t", task=task, x=x, y={"train": y_train, "test": y_test}, index=index, class_names=names)


def test_a_model_at_chance_is_no_better_than_the_majority_class():
    ds = _dataset("classification", np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 2]))
    at_chance = {"cnn": {"test": {"accuracy": 0.5, "accuracy_ci95": [0.25, 0.75]}}}
    tb = trivial_baseline("cnn", ds, at_chance)
    assert tb["trivial"] == 0.5 and tb["no_better"] and "no better than a trivial predictor" in tb["statement"]
    assert "(a)" in tb["predictor"]
    good = {"cnn": {"test": {"accuracy": 0.95, "accuracy_ci95": [0.9, 0.99]}}}
    assert not trivial_baseline("cnn", ds, good)["no_better"]


def test_a_regressor_below_the_mean_predictor_is_flagged():
    y_train, y_test = np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 4.0])
    ds = _dataset("regression", y_train, y_test)
    # the training mean 1.0 on the test rows: 1 - (1 + 1 + 9) / 8
    expected = 1 - ((0 - 1) ** 2 + (2 - 1) ** 2 + (4 - 1) ** 2) / ((0 - 2) ** 2 + 0 + (4 - 2) ** 2)
    r2 = {"regressor": {"test": {"r2": -155.0, "r2_ci95": [-300.0, -40.0]}}}
    tb = trivial_baseline("regressor", ds, r2)
    assert tb["trivial"] == pytest.approx(expected) and tb["no_better"]
    ok = {"regressor": {"test": {"r2": 0.45, "r2_ci95": [0.3, 0.55]}}}
    assert not trivial_baseline("regressor", ds, ok)["no_better"]
    assert trivial_baseline("regressor", ds, {"regressor": {"test": {}}}) is None


@pytest.mark.parametrize("n_clients", [5, 200])
def test_the_record_keeps_the_estimate_and_the_report_repeats_it_when_the_noise_dominates(n_clients):
    from types import SimpleNamespace

    from auditml_core.config import ClientDPConfig
    from auditml_core.models import MODELS
    from pipeline.report.privacy import privacy_section
    from pipeline.report.privacy_federated import federated_privacy

    plan = user_level.plan_user_dp(ClientDPConfig(enabled=True, delta=1e-3), rounds=10, n_clients=n_clients)
    rec = user_level.user_privacy_record(plan, completed_rounds=10, n_parameters=REGRESSOR_WEIGHTS)
    assert rec["aggregate_noise"] == user_level.aggregate_noise(plan, n_parameters=REGRESSOR_WEIGHTS)
    trained = SimpleNamespace(
        models={name: SimpleNamespace(training={"user_level_privacy": rec, "n_train": 300}) for name in MODELS}
    )
    cfg = load_config(None, ["train.mode=federated", "client_dp.enabled=true"])
    out = federated_privacy(privacy_section(cfg, trained, {}, None), cfg, trained)
    drowned = [c for c in out["caveats"] if "user-level DP noise drowns the model" in c]
    assert len(drowned) == (len(MODELS) if n_clients == 5 else 0)
