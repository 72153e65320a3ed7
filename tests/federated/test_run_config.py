from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from auditml_core.config import Config, load_config
from auditml_core.errors import ConfigError
from federated.app.run_config import (
    APP_DEFAULTS,
    app_sections,
    declared_keys,
    from_run_config,
    overrides_for,
    pyproject_section,
    replace_section,
    run_config_toml,
    to_run_config,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# What `python -m federated.app.run_config --write` produces; tests of the mechanism use it so that only
# test_pyproject_declares_exactly_the_generated_defaults fails when pyproject.toml is stale.
GENERATED = '[tool.flwr.app]\npublisher = "x"\n\n' + pyproject_section()


def test_default_config_round_trips():
    cfg, settings = from_run_config(to_run_config(Config()))
    assert cfg == Config()
    assert settings.model == APP_DEFAULTS["app.model"]


def test_changed_config_round_trips_with_tuples_and_app_settings():
    cfg = load_config(
        None,
        [
            "cnn.channels=[8, 16, 4]",
            "regressor.hidden_sizes=[3]",
            "dp.enabled=true",
            "federated.strategy=fedadam",
            "federated.n_clients=3",
            "seed=11",
        ],
    )
    rc = to_run_config(cfg, model="regressor", work_dir="/somewhere", seed=5, fail_partition=1)
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())  # what Flower accepts
    back, settings = from_run_config(rc)
    assert back == cfg
    assert (settings.model, settings.work_dir, settings.seed, settings.fail_partition) == (
        "regressor",
        "/somewhere",
        5,
        1,
    )


def test_flower_parses_our_run_config_file_and_accepts_every_key(tmp_path):
    """What `flwr run --run-config F.toml` does: parse, then fuse onto the app's declared defaults."""
    cfg = load_config(None, ["cnn.channels=[8]", 'data.images="x \\"quoted\\".npz"', "federated.rounds=4"])
    rc = to_run_config(cfg, work_dir="/tmp/w")
    path = tmp_path / "rc.toml"
    path.write_text(run_config_toml(rc))
    parsed = parse_config_args([str(path)])
    assert parsed == rc
    import tomllib

    defaults = flatten_dict(tomllib.loads(GENERATED)["tool"]["flwr"]["app"]["config"])
    fused = fuse_dicts(defaults, parsed)  # raises for a key the app does not declare
    assert from_run_config(fused)[0] == cfg


def test_pyproject_declares_exactly_the_generated_defaults():
    text = PYPROJECT.read_text()
    assert declared_keys(text) == to_run_config(Config()), "run `python -m federated.app.run_config --write`"
    assert text.rstrip().endswith(pyproject_section().rstrip())
    assert replace_section(text) == text


def test_only_changed_values_travel_and_an_undeclared_changed_key_is_named_with_the_fix():
    text = GENERATED
    cfg = load_config(None, ["federated.rounds=4", "cnn.channels=[8]"])
    sent = overrides_for(to_run_config(cfg, work_dir="/w"), text)
    assert sent == {"federated.rounds": 4, "cnn.channels": "[8]", "app.work-dir": "/w"}
    # A key the table lacks is fine at its default (the app fills it in) and refused otherwise.
    declared_only = "\n".join(ln for ln in text.splitlines() if not ln.startswith('"federated.rounds"'))
    assert "federated.rounds" not in overrides_for(to_run_config(load_config(None, [])), declared_only)
    with pytest.raises(ConfigError, match=r"federated\.rounds.*federated\.app\.run_config --write"):
        overrides_for(to_run_config(cfg), declared_only)


def test_a_stale_key_from_the_table_is_named_with_the_fix():
    with pytest.raises(ConfigError, match="gone.key.*--write"):
        from_run_config({**to_run_config(Config()), "gone.key": 1})


def test_bad_values_fail_with_the_key_named():
    rc = to_run_config(Config())
    with pytest.raises(ConfigError, match="cnn.channels"):
        from_run_config({**rc, "cnn.channels": "[32,"})
    with pytest.raises(ConfigError, match="app.model"):
        from_run_config({**rc, "app.model": "gbm"})
    with pytest.raises(ConfigError, match="app.nope"):
        from_run_config({**rc, "app.nope": 1})
    with pytest.raises(ConfigError, match="federated.rounds"):
        from_run_config({**rc, "federated.rounds": -1})
    with pytest.raises(ConfigError, match="cnn.federated.rounds"):
        from_run_config({**rc, "cnn.federated.rounds": 0})


def test_only_the_sections_the_apps_read_travel_to_flower():
    rc = to_run_config(Config())
    assert {k.split(".", 1)[0] for k in rc if not k.startswith("app.")} == set(app_sections())
    assert not any(k.startswith(("explain.", "distill.")) for k in declared_keys(PYPROJECT.read_text()))
    # Changing what no Flower app reads changes nothing Flower sees (no regeneration, same checkpoint fingerprint).
    other = load_config(None, ["explain.n_rows=7", "distill.temperature=2.0"])
    assert to_run_config(other) == rc
    with pytest.raises(ConfigError, match="explain.n_rows.*not a config key the Flower apps read"):
        from_run_config({**rc, "explain.n_rows": 7})
