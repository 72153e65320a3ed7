import pytest

from auditml_core.config import Config, flatten, from_flat, load_config, to_toml
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


def test_dp_gets_its_own_federated_schedule_unless_one_is_set(tmp_path):
    """Under DP σ is planned for rounds x local epochs: the DP default schedule is shorter; explicit values win."""
    plain = load_config(None, ["train.mode=federated"]).federated
    dp = load_config(None, ["train.mode=federated", "dp.enabled=true"]).federated
    assert (plain.rounds, plain.local_epochs) == (Config().federated.rounds, Config().federated.local_epochs)
    assert (dp.rounds, dp.local_epochs) == (dp.dp_rounds, dp.dp_local_epochs)
    assert dp.rounds * dp.local_epochs < plain.rounds * plain.local_epochs
    # One key set: it wins, the other keeps its DP default; the same in a TOML file.
    one = load_config(None, ["dp.enabled=true", "federated.rounds=7"]).federated
    assert (one.rounds, one.local_epochs) == (7, one.dp_local_epochs)
    path = tmp_path / "c.toml"
    path.write_text("[dp]\nenabled = true\n[federated]\nlocal_epochs = 2\n")
    from_file = load_config(path).federated
    assert (from_file.rounds, from_file.local_epochs) == (from_file.dp_rounds, 2)
    user_level = load_config(None, ["train.mode=federated", "client_dp.enabled=true"]).federated  # σ over rounds too
    assert (user_level.rounds, user_level.local_epochs) == (dp.rounds, dp.local_epochs)
    custom = load_config(None, ["dp.enabled=true", "federated.dp_rounds=4", "federated.dp_local_epochs=2"]).federated
    assert (custom.rounds, custom.local_epochs) == (4, 2)
    # The resolved config (what the run directory saves, what Flower receives) reads back unchanged.
    cfg = load_config(None, ["train.mode=federated", "dp.enabled=true"])
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg and from_flat(flatten(cfg)) == cfg


@pytest.mark.parametrize("key", ["federated.dp_rounds", "federated.dp_local_epochs"])
def test_dp_schedule_keys_are_checked(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "' = 0 is out of range; it must be >= 1"):
        load_config(None, [f"{key}=0"])
