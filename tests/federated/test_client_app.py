"""The ClientApp's train handler driven directly with fabricated Messages and Contexts (no Ray)."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import client_context, make_cfg, prepare_work_dir
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from auditml_core import models
from auditml_core.privacy.dp_sgd import epsilon_of
from auditml_core.teacher import model_specs
from federated.app import workdir
from federated.app.client_app import InjectedFailure, evaluate, train

ROUNDS = 3


def _message(state_dict, server_round: int, **config) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord(state_dict), "config": ConfigRecord({"server-round": server_round, **config})}
    )
    return Message(content, dst_node_id=100, message_type=MessageType.TRAIN)


def _initial(cfg, digits_data):
    torch.manual_seed(0)
    return models.build(model_specs(cfg, digits_data)["cnn"]).state_dict()


@pytest.fixture
def dp_setup(tmp_path, digits_data):
    # RDP keeps the noise calibration fast; the ledger logic does not depend on the accountant.
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", f"federated.rounds={ROUNDS}", "dp.target_epsilon=3.0")
    return cfg, prepare_work_dir(tmp_path, cfg, digits_data)


def test_epsilon_accumulates_over_rounds_and_the_client_refuses_past_its_budget(dp_setup, digits_data, tmp_path):
    cfg, rc = dp_setup
    ctx = client_context(rc, 0, 2)
    weights, eps = _initial(cfg, digits_data), []
    for r in range(1, ROUNDS + 1):
        reply = train(_message(weights, r), ctx)
        metrics = reply.content["metrics"]
        assert metrics["refused"] == 0
        eps.append(metrics["epsilon"])
        weights = reply.content["arrays"].to_torch_state_dict()
        privacy = json.loads(reply.content["status"]["privacy"])
        assert privacy["epsilon"] == pytest.approx(metrics["epsilon"])
        assert privacy["total_steps"] == sum(n for _, _, n in privacy["accountant_history"])
    assert all(b > a for a, b in zip(eps, eps[1:])), eps  # every round spends
    assert eps[-1] <= cfg.dp.target_epsilon + 1e-9
    assert eps[-1] > 0.8 * cfg.dp.target_epsilon  # sigma was derived for all rounds, not one

    # One round more than planned would overspend: the client refuses, sends no weights, says why.
    reply = train(_message(weights, ROUNDS + 1), ctx)
    assert reply.content["metrics"]["refused"] == 1
    assert not reply.content.array_records
    assert "refuses" in reply.content["status"]["refused"] and "dp.target_epsilon" in reply.content["status"]["refused"]
    assert reply.content["metrics"]["epsilon"] == pytest.approx(eps[-1])


def test_the_ledger_survives_a_restart_through_the_clients_file(dp_setup, digits_data, tmp_path):
    cfg, rc = dp_setup
    weights = _initial(cfg, digits_data)
    first = train(_message(weights, 1), client_context(rc, 1, 2)).content["metrics"]["epsilon"]
    # A fresh Context (a resumed run) has an empty state; the file keeps the spend.
    fresh = client_context(rc, 1, 2)
    second = train(_message(weights, 2), fresh).content["metrics"]["epsilon"]
    assert second > first
    path = workdir.ledger_path(tmp_path, "cnn", 1)
    stored = json.loads(path.read_text())
    assert stored["rounds_trained"] == [1, 2]
    assert epsilon_of(stored["accountant_history"], delta=cfg.dp.delta, accountant="rdp") == pytest.approx(second)


def test_replies_carry_unwrapped_weights_only(dp_setup, digits_data):
    cfg, rc = dp_setup
    weights = _initial(cfg, digits_data)
    reply = train(_message(weights, 1), client_context(rc, 0, 2))
    sent = reply.content["arrays"]
    assert list(sent.keys()) == list(weights.keys())
    assert not any(k.startswith("_module.") for k in sent.keys())
    n_train = len(digits_data["images"].y["train"])
    assert reply.content["metrics"]["num-examples"] in (n_train // 2, n_train - n_train // 2)


def test_non_private_training_reports_no_epsilon_and_moves_the_weights(tmp_path, digits_data):
    cfg = make_cfg()
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    weights = _initial(cfg, digits_data)
    reply = train(_message(weights, 1), client_context(rc, 0, 2))
    out = reply.content["arrays"].to_torch_state_dict()
    assert "epsilon" not in reply.content["metrics"]  # no DP: no ε at all (a 0 would read as perfect privacy)
    assert "status" not in reply.content
    assert any(not torch.equal(out[k], weights[k]) for k in weights)


def test_fedprox_term_keeps_the_local_model_closer_to_the_global_one(tmp_path, digits_data):
    cfg = make_cfg("cnn.fit.lr=0.01")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    weights = _initial(cfg, digits_data)

    def drift(mu):
        out = (
            train(_message(weights, 1, **{"proximal-mu": mu}), client_context(rc, 0, 2))
            .content["arrays"]
            .to_torch_state_dict()
        )
        return sum(float(((out[k] - weights[k]) ** 2).sum()) for k in weights) ** 0.5

    free, held = drift(0.0), drift(5.0)
    assert held < 0.8 * free


def test_fault_injection_raises_only_for_the_named_client_and_round(tmp_path, digits_data):
    cfg = make_cfg()
    rc = prepare_work_dir(tmp_path, cfg, digits_data, fail_partition=0, fail_round=2)
    weights = _initial(cfg, digits_data)
    train(_message(weights, 1), client_context(rc, 0, 2))
    with pytest.raises(InjectedFailure, match="client 0 in round 2"):
        train(_message(weights, 2), client_context(rc, 0, 2))
    train(_message(weights, 2), client_context(rc, 1, 2))


def test_a_supernode_for_another_federation_size_is_refused(tmp_path, digits_data):
    from auditml_core.errors import ConfigError

    cfg = make_cfg()
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    with pytest.raises(ConfigError, match="federated.n_clients=2"):
        train(_message(_initial(cfg, digits_data), 1), client_context(rc, 0, 5))


def test_evaluate_reports_the_clients_validation_share(tmp_path, digits_data):
    cfg = make_cfg()
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    msg = Message(
        RecordDict({"arrays": ArrayRecord(_initial(cfg, digits_data)), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=100,
        message_type=MessageType.EVALUATE,
    )
    metrics = [evaluate(msg, client_context(rc, i, 2)).content["metrics"] for i in range(2)]
    assert sum(m["num-examples"] for m in metrics) == len(digits_data["images"].y["val"])
    assert all(0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["loss"]) for m in metrics)


def test_the_round_is_reserved_in_the_ledger_before_training_so_a_crash_only_overstates(
    dp_setup, digits_data, tmp_path, monkeypatch
):
    from auditml_core import training

    cfg, rc = dp_setup
    path = workdir.ledger_path(tmp_path, "cnn", 0)
    seen, real_fit = {}, training.fit

    def crash(*args, **kwargs):  # the client dies in the middle of its round
        seen["ledger"] = json.loads(path.read_text())
        raise MemoryError("killed mid-round")

    monkeypatch.setattr(training, "fit", crash)
    with pytest.raises(MemoryError):
        train(_message(_initial(cfg, digits_data), 1), client_context(rc, 0, 2))
    # What training found on disk when it started: this round's spend, already recorded.
    assert seen["ledger"]["reserved_round"] == 1 and seen["ledger"]["rounds_trained"] == []
    reserved_eps = epsilon_of(seen["ledger"]["accountant_history"], delta=cfg.dp.delta, accountant="rdp")
    assert reserved_eps > 0
    monkeypatch.setattr(training, "fit", real_fit)
    # The restarted client (fresh Context) is asked for round 1 again. The crashed attempt released nothing
    # (round 1 is not in rounds_trained), so it re-runs the round under the reservation that already counts it
    # (issue 25 item 1): ε is the reserved one, never below it, and the round is not counted twice.
    reply = train(_message(_initial(cfg, digits_data), 1), client_context(rc, 0, 2))
    eps_after = reply.content["metrics"]["epsilon"]
    privacy = json.loads(reply.content["status"]["privacy"])
    assert eps_after == pytest.approx(reserved_eps, rel=1e-9)
    # The reservation is exactly one round's spend, and that is what the round spent.
    ((sigma, q, steps),) = seen["ledger"]["accountant_history"]
    assert privacy["accountant_history"] == [[sigma, q, steps]]
    stored = json.loads(path.read_text())
    assert stored["reserved_round"] is None and stored["rounds_trained"] == [1]


def test_dp_batch_sizes_above_a_clients_share_are_capped_and_said(tmp_path, digits_data):
    from federated.app.task import MIN_DP_STEPS_PER_EPOCH, task_for

    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "cnn.dp_fit.batch_size=4096", "federated.n_clients=5")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    task, _ = task_for(rc, run_id=7)
    parts = task.partition()
    for pid, rows in enumerate(parts):
        assert task.client_batch_size(pid) == len(rows) // MIN_DP_STEPS_PER_EPOCH
    record = task.batch_size_record()
    assert record["configured"] == 4096 and "cnn.dp_fit.batch_size=4096 capped" in record["note"]
    reply = train(_message(_initial(cfg, digits_data), 1), client_context(rc, 2, 5))
    privacy = json.loads(reply.content["status"]["privacy"])
    assert reply.content["metrics"]["refused"] == 0
    assert privacy["sample_rate"] == pytest.approx(1 / MIN_DP_STEPS_PER_EPOCH, rel=0.3)


def test_config_and_data_are_built_once_per_process_for_the_same_run(tmp_path, digits_data):
    from federated.app import task as task_mod

    cfg = make_cfg()
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    first, _ = task_mod.task_for(rc, run_id=7)
    assert task_mod.task_for(dict(rc), run_id=7)[0] is first
    assert task_mod.task_for(rc, run_id=8)[0] is not first  # another run
    assert task_mod.task_for({**rc, "federated.rounds": 4}, run_id=7)[0].cfg.federated.rounds == 4


def test_in_a_multi_model_run_a_message_must_name_one_of_its_models(tmp_path, digits_data):
    from auditml_core.errors import ConfigError

    cfg = make_cfg()
    prepare_work_dir(tmp_path, cfg, digits_data, name="regressor")
    rc = prepare_work_dir(tmp_path, cfg, digits_data, name="cnn", model="regressor,cnn")
    weights = _initial(cfg, digits_data)
    with pytest.raises(ConfigError, match="names no model"):
        train(_message(weights, 1), client_context(rc, 0, 2))
    rc_one = {**rc, "app.model": "cnn"}
    with pytest.raises(ConfigError, match="does not train"):
        train(_message(weights, 1, model="regressor"), client_context(rc_one, 0, 2))
    reply = train(_message(weights, 1, model="cnn"), client_context(rc, 0, 2))
    assert reply.content["metrics"]["num-examples"] > 0
