"""Settings that change nothing under the current switches are found, with the switch that would make them count."""

import dataclasses
import re

import pytest

from auditml_core.config import Config, flatten, load_config
from auditml_core.config_effect import CONDITIONAL, given_keys, inert_settings


@pytest.mark.parametrize(
    "overrides,key,switch",
    [
        (["dp.target_epsilon=3"], "dp.target_epsilon", "dp.enabled=true"),  # the README's own example
        (["cnn.dp_fit.epochs=5"], "cnn.dp_fit.epochs", "dp.enabled=true"),
        (["regressor.dp_fit.lr=0.1"], "regressor.dp_fit.lr", "dp.enabled=true"),
        (["federated.rounds=3"], "federated.rounds", "train.mode=federated"),
        (["client_dp.noise_multiplier=1.0"], "client_dp.noise_multiplier", "train.mode=federated"),
        (["train.mode=federated", "client_dp.clipping_norm=2.0"], "client_dp.clipping_norm", "client_dp.enabled=true"),
        (["train.mode=federated", "federated.server_lr=0.1"], "federated.server_lr", "federated.strategy=fedadam"),
        (["audit.enabled=false", "audit.n_shadows=8"], "audit.n_shadows", "audit.enabled=true"),
        (["dp.enabled=true", "train.patience=3"], "train.patience", "dp.enabled=false"),
        (["data.target=outcome"], "data.target", "data.tabular_csv"),
        (["cnn.federated.rounds=3"], "cnn.federated.rounds", "train.mode=federated"),
        (["train.mode=federated", "regressor.federated.dp_rounds=3"], "regressor.federated.dp_rounds", "dp.enabled"),
        (["train.mode=federated", "federated.rounds=4", "cnn.federated.rounds=3"], "cnn.federated.rounds", "=0"),
        (
            ["train.mode=federated", "federated.local_epochs=2", "regressor.federated.local_epochs=5"],
            "regressor.federated.local_epochs",
            "federated.local_epochs=0",
        ),
        (
            ["train.mode=federated", "dp.enabled=true", "federated.rounds=2", "federated.dp_rounds=2"],
            "federated.dp_rounds",
            "federated.rounds=0",
        ),
    ],
)
def test_a_setting_without_effect_names_the_switch(overrides, key, switch):
    cfg = load_config(None, overrides)
    inert = inert_settings(cfg, given_keys(None, overrides))
    assert list(inert) == [key]  # the switches themselves count
    assert switch in inert[key]


@pytest.mark.parametrize(
    "overrides",
    [
        ["dp.enabled=true", "dp.target_epsilon=3", "cnn.dp_fit.epochs=5"],
        ["train.mode=federated", "federated.rounds=3", "client_dp.enabled=true", "client_dp.noise_multiplier=1.0"],
        ["train.mode=federated", "federated.strategy=fedadam", "federated.server_lr=0.1"],
        ["train.mode=federated", "cnn.federated.rounds=3", "regressor.federated.local_epochs=1"],
        ["train.mode=federated", "client_dp.enabled=true", "cnn.federated.dp_rounds=3", "federated.local_epochs=2"],
        ["cnn.fit.epochs=3", "explain.n_rows=5", "audit.n_shadows=8", "train.patience=3", "seed=4"],
    ],
)
def test_settings_that_count_are_not_flagged(overrides):
    cfg = load_config(None, overrides)
    assert inert_settings(cfg, given_keys(None, overrides)) == {}


def test_several_switches_are_joined_and_each_key_is_named_once():
    overrides = ["client_dp.noise_multiplier=1.0", "client_dp.noise_multiplier=2.0"]
    inert = inert_settings(load_config(None, overrides), given_keys(None, overrides))
    assert inert == {"client_dp.noise_multiplier": "train.mode=federated and client_dp.enabled=true"}


def test_a_new_key_in_a_listed_section_is_covered_without_code():
    # Keys other issues add (federated.ray_address, audit.*) fall under their section's entry.
    cfg = Config()
    assert inert_settings(cfg, ["federated.ray_address", "audit.some_new_key"]) == {
        "federated.ray_address": "train.mode=federated"
    }
    off = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, enabled=False))
    assert inert_settings(off, ["audit.some_new_key"]) == {"audit.some_new_key": "audit.enabled=true"}


def test_the_table_names_real_keys():
    keys = set(flatten(Config()))
    for rule in CONDITIONAL:
        for pattern in rule.keys:  # no stale pattern: each matches a key that exists
            assert any(rule.matches(k) for k in keys if re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), k))
        for switch in re.findall(r"([a-z_]+\.[a-z_.]+)=", rule.switch):  # every switch it names is a key
            assert switch in keys, (rule.switch, switch)


def test_a_config_file_counts_only_the_keys_it_changes(tmp_path):
    from auditml_core.config import to_toml

    path = tmp_path / "my.toml"
    path.write_text(to_toml(Config()).replace("target_epsilon = 3.0", "target_epsilon = 2.0", 1))
    assert given_keys(path, ["cnn.fit.epochs=10", "dp={enabled=false}"]) == [
        "dp.target_epsilon",
        "cnn.fit.epochs",
        "dp.enabled",
    ]
    cfg = load_config(path, ["cnn.fit.epochs=10"])
    assert inert_settings(cfg, given_keys(path, ["cnn.fit.epochs=10"])) == {"dp.target_epsilon": "dp.enabled=true"}
