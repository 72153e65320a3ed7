"""The first screen says which settings depart from the defaults (#29 reader study: a tiny run with
regressor.fit.epochs=3 and audit.n_eval=40 read like a default run)."""

from html import unescape

from auditml_core import config as config_mod
from auditml_core.config import load_config
from pipeline.report.html_page import render_section
from pipeline.report.settings import SHOWN, departures
from tests.tiny import ALL


def _changed(overrides):
    return departures(load_config(None, overrides))


def test_a_default_run_departs_from_nothing():  # the null
    d = _changed([])
    assert (
        d["n_changed"] == 0
        and d["changed"] == []
        and d["statement"] == "Settings: every setting is this code's default."
    )


def test_a_tiny_run_lists_every_override_that_changes_a_value():
    d = _changed(ALL)
    default = config_mod.flatten(config_mod.Config())
    run = config_mod.flatten(load_config(None, ALL))
    expected = [k for k in (o.split("=", 1)[0] for o in ALL) if run[k] != default[k]]
    assert [c["key"] for c in d["changed"]] == sorted(expected, key=list(default).index)  # config order
    assert d["n_changed"] == len(expected) > SHOWN
    by_key = {c["key"]: c for c in d["changed"]}
    assert by_key["regressor.fit.epochs"]["value"] == 3 and by_key["audit.n_eval"]["value"] == 40
    assert by_key["audit.n_eval"]["default"] == default["audit.n_eval"]
    assert d["statement"] == (
        f"Settings: {len(expected)} differ from this code's defaults (regressor.hidden_sizes=[8], "
        f"regressor.fit.epochs=3, regressor.dp_fit.epochs=2, {len(expected) - SHOWN} more)."
    )


def test_dp_is_one_departure_not_the_schedule_it_resolves_but_a_schedule_set_by_hand_is_listed():
    # Under DP, load_config gives <model>.federated.rounds / local_epochs their DP defaults: not a user's choice.
    assert [c["key"] for c in _changed(["dp.enabled=true"])["changed"]] == ["dp.enabled"]
    assert [c["key"] for c in _changed(["client_dp.enabled=true", "train.mode=federated"])["changed"]] == [
        "train.mode",
        "client_dp.enabled",
    ]
    keys = [c["key"] for c in _changed(["dp.enabled=true", "cnn.federated.rounds=5"])["changed"]]
    assert keys == ["cnn.federated.rounds", "dp.enabled"]
    keys = [c["key"] for c in _changed(["dp.enabled=true", "federated.dp_rounds=4"])["changed"]]
    assert keys == ["dp.enabled", "federated.dp_rounds"]  # the rounds it resolves are not listed again


def test_a_users_data_file_is_a_departure(tmp_path):
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,y\n" + "\n".join(f"{i},{i % 3},{i * 2}" for i in range(40)) + "\n")
    d = _changed([f'data.tabular_csv="{csv}"', "data.target=y"])
    assert [c["key"] for c in d["changed"]][:2] == ["data.tabular_csv", "data.target"]
    assert repr(str(csv)) in d["statement"]


def test_the_reproducibility_section_lists_every_departure_with_its_default():
    d = _changed(ALL)
    html = str(render_section("reproducibility", {"summary": {"settings": d}, "reproducibility": _repro()}))
    assert d["statement"] in unescape(html) and f"{d['n_changed']} settings that differ" in unescape(html)
    for c in d["changed"]:
        assert f"<code>{c['key']}</code>" in html


def _repro():
    return {
        "seed_note": "",
        "command": "",
        "rerun_commands": [],
        "self_hash_note": "",
        "artifacts": [],
        "config_toml": "",
        "seeds": {},
        "library_versions": {"python": "3"},
        "git_commit": None,
        "run_id": "r",
        "device": "cpu",
        "platform": "linux",
        "python_executable": "python",
        "root_seed": 0,
        "stage_seconds": {},
    }
