import re

import pytest

from auditml_core.config import (
    Config,
    federated_schedule,
    flatten,
    from_flat,
    load_config,
    schedule_sections,
    to_toml,
)
from auditml_core.errors import ConfigError


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["cnn.fit.epochs=3", "dp.enabled=true", "regressor.hidden_sizes=[8, 4]", 'data.target="y"'])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert cfg.cnn.fit.epochs == 3 and cfg.dp.enabled and cfg.regressor.hidden_sizes == (8, 4)


def test_nested_defaults_survive_partial_sections():
    # regressor.fit has its own defaults (200 epochs), distinct from FitConfig's; a partial override keeps them.
    cfg = load_config(None, ["regressor.fit.lr=0.01"])
    assert cfg.regressor.fit.epochs == Config().regressor.fit.epochs
    assert cfg.regressor.fit.lr == 0.01


def test_flat_view_round_trips():
    cfg = load_config(None, ["federated.n_clients=7", "cnn.channels=[4, 8]"])
    flat = flatten(cfg)
    assert flat["federated.n_clients"] == 7 and flat["cnn.channels"] == [4, 8]
    assert from_flat(flat) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("cnn.fit.epoch=3", "unknown config key 'cnn.fit.epoch'; valid keys in cnn.fit: epochs"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("train.mode=foo", "choose one of: central, federated"),
        ("cnn.fit.epochs=1.5", "must be an integer"),
        ("dp.enabled=yes", "must be true or false"),
        ("dp.delta=2", "'dp.delta' = 2.0 is out of range"),
        ("dp.target_epsilon=0", "'dp.target_epsilon'"),
        ("cnn.kernel_size=2", "odd integer"),
        ("cnn=3", "is a section"),
        ("federated.min_clients=9", "federated.min_clients"),
        ("data.test_fraction=0.5", "leave rows to train on"),
        ("noequals", "is not KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    overrides = [override]
    if override == "data.test_fraction=0.5":
        overrides.append("data.val_fraction=0.3")
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_csv_requires_target():
    with pytest.raises(ConfigError, match="data.target"):
        load_config(None, ['data.tabular_csv="x.csv"'])


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cnn\nepochs=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_each_model_has_its_own_federated_schedule_and_dp_its_own_default(tmp_path):
    """Each model trains <model>.federated.rounds x local_epochs; under DP σ is planned for them, so the DP default
    (<model>.federated.dp_rounds x dp_local_epochs) is shorter; a value set wins, per model, in both modes."""
    plain = load_config(None, ["train.mode=federated"])
    dp = load_config(None, ["train.mode=federated", "dp.enabled=true"])
    assert schedule_sections() == ("regressor", "cnn")
    for name in schedule_sections():
        own = getattr(Config(), name).federated
        assert federated_schedule(plain, name) == (own.rounds, own.local_epochs)
        assert federated_schedule(dp, name) == (own.dp_rounds, own.dp_local_epochs)
        assert own.dp_rounds * own.dp_local_epochs < own.rounds * own.local_epochs
    # One model's key set: it wins for that model only, the other key and the other model keep their DP defaults.
    one = load_config(None, ["dp.enabled=true", "cnn.federated.rounds=7"])
    assert federated_schedule(one, "cnn") == (7, Config().cnn.federated.dp_local_epochs)
    assert federated_schedule(one, "regressor") == federated_schedule(dp, "regressor")
    path = tmp_path / "c.toml"
    path.write_text("[dp]\nenabled = true\n[regressor.federated]\nlocal_epochs = 2\n")
    from_file = load_config(path)
    assert federated_schedule(from_file, "regressor") == (Config().regressor.federated.dp_rounds, 2)
    user_level = load_config(None, ["train.mode=federated", "client_dp.enabled=true"])  # σ over rounds too
    assert all(federated_schedule(user_level, n) == federated_schedule(dp, n) for n in schedule_sections())
    # federated.* above 0 set every model's schedule (federated.dp_* only under DP, where nothing else is set).
    every = load_config(None, ["dp.enabled=true", "federated.dp_rounds=4", "federated.dp_local_epochs=2"])
    assert all(federated_schedule(every, n) == (4, 2) for n in schedule_sections())
    both = load_config(None, ["dp.enabled=true", "federated.rounds=7", "cnn.federated.rounds=3"])
    assert all(federated_schedule(both, n).rounds == 7 for n in schedule_sections())
    # The resolved config (what the run directory saves, what Flower receives) reads back unchanged.
    cfg = load_config(None, ["train.mode=federated", "dp.enabled=true", "cnn.federated.local_epochs=2"])
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg and from_flat(flatten(cfg)) == cfg
    with pytest.raises(ValueError, match="no federated schedule for model 'gbm'"):
        federated_schedule(cfg, "gbm")


def test_a_config_file_from_before_per_model_schedules_keeps_its_meaning(tmp_path):
    """A file written when the schedule was global ([federated] rounds = 40 ...) trains every model 40 x 3, as
    it did then (the global keys above 0 override the per-model ones), under DP too."""
    path = tmp_path / "old.toml"
    old = "[federated]\nrounds = 40\nlocal_epochs = 3\ndp_rounds = 10\ndp_local_epochs = 1\n"
    path.write_text(old)
    assert all(federated_schedule(load_config(path), n) == (40, 3) for n in schedule_sections())
    path.write_text("[dp]\nenabled = true\n" + old)
    assert all(federated_schedule(load_config(path), n) == (40, 3) for n in schedule_sections())
    path.write_text("[dp]\nenabled = true\n[federated]\ndp_rounds = 4\n")  # old: DP rounds of every model
    assert all(federated_schedule(load_config(path), n).rounds == 4 for n in schedule_sections())


@pytest.mark.parametrize(
    "override,message",
    [
        ("cnn.federated.rounds=0", "'cnn.federated.rounds' = 0 is out of range; it must be >= 1"),
        ("regressor.federated.dp_local_epochs=0", "'regressor.federated.dp_local_epochs' = 0 is out of range"),
        ("federated.rounds=-1", "'federated.rounds' = -1 is out of range; it must be >= 0 (0 = each model's own)"),
        ("federated.dp_local_epochs=-2", "'federated.dp_local_epochs' = -2 is out of range; it must be >= 0"),
        ("cnn.federated.round=3", "unknown config key 'cnn.federated.round'; valid keys in cnn.federated: rounds, "),
        ("cnn.federated=3", "config key 'cnn.federated' is a section; set its keys"),
    ],
)
def test_schedule_keys_are_checked_in_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    with pytest.raises(ConfigError, match=r"cnn\.federated\.rounds \* cnn\.federated\.local_epochs.*<= 100000"):
        load_config(None, ["cnn.federated.rounds=50001", "cnn.federated.local_epochs=2"])
