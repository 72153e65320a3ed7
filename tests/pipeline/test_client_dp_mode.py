"""``client_dp.enabled=true`` on a central pipeline run is refused, not ignored (#23 item 6).

Before: the run trained centrally without any DP and exited 0.
"""

from __future__ import annotations

import pytest

from auditml_core.config import check_pipeline_mode, load_config
from auditml_core.errors import ConfigError
from pipeline.__main__ import main


def test_a_central_run_with_user_level_dp_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["--out", str(out), "--quiet", "client_dp.enabled=true"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: client_dp.enabled=true")
    assert "train.mode=federated" in err and "dp.enabled=true" in err
    assert not out.exists() or not any(out.iterdir())  # no run directory was created


def test_the_federated_launchers_configs_still_load():
    # deploy and the Flower apps load their config without train.mode=federated: only the pipeline CLI refuses
    central = load_config(None, ["client_dp.enabled=true"])
    with pytest.raises(ConfigError, match="would ignore it"):
        check_pipeline_mode(central)
    check_pipeline_mode(load_config(None, ["train.mode=federated", "client_dp.enabled=true"]))
    check_pipeline_mode(load_config(None, ["dp.enabled=true"]))
