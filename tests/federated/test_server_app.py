"""The ServerApp's main driven in-process through a Grid whose nodes are ClientApp calls (no Ray)."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import InProcessGrid, make_cfg, prepare_work_dir, server_context

from auditml_core import models
from auditml_core.errors import PrivacyBudgetError
from federated.app import checkpoint, client_state, workdir
from federated.app.server_app import main
from federated.app.server_record import schedule_note
from federated.app.strategies import RoundFailedError
from federated.app.workdir import read_error, read_result


def _run(tmp_path, digits_data, *overrides, n_nodes=2, crash_in_round=0, **app):
    cfg = make_cfg(*overrides)
    rc = prepare_work_dir(tmp_path, cfg, digits_data, **app)
    grid = InProcessGrid(rc, n_nodes, crash_in_round=crash_in_round)
    main(grid, server_context(rc))
    return cfg, grid, read_result(tmp_path, "cnn")


def test_a_private_run_records_rounds_clients_and_epsilon(tmp_path, digits_data):
    cfg, _, (weights, record) = _run(tmp_path, digits_data, "dp.enabled=true", "dp.accountant=rdp")
    assert [h["round"] for h in record["history"]] == [1, 2, 3]
    assert (record["rounds"], record["local_epochs"]) == (3, 1) and record["schedule"].startswith("3 x 1: set for")
    # Every round: validation and the clients' training loss; the test split only once, after the last round.
    assert all({"val_loss", "val_accuracy", "train_loss"} <= set(h) for h in record["history"])
    assert not any(k.startswith("test_") for h in record["history"] for k in h)
    assert not any(k.startswith("test_") for k in record["initial_metrics"])
    assert {"val_accuracy", "test_loss", "test_accuracy"} <= set(record["final_metrics"])
    assert record["final_metrics"]["val_accuracy"] == record["history"][-1]["val_accuracy"]  # the released model
    assert len(record["seconds_per_round"]) == 3 and record["failures"] == []
    assert sum(record["partition"]["sizes"]) == len(digits_data["images"].y["train"]) == record["n_train"]
    assert np.sum(record["partition"]["label_histograms"]) == record["n_train"]
    for series in record["client_epsilon"].values():
        assert len(series) == 3 and all(b > a for a, b in zip(series, series[1:]))
        assert series[-1] <= cfg.dp.target_epsilon
    assert record["public_pretraining"]["split"] == "public"  # as central DP training does
    privacy = record["privacy"]
    assert privacy["epsilon"] == max(s[-1] for s in record["client_epsilon"].values())
    assert set(privacy["per_client"]) == {"0", "1"} and privacy["accountant"] == "rdp"
    assert all(p["noise_multiplier"] > 0 for p in privacy["per_client"].values())
    model = models.build(json.loads(workdir.spec_path(tmp_path, "cnn").read_text()))
    model.load_state_dict(weights)  # plain keys, the spec's shapes


def test_a_crashed_server_resumes_from_its_last_completed_round(tmp_path, digits_data):
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    with pytest.raises(SystemExit):
        main(InProcessGrid(rc, 2, crash_in_round=3), server_context(rc))
    assert read_error(tmp_path, "cnn") is not None
    ck = checkpoint.load(workdir.checkpoint_path(tmp_path, "cnn"))
    assert ck.record["completed_rounds"] == 2
    eps_before = {pid: s[-1] for pid, s in ck.record["client_epsilon"].items()}

    grid = InProcessGrid(rc, 2)  # fresh client contexts: only the ledger files remember the spend
    main(grid, server_context(rc))
    _, record = read_result(tmp_path, "cnn")
    assert grid.sent_rounds == [3, 3]
    assert record["resumed_from_round"] == [2]
    assert [h["round"] for h in record["history"]] == [1, 2, 3]
    for pid, series in record["client_epsilon"].items():
        assert series[1] == eps_before[pid] and series[2] > series[1]
        assert series[2] <= cfg.dp.target_epsilon
    assert read_error(tmp_path, "cnn") is None


def test_a_failing_client_does_not_stop_the_run(tmp_path, digits_data):
    _, _, (_, record) = _run(
        tmp_path, digits_data, "federated.n_clients=3", "federated.min_clients=2", n_nodes=3, fail_partition=0
    )
    assert [h["clients_trained"] for h in record["history"]] == [2, 2, 2]
    assert [f["round"] for f in record["failures"]] == [1, 2, 3]
    assert "injected failure of client 0" in record["failures"][0]["reason"]
    # Without DP no client has an ε: the record says "no DP" (never a 0 that reads as perfect privacy).
    assert record["client_epsilon"].startswith("no DP") and not record["dp_enabled"]
    assert not any("epsilon" in c for r in record["client_rounds"] for c in r["trained"])
    assert not any("epsilon_max" in h for h in record["history"])


def test_below_min_clients_the_run_stops_with_a_clear_error(tmp_path, digits_data):
    with pytest.raises(RoundFailedError, match="fewer than federated.min_clients=2"):
        _run(tmp_path, digits_data, "federated.min_clients=2", fail_partition=1, fail_round=2)
    error = read_error(tmp_path, "cnn")
    assert error["user_error"] and "round 2" in error["error"]
    assert checkpoint.load(workdir.checkpoint_path(tmp_path, "cnn")).record["completed_rounds"] == 1


def test_clients_out_of_budget_refuse_and_the_run_fails_naming_the_budget(tmp_path, digits_data):
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "federated.rounds=1", "dp.public_pretrain_epochs=0")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    spent = [(50.0, 0.2, 10), (0.5, 0.5, 1000)]  # a ledger already over ε=3
    from flwr.app import Context, RecordDict

    for pid in range(2):
        client_state.save_history(
            Context(7, pid, {}, RecordDict(), {}),
            spent,
            path=workdir.ledger_path(tmp_path, "cnn", pid),
            model="cnn",
            rounds=[],
        )
    with pytest.raises(PrivacyBudgetError, match="dp.target_epsilon"):
        main(InProcessGrid(rc, 2), server_context(rc))
    error = workdir.read_error(tmp_path, "cnn")
    assert error["user_error"] and error["error_type"] == "PrivacyBudgetError"
    assert "2 refused" in error["error"] and "refuses to train" in error["error"]
    assert not workdir.result_paths(tmp_path, "cnn")[1].exists()  # no result that looks like a trained model


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run_and_checkpoint(tmp_path, digits_data, strategy):
    _, _, (_, record) = _run(tmp_path, digits_data, f"federated.strategy={strategy}", "federated.rounds=2")
    assert record["strategy"]["name"] == strategy and record["completed_rounds"] == 2
    ck = checkpoint.load(workdir.checkpoint_path(tmp_path, "cnn"))
    assert bool(ck.strategy_state) == (strategy == "fedadam")  # FedAdam's moments resume with it


def test_missing_supernodes_fail_with_the_fix_named(tmp_path, digits_data):
    from federated.app.server_app import NodesMissingError

    with pytest.raises(NodesMissingError, match="federated.n_clients=2"):
        _run(tmp_path, digits_data, n_nodes=1, node_wait_s=0.5)


def _both(work, cfg, digits_data):
    prepare_work_dir(work, cfg, digits_data, name="regressor")
    rc = prepare_work_dir(work, cfg, digits_data, name="cnn", model="regressor,cnn")
    grid = InProcessGrid(rc, 2)
    main(grid, server_context(rc))
    return grid


def test_one_federation_trains_every_model_in_turn_as_separate_runs_would(tmp_path, digits_data):
    """Issue 12: app.model="regressor,cnn" trains both in one run, and the CNN comes out bit for bit
    as from a CNN-only run with the same seed."""
    cfg = make_cfg("federated.rounds=2")
    grid = _both(tmp_path / "both", cfg, digits_data)
    assert grid.sent_rounds == [1, 1, 2, 2, 1, 1, 2, 2]  # the regressor's two rounds, then the CNN's
    rc_alone = prepare_work_dir(tmp_path / "alone", cfg, digits_data, name="cnn")
    main(InProcessGrid(rc_alone, 2), server_context(rc_alone))
    (w_both, r_both), (w_alone, r_alone) = read_result(tmp_path / "both", "cnn"), read_result(tmp_path / "alone", "cnn")
    assert set(w_both) == set(w_alone) and all(torch.equal(w_both[k], w_alone[k]) for k in w_both)
    assert [h["val_accuracy"] for h in r_both["history"]] == [h["val_accuracy"] for h in r_alone["history"]]
    assert r_both["final_metrics"] == r_alone["final_metrics"]
    _, r_reg = read_result(tmp_path / "both", "regressor")
    assert r_reg["completed_rounds"] == 2 and "val_r2" in r_reg["history"][-1]
    assert {"val_r2", "test_r2"} <= set(r_reg["final_metrics"])


def test_in_one_federation_each_model_keeps_its_own_checkpoint_and_ledgers(tmp_path, digits_data):
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "federated.rounds=2")
    _both(tmp_path, cfg, digits_data)
    for name in ("regressor", "cnn"):
        _, record = read_result(tmp_path, name)
        assert record["completed_rounds"] == 2 and record["failures"] == []
        assert checkpoint.load(workdir.checkpoint_path(tmp_path, name)).record["completed_rounds"] == 2
        for pid in range(2):  # each model's ε is accounted in its own ledger, over its own rounds only
            assert client_state.load_rounds(workdir.ledger_path(tmp_path, name, pid)) == [1, 2]
            series = record["client_epsilon"][str(pid)]
            assert len(series) == 2 and 0 < series[0] < series[1] <= cfg.dp.target_epsilon


def test_the_record_says_where_the_schedule_came_from():
    """Each model's schedule is its own (<model>.federated); under DP its default is dp_rounds x dp_local_epochs;
    the record says which applied, per model."""
    from auditml_core.config import Config, load_config

    plain = schedule_note(load_config(None, ["train.mode=federated"]), "cnn")
    dp = load_config(None, ["train.mode=federated", "dp.enabled=true"])
    own, regressor = Config().cnn.federated, Config().regressor.federated
    default = schedule_note(dp, "cnn")
    assert plain == f"cnn.federated.rounds x cnn.federated.local_epochs = {own.rounds} x {own.local_epochs}"
    assert schedule_note(load_config(None, []), "regressor").endswith(f"{regressor.rounds} x {regressor.local_epochs}")
    assert default.startswith(f"{own.dp_rounds} x {own.dp_local_epochs}: the DP default (cnn.federated.dp_rounds")
    assert f"the non-DP default is {own.rounds} x {own.local_epochs}" in default
    assert f"the whole {own.dp_rounds} x {own.dp_local_epochs} schedule" in default
    set_here = schedule_note(load_config(None, ["dp.enabled=true", "cnn.federated.local_epochs=2"]), "cnn")
    assert set_here.startswith(f"{own.dp_rounds} x 2: set for this run")
    every = schedule_note(load_config(None, ["federated.rounds=4"]), "regressor")
    assert every == f"federated.rounds (every model) x regressor.federated.local_epochs = 4 x {regressor.local_epochs}"


def test_the_report_reads_a_federated_record_as_what_it_is(tmp_path, digits_data):
    """Issue 25 item 7: the card names rounds x local epochs, clients, strategy and partitioner (not the unused
    fit.epochs); the curve's note names validation (not test) and the clients' training loss."""
    from pipeline.report.html_page import curve_note, training_curves_png
    from pipeline.report.model_card import training_line as _training_line

    _, _, (_, record) = _run(
        tmp_path, digits_data, "federated.strategy=fedprox", "federated.partitioner=dirichlet", "cnn.fit.epochs=77"
    )
    line = _training_line(record)
    assert "3 rounds × 1 local epochs (3 completed), 2 clients (at least" in line
    assert "strategy fedprox (proximal_mu = 0.01)" in line and "Dirichlet label skew, α = 0.5" in line
    assert "77" not in line and "epochs = " not in line  # fit.epochs is not what federated training ran
    note = curve_note(record["history"])
    assert note.startswith("Loss per round: train_loss (the clients' own training rows")
    assert "val_loss (validation split" in note and "test split is not drawn" in note
    assert "training and validation splits" not in note and training_curves_png(record["history"], "cnn")
    central = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2}]
    assert curve_note(central).startswith("Loss per epoch: train_loss (training split); val_loss (validation split).")
