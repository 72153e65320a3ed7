"""The CLI warns once per setting that changes nothing (naming the switch) and refuses it with --strict."""

import logging

from pipeline.__main__ import main


def test_a_setting_without_effect_warns_once_naming_the_switch(tmp_path, caplog):
    config = tmp_path / "my.toml"
    config.write_text("[dp]\ntarget_epsilon = 2.0\n")
    args = ["--config", str(config), "dp.target_epsilon=3", "federated.rounds=2", "--stages", "data"]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert main([*args, "--out", str(tmp_path / "runs")]) == 0
    warned = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert warned == [
        "setting dp.target_epsilon has no effect: it counts only with dp.enabled=true",
        "setting federated.rounds has no effect: it counts only with train.mode=federated",
    ]


def test_strict_refuses_it_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["dp.target_epsilon=3", "--strict", "--stages", "data", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dp.target_epsilon" in err[0] and "dp.enabled=true" in err[0], err
    assert not out.exists()  # nothing half-written
    # Null: the same setting with its switch on is accepted under --strict.
    from auditml_core.config import load_config
    from auditml_core.config_effect import given_keys, inert_settings

    over = ["dp.enabled=true", "dp.target_epsilon=3"]
    assert inert_settings(load_config(None, over), given_keys(None, over)) == {}
