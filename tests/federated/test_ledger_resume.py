"""A client's write-ahead reservation is what a resumed run reads: no copy step between (issue 12).

The client writes its privacy ledger straight into the run directory before it trains; a kill
at any moment after that (here: before the launcher ever polled) leaves the round in the ledger
the resumed run's clients read, so ε can be overstated but never understated.
"""

import json

import numpy as np
import pytest
import torch
from fed_helpers import client_context, make_cfg
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from auditml_core import config as config_mod
from auditml_core import models, training
from auditml_core.errors import RunDirError
from auditml_core.privacy.dp_sgd import covers, epsilon_of
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
    # The resumed run sends round 1 again. The killed attempt released nothing (round 1 is not in rounds_trained):
    # the client re-runs it under the reservation that already counts it, instead of spending round 1 twice.
    reply = train(_message(weights, 1), client_context(run_config, 0, 2))
    assert reply.content["metrics"]["epsilon"] == pytest.approx(reserved_eps, rel=1e-9)
    settled = json.loads(path.read_text())
    assert settled["rounds_trained"] == [1] and settled["reserved_round"] is None
    assert [tuple(h) for h in settled["accountant_history"]] == reserved  # the same spend, not twice
    # The ledger records what the manifest noted (a later write): accepted, since it covers what was recorded.
    assert RunDir.open(run_path).read(rel) == path.read_bytes()
    # Round 1's result was released now. A server that crashed before it checkpointed the round sends round 1
    # again from the same global model: the client sends the same result again (post-processing, no spend).
    again = train(_message(weights, 1), client_context(run_config, 0, 2))
    assert again.content["metrics"]["replayed"] == 1 and reply.content["metrics"]["replayed"] == 0
    assert again.content["metrics"]["epsilon"] == reply.content["metrics"]["epsilon"]
    first, second = reply.content["arrays"], again.content["arrays"]
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first.keys())
    assert json.loads(path.read_text())["rounds_trained"] == [1]
    # From another global model it is another release: trained and spent again (conservative).
    other = {k: v + 0.01 for k, v in weights.items()}
    third = train(_message(other, 1), client_context(run_config, 0, 2))
    assert third.content["metrics"]["replayed"] == 0
    assert third.content["metrics"]["epsilon"] > reserved_eps + 1e-6
    assert json.loads(path.read_text())["rounds_trained"] == [1, 1]


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


def test_a_reservation_for_another_round_stays_counted(killed_after_reserving, tmp_path, digits_data):
    """A standing reservation for round 1 does not stand for round 2: round 2 spends on top of it."""
    cfg, run_path, weights = killed_after_reserving
    run_config, _ = _start(cfg, RunDir.open(run_path), tmp_path / "work-2", digits_data)
    task, _ = task_for(run_config, run_id=8)
    path = workdir.ledger_path(task.work_dir, "cnn", 0, ledger_dir=task.ledger_dir)
    reserved = json.loads(path.read_text())["accountant_history"]
    train(_message(weights, 2), client_context(run_config, 0, 2))
    ledger = json.loads(path.read_text())
    steps = lambda h: sum(n for _, _, n in h)  # noqa: E731  (equal (σ, q) entries may be merged)
    assert ledger["rounds_trained"] == [2] and steps(ledger["accountant_history"]) == 2 * steps(reserved)
    assert covers(ledger["accountant_history"], reserved)


def test_the_server_writes_its_checkpoint_into_the_run_directory_and_a_resume_reads_it(tmp_path, digits_data):
    """Issue 25 item 1: no polling copy. A server killed after round 2 leaves its round-2 checkpoint in the run
    directory, before this process ever noted it; the resume notes it, continues after round 2 and its ledgers
    and checkpoint verify; a checkpoint of fewer rounds than noted is refused."""
    from fed_helpers import InProcessGrid, server_context

    from federated.app import checkpoint
    from federated.app.server_app import main

    cfg = make_cfg("dp.enabled=true", "dp.accountant=rdp", "dp.target_epsilon=3.0", "federated.rounds=3")
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    run.begin_stage("train", seed=stage_seed(cfg.seed, "train"))
    run_config, _ = _start(cfg, run, tmp_path / "work-1", digits_data)
    ck_dir = run.path / "checkpoints" / "federated" / "server"
    assert run_config["app.checkpoint-dir"] == str(ck_dir.resolve())
    with pytest.raises(SystemExit):
        main(InProcessGrid(run_config, 2, crash_in_round=3), server_context(run_config))
    ck_path = ck_dir / "cnn.checkpoint.safetensors"
    assert checkpoint.load(ck_path).record["completed_rounds"] == 2  # written by the server, in place
    assert not (tmp_path / "work-1" / "server").exists()  # nothing in the scratch folder to copy or lose
    run = RunDir.open(run.path)
    rel = "checkpoints/federated/server/cnn.checkpoint.safetensors"
    assert run.unnoted_server_checkpoints() == [rel] and run.verify() == []  # not a stray file
    # The resume (a new process, a new work folder) notes it and the server continues after round 2.
    run_config, _ = _start(cfg, run, tmp_path / "work-2", digits_data)
    entry = run.manifest["artifacts"][rel]
    assert entry["kind"] == "checkpoint" and entry["completed_rounds"] == 2 and entry["in_place"]
    grid = InProcessGrid(run_config, 2)
    main(grid, server_context(run_config))
    assert grid.sent_rounds == [3, 3] and checkpoint.load(ck_path).record["resumed_from_round"] == [2]
    assert run.verify() == []  # the checkpoint moved to round 3 after its note: accepted (same run, more rounds)
    run.record_server_checkpoint(rel, stage="train", seed=0)
    assert run.manifest["artifacts"][rel]["completed_rounds"] == 3
    older = checkpoint.ServerCheckpoint(
        weights={}, strategy_state={}, record={"completed_rounds": 1, "fingerprint": checkpoint.fingerprint(run_config)}
    )
    checkpoint.save(ck_path, older)  # fewer rounds than noted: not what this run wrote last
    assert any("edited" in p and rel in p for p in RunDir.open(run.path).verify())
    with pytest.raises(RunDirError, match="fewer rounds than the manifest noted"):
        RunDir.open(run.path).record_server_checkpoint(rel, stage="train", seed=0)
