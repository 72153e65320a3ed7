"""The CLI warns once per setting that changes nothing (naming the switch) and refuses it with --strict."""

import json
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


def test_the_readme_identifier_commands(tmp_path, monkeypatch, capsys):
    """The README's "Your own data" commands on visits.csv: the refusal, then data.ignore_columns (data stage)."""
    import shlex
    from pathlib import Path

    from sklearn.datasets import load_diabetes

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = [ln.split("  #")[0].strip() for ln in readme.splitlines() if "visits.csv" in ln and ln.startswith("py")]
    assert len(commands) == 2 and "data.ignore_columns" in commands[1]
    table = load_diabetes(as_frame=True).frame.rename(columns={"target": "outcome"})
    table.iloc[:200].rename_axis("visit_id").to_csv(tmp_path / "visits.csv")  # as tests/test_readme.py makes it
    monkeypatch.chdir(tmp_path)
    args = [shlex.split(c)[3:] for c in commands]  # after "python -m pipeline"
    assert main([*args[0], "--out", "runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'visit_id'" in err[0] and "data.ignore_columns" in err[0], err
    assert main([*args[1], "--stages", "data", "--out", "runs"]) == 0
    (run,) = [r for r in (tmp_path / "runs").iterdir() if (r / "data" / "tabular.json").exists()]
    meta = json.loads((run / "data" / "tabular.json").read_text())
    assert "visit_id" not in meta["feature_names"] and meta["provenance"]["ignored_columns"] == ["visit_id"]
