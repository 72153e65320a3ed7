"""The ServerApp says, by model name, when user-level DP's noise drowns the model (a deployment has no launcher
preflight), and records the estimate the report repeats (#23 item 4)."""

import logging

from fed_helpers import InProcessGrid, make_cfg, prepare_work_dir, server_context

from federated.app.server_app import main
from federated.app.workdir import read_result


def test_the_server_warns_by_name_and_records_the_noise_estimate(tmp_path, digits_data, caplog):
    cfg = make_cfg("client_dp.enabled=true", "client_dp.delta=0.01", "client_dp.target_epsilon=8")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    with caplog.at_level(logging.WARNING, logger="federated.app.server_app"):
        main(InProcessGrid(rc, 2), server_context(rc))
    _, record = read_result(tmp_path, "cnn")
    noise = record["user_level_privacy"]["aggregate_noise"]
    assert noise["dominated"] and noise["n_parameters"] == record["n_parameters"]
    assert any(r.getMessage().startswith("CNN classifier: user-level DP will drown the model") for r in caplog.records)
