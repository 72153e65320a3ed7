"""train_federated refuses impossible settings in one line, before any Flower process starts."""

import pytest
from fed_helpers import make_cfg

from auditml_core.errors import DataError, PrivacyBudgetError
from auditml_core.teacher import model_specs
from federated.launch import processes as launcher
from federated.launch.simulation import train_federated


@pytest.fixture
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launcher.Processes, "start", refuse)


def _train(cfg, digits_data):
    spec = model_specs(cfg, digits_data)["cnn"]
    return train_federated(cfg, name="cnn", dataset=digits_data["images"], spec=spec, seed=1)


def test_a_partition_below_the_batch_size_names_the_key(digits_data, no_processes):
    with pytest.raises(DataError, match=r"cnn\.fit\.batch_size=600.*federated\.n_clients"):
        _train(make_cfg("cnn.fit.batch_size=600"), digits_data)


def test_a_budget_the_clients_cannot_keep_is_refused_up_front(digits_data, no_processes):
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "dp.noise_multiplier=0.3", "federated.rounds=10")
    with pytest.raises(PrivacyBudgetError, match="dp.target_epsilon"):
        _train(cfg, digits_data)


def test_one_federation_for_several_models_refuses_seeds_the_apps_cannot_derive(digits_data, no_processes):
    from auditml_core import seeds
    from federated.launch.simulation import train_federated_models

    cfg = make_cfg()
    specs = model_specs(cfg, digits_data)
    kwargs = dict(
        datasets={"regressor": digits_data["tabular"], "cnn": digits_data["images"]},
        specs=specs,
    )
    with pytest.raises(ValueError, match="derive their seeds"):
        train_federated_models(cfg, seeds={"regressor": 1, "cnn": 2}, **kwargs)
    derived = {n: seeds.model_seed(cfg.seed, n) for n in ("regressor", "cnn")}
    with pytest.raises(DataError, match=r"cnn\.fit\.batch_size=600"):  # every model is checked before any start
        train_federated_models(make_cfg("cnn.fit.batch_size=600"), seeds=derived, **kwargs)
