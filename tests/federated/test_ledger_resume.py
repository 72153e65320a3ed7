"""A client's write-ahead reservation is what a resumed run reads: no copy step between (issue 12).

The client writes its privacy ledger straight into the run directory before it trains; a kill
at any moment after that (here: before the launcher ever polled) leaves the round in the ledger
the resumed run's clients read, so ε can be overstated but never understated.
"""

import json

import pytest
import torch
from fed_helpers import client_context, make_cfg
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from auditml_core import config as config_mod
from auditml_core import models, training
from auditml_core.errors import RunDirError
from auditml_core.privacy.dp_sgd import epsilon_of
from auditml_core.seeds import stage_seed
from auditml_core.teacher import model_specs
from federated.app import client_state, workdir
from federated.app.client_app import train
from federated.app.task import task_for
from federated.launch.simulation import prepare_federation
from pipeline.rundir import RunDir
from pipeline.runner import stage_runtime

SEED = 3


def _message(state_dict, server_round: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state_dict), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=100, message_type=MessageType.TRAIN)


def _start(cfg, run: RunDir, work, digits_data):
    """What the train stage does before ``flwr run``, on a fresh process: runtime, work folder, resume."""
    seed = stage_seed(cfg.seed, "train")
    runtime = stage_runtime(cfg, run, "train", seed=seed)
    spec = model_specs(cfg, digits_data)["cnn"]
    run_config, _ = prepare_federation(
        cfg,
        work=work,
        datasets={"cnn": digits_data["images"]},
        specs={"cnn": spec},
        seeds={"cnn": SEED},
        runtime=runtime,
        app_settings={"seed": SEED, "node_wait_s": 2.0},
    )
    return run_config, spec


@pytest.fixture
def killed_after_reserving(tmp_path, digits_data, monkeypatch):
    """Client 0 reserves round 1 in a pipeline run directory and dies mid-training, before any poll."""
    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "dp.target_epsilon=3.0")
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    run.begin_stage("train", seed=stage_seed(cfg.seed, "train"))
    run_config, spec = _start(cfg, run, tmp_path / "work-1", digits_data)
    torch.manual_seed(0)
    weights = models.build(spec).state_dict()
    real_fit = training.fit

    def killed(*args, **kwargs):
        raise SystemExit("kill -9 mid-round")

    monkeypatch.setattr(training, "fit", killed)
    with pytest.raises(SystemExit):
        train(_message(weights, 1), client_context(run_config, 0, 2))
    monkeypatch.setattr(training, "fit", real_fit)
    return cfg, run.path, weights


def test_a_reservation_killed_before_any_poll_is_in_the_resumed_runs_ledger(
    killed_after_reserving, tmp_path, digits_data
):
    cfg, run_path, weights = killed_after_reserving
    # Before the resume, `verify` names the ledger the manifest has not noted yet as such, not as a stray file.
    run = RunDir.open(run_path)
    (unnoted,) = run.unnoted_ledgers()
    assert unnoted.startswith("checkpoints/federated/clients/cnn/") and run.verify() == []
    (run_path / "checkpoints" / "federated" / "clients" / "cnn" / "stray.json").write_text("{}")
    assert run.unnoted_ledgers() == [unnoted]  # a file that is not a ledger stays an extra
    assert run.verify() == ["extra: checkpoints/federated/clients/cnn/stray.json (not in the manifest)"]
    (run_path / "checkpoints" / "federated" / "clients" / "cnn" / "stray.json").unlink()
    # The resumed run: a new process opens the run directory; the old work folder is gone (scratch).
    run_config, _ = _start(cfg, run, tmp_path / "work-2", digits_data)
    task, _ = task_for(run_config, run_id=8)
    path = workdir.ledger_path(task.work_dir, "cnn", 0, ledger_dir=task.ledger_dir)
    assert run_path.resolve() in path.resolve().parents  # the ledger a resumed client reads is the run directory's
    ledger = json.loads(path.read_text())
    assert ledger["reserved_round"] == 1 and ledger["rounds_trained"] == []
    reserved = client_state.load_history(client_context(run_config, 0, 2), path=path, model="cnn")
    reserved_eps = epsilon_of(reserved, delta=cfg.dp.delta, accountant="rdp")
    assert reserved_eps > 0  # the killed round is counted
    # Resuming noted it in the manifest (with its spend), and the run directory verifies.
    rel = path.resolve().relative_to(run_path.resolve()).as_posix()
    assert run.manifest["artifacts"][rel]["kind"] == "ledger" and rel == unnoted
    assert run.verify() == [] and run.unnoted_ledgers() == []
    # The resumed client trains round 1 again on top of the reservation: its ε covers both.
    reply = train(_message(weights, 1), client_context(run_config, 0, 2))
    assert reply.content["metrics"]["epsilon"] > reserved_eps + 1e-6
    # The ledger moved past its record (a later kill): still accepted, since it covers what was recorded.
    assert RunDir.open(run_path).read(rel) == path.read_bytes()


def test_a_ledger_edited_to_spend_less_than_recorded_is_refused_on_resume(
    killed_after_reserving, tmp_path, digits_data
):
    cfg, run_path, _ = killed_after_reserving
    _start(cfg, RunDir.open(run_path), tmp_path / "work-2", digits_data)  # records the reservation
    path = next((run_path / "checkpoints" / "federated" / "clients" / "cnn").glob("client-0.json"))
    ledger = json.loads(path.read_text())
    ledger["accountant_history"] = []  # the round "never happened"
    path.write_text(json.dumps(ledger))
    run = RunDir.open(run_path)
    assert any("edited" in p and "client-0.json" in p for p in run.verify())
    with pytest.raises(RunDirError, match="records less spend"):
        _start(cfg, run, tmp_path / "work-3", digits_data)
