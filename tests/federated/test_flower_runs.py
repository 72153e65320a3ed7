"""Real Flower runs: the pipeline CLI in local simulation, and a loopback deployment. Slow (Ray, processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from federated.launch import processes as launcher

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "federated.n_clients=2",
    "federated.rounds=2",
    "federated.local_epochs=1",
    "regressor.hidden_sizes=[8]",
    "cnn.channels=[4]",
    "cnn.hidden=8",
    "cnn.dp_fit.batch_size=64",
]


def _flower_processes() -> set[int]:
    mine = set(launcher.descendants(os.getpid()))
    return {pid for pid in mine if launcher.alive(pid)}


@pytest.mark.slow
def test_pipeline_trains_both_models_federated_with_per_round_per_client_epsilon(tmp_path):
    # RDP keeps each client's noise calibration cheap; the plumbing is the same for PRV.
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "--out",
        str(tmp_path),
        "--quiet",
        "train.mode=federated",
        "dp.enabled=true",
        "dp.accountant=rdp",
        *TINY,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "complete" for s in manifest["stages"].values())
    for name in ("regressor", "cnn"):
        training = json.loads((run / "models" / f"{name}.json").read_text())["training"]
        assert training["mode"] == "federated" and training["clients"] == 2 and training["strategy"]["name"] == "fedavg"
        assert [h["round"] for h in training["history"]] == [1, 2]
        assert len(training["seconds_per_round"]) == 2 and training["failures"] == []
        eps = training["client_epsilon"]
        assert set(eps) == {"0", "1"}
        for series in eps.values():
            assert len(series) == 2 and 0 < series[0] < series[1] <= 3.0
        assert training["privacy"]["epsilon"] == max(s[-1] for s in eps.values())
        assert sum(training["partition"]["sizes"]) == training["n_train"]
        assert ("label_histograms" in training["partition"]) == (name == "cnn")
        assert training["federation_models"] == ["regressor", "cnn"]  # one federation trained both (issue 12)
    # The server checkpoints and client ledgers reached the run directory (what a resume restores).
    assert "checkpoints/federated/server/cnn.checkpoint.safetensors" in manifest["artifacts"]
    assert "checkpoints/federated/clients/cnn/client-1.json" in manifest["artifacts"]
    assert not _flower_processes()


@pytest.mark.slow
def test_loopback_deployment_with_tls_and_supernode_auth_survives_a_failing_client(tmp_path):
    from auditml_core.config import load_config
    from federated.launch.deploy import deploy

    cfg = load_config(None, [*TINY, "federated.min_clients=1"])
    record = deploy(
        cfg,
        model="cnn",
        work=tmp_path,
        n_supernodes=2,
        tls=True,
        auth=True,
        app_settings={"fail_partition": 0, "fail_round": 2},
    )
    assert record["deployment"] == {**record["deployment"], "supernodes": 2, "tls": True, "supernode_auth": True}
    assert [h["clients_trained"] for h in record["history"]] == [2, 1]
    assert [f["round"] for f in record["failures"]] == [2]
    assert "injected failure of client 0" in record["failures"][0]["reason"]
    assert not _flower_processes()


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment contains ``text`` (a run's unique folder)."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (needle in cmdline or needle in environ) and launcher.alive(int(entry.name)):
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_kill_9_of_the_pipeline_mid_round_leaves_no_flower_process_and_no_training(tmp_path):
    import shutil
    import signal
    import tempfile
    import time

    # The run's unique folder: its work folders live here. Short: Ray's socket paths must fit in 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--stages",
        "data,train",
        "train.mode=federated",
        *[o for o in TINY if not o.startswith("federated.rounds")],
        "federated.rounds=30",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}  # as a user runs it
    env.update({"TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)})
    err_path = tmp_path / "pipeline.err"  # a file, not a pipe: a full pipe would stall the pipeline
    pipeline = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_path.open("wb"))
    try:
        deadline = time.monotonic() + 300
        # a round has completed: the server wrote its checkpoint into the run directory (issue 25)
        while not list((tmp_path / "out").glob("*/checkpoints/federated/server/*.checkpoint.safetensors")):
            assert pipeline.poll() is None, err_path.read_text()[-6000:]
            assert time.monotonic() < deadline, "no federated round completed within 300 s"
            time.sleep(0.2)
        assert _processes_mentioning(str(tmp))  # Flower and Ray are running now
        os.kill(pipeline.pid, signal.SIGKILL)
        pipeline.wait(timeout=10)
        t_kill = time.monotonic()
        while _processes_mentioning(str(tmp)) and time.monotonic() - t_kill < 10:
            time.sleep(0.1)
        left = _processes_mentioning(str(tmp))
        assert not left, f"processes of the killed run still alive {time.monotonic() - t_kill:.1f} s later: {left}"
        print(f"every process of the run gone {time.monotonic() - t_kill:.2f} s after kill -9")
        # The watchdog deletes the run's scratch folder (weights and ledgers trained on private data).
        while list(tmp.glob("flwr-*")) and time.monotonic() - t_kill < 20:
            time.sleep(0.2)
        assert not list(tmp.glob("flwr-*")), "the killed run's work folder (private-data weights) was left behind"
        before = _files(tmp)
        time.sleep(5)
        assert _files(tmp) == before, "files of the killed run changed after the kill: training went on"
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
        for pid, _ in _processes_mentioning(str(tmp)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


# --- issue 14: secure aggregation and user-level DP through the real launches -----------------------------------

BOTH = [  # SecAgg+ (>= 3 clients) with user-level DP-FedAvg, server-side noise
    "federated.n_clients=3",
    "federated.secure_aggregation=true",
    "client_dp.enabled=true",
    "client_dp.target_epsilon=20",
    "client_dp.delta=1e-4",
]


def _dp_accounting_epsilon(sigma: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` (Poisson-subsampled) Gaussian rounds by Google's dp-accounting RDP, not by Opacus."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.GaussianDpEvent(sigma)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def _check_secagg_user_dp_record(training: dict, *, completed: list[int], dropped: list[int], q: float) -> None:
    """What a SecAgg+ + DP-FedAvg record must say: the protocol ran each round, ε is the accountant's, the model moved."""
    rounds = training["secure_aggregation"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["unmasked"] for r in rounds)
    assert [r["clients_completed"] for r in rounds] == completed and [r["clients_dropped"] for r in rounds] == dropped
    assert training["secure_aggregation"]["max_weight"] == 1.0  # uniform weights: uploads are clipped updates
    dp_rounds = [training["user_dp_rounds"][r] for r in ("1", "2")]
    assert [d["survivors"] for d in dp_rounds] == completed  # every client uploads (a zero update when not sampled)
    assert all(0 <= d["aggregated"] <= min(d["sampled"], d["survivors"]) for d in dp_rounds)
    if q == 1:
        assert [d["aggregated"] for d in dp_rounds] == completed
    user = training["user_level_privacy"]
    assert user["accountant_history"] == [[user["noise_multiplier"], q, 2]] and user["completed_rounds"] == 2
    assert np.isfinite(user["epsilon"]) and 0 < user["epsilon"] <= user["target_epsilon"] == 20
    sigma, rate, rounds_done = user["accountant_history"][0]
    independent = _dp_accounting_epsilon(sigma, rate, rounds_done, user["delta_accountant"])
    assert abs(user["epsilon"] - independent) <= 1e-3 * independent, (user["epsilon"], independent)
    assert user["independent_check"]["agrees"] and user["noise_placement"] == "server"
    # every surviving client reported whether the Poisson sample chose it and whether its update was clipped to C
    entries = [c for r in training["client_rounds"] for c in r["trained"]]
    assert all(c["dp-sampled"] in (0, 1) and c["dp-clipped"] in (0, 1) for c in entries)
    assert [sum(c["dp-sampled"] for c in r["trained"]) for r in training["client_rounds"]] == [
        d["aggregated"] for d in dp_rounds
    ]
    # the released model moved: each round's validation loss differs from the initial model's
    assert all(h["val_loss"] != training["initial_metrics"]["val_loss"] for h in training["history"])


@pytest.mark.slow
def test_pipeline_simulation_runs_secure_aggregation_with_user_level_dp(tmp_path):
    from auditml_core.config import load_config
    from pipeline import train as train_stage
    from pipeline.report.privacy_federated import federated_privacy

    overrides = [
        *[o for o in TINY if not o.startswith("federated.n_clients")],
        *BOTH,
        "client_dp.sample_rate=0.7",  # Poisson client sampling: the unsampled upload a zero update through SecAgg+
        "train.mode=federated",
    ]
    cmd = [sys.executable, "-m", "pipeline", "--out", str(tmp_path), "--quiet", "--stages", "data,train", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(tmp_path.iterdir())
    for name in ("regressor", "cnn"):
        training = json.loads((run / "models" / f"{name}.json").read_text())["training"]
        _check_secagg_user_dp_record(training, completed=[3, 3], dropped=[0, 0], q=0.7)
    # The report's federated privacy section, read against these records.
    trained = train_stage.load(lambda rel: (run / rel).read_bytes())
    off = {"enabled": False, "statement": "No formal privacy guarantee.", "models": {}, "not_covered": []}
    section = federated_privacy(off, load_config(None, overrides), trained)
    threat = " ".join(section["federated"]["threat_model"])
    assert "the server learns only the sum of the clipped model updates" in threat
    assert "each client clips its own update" in threat and "does NOT protect a client from the server" in threat
    assert "weighted average" not in threat  # what SecAgg+ says without DP would be false here
    levels = {(lv["model"], lv["level"]): lv for lv in section["federated"]["levels"]}
    assert set(levels) == {("regressor", "user"), ("cnn", "user")}  # sample-level DP is off: no sample level
    for (name, _), lv in levels.items():
        assert lv["epsilon"] == trained.models[name].training["user_level_privacy"]["epsilon"]
        assert lv["unit_of_privacy"].startswith("a whole client's data")
    assert "un-noised aggregate" in section["statement"] and section["enabled"]
    assert not _flower_processes()


@pytest.mark.slow
def test_loopback_deployment_runs_secure_aggregation_with_user_level_dp_through_a_dropout(tmp_path):
    from auditml_core.config import load_config
    from federated.launch.deploy import deploy

    overrides = [
        *[o for o in TINY if not o.startswith("federated.n_clients")],
        *BOTH,
        "federated.min_clients=2",
    ]
    # client 0 fails in round 2 after the key exchange: SecAgg+ removes its masks (2 of 3 >= threshold 2)
    record = deploy(
        load_config(None, overrides),
        model="cnn",
        work=tmp_path,
        n_supernodes=3,
        app_settings={"fail_partition": 0, "fail_round": 2},
    )
    _check_secagg_user_dp_record(record, completed=[3, 2], dropped=[0, 1], q=1.0)
    assert [f["round"] for f in record["failures"]] == [2]
    assert not _flower_processes()


@pytest.mark.slow
def test_a_dp_federated_run_killed_mid_round_resumes_and_completes_within_budget(tmp_path):
    """Issue 25 item 1: kill -9 of the pipeline while round >= 4 trains under DP, then `--run-dir` resumes it.

    Before: the run directory's server checkpoint was a polled copy a round behind, every client trained the
    killed round again, and (σ planned to land on the budget after the last round) all refused the last
    round: the run could never finish. Now the server's checkpoint is in the run directory, the resume
    starts right after the last completed round, and a client re-runs the round it reserved but never
    released under that reservation."""
    import shutil
    import signal
    import tempfile
    import time

    from auditml_core.privacy.dp_sgd import epsilon_of

    rounds, target = 6, 3.0
    tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    out = tmp_path / "out"
    base = [sys.executable, "-m", "pipeline", "--quiet"]
    settings = [
        *("train.mode=federated", "dp.enabled=true", "dp.accountant=rdp", f"dp.target_epsilon={target}"),
        *("federated.n_clients=3", "federated.min_clients=1", f"federated.rounds={rounds}"),
        # 200 local epochs keep a regressor client training well past the ~0.2 s its processes outlive a kill -9
        # (the watchdog's poll): the kill lands while one trains and it dies before it finishes. At 40 epochs, on
        # a fast machine, clients finished their round after the kill in 4 of 10 runs (ledgers written
        # 0.10-0.21 s after it); the CNN's 4 epochs keep the test's time as it was (~45 s)
        *("regressor.federated.local_epochs=200", "cnn.federated.local_epochs=4"),
        *("regressor.hidden_sizes=[8]", "cnn.channels=[4]", "cnn.hidden=8"),
        "cnn.dp_fit.batch_size=64",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({"TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)})
    err = tmp_path / "first.err"
    first = subprocess.Popen(
        [*base, "--out", str(out), "--stages", "data,train", *settings],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err.open("wb"),
    )

    def ledgers() -> dict[str, dict]:
        found = {}
        for p in out.glob("*/checkpoints/federated/clients/regressor/client-*.json"):
            try:
                found[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # being replaced
        return found

    try:
        deadline = time.monotonic() + 400
        while not any(
            (led.get("reserved_round") or 0) >= 4 and led["reserved_round"] not in led["rounds_trained"]
            for led in ledgers().values()
        ):
            assert first.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, "no client reserved round 4 within 400 s"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)  # mid-round: a client has reserved its round and is training
        first.wait(timeout=10)
        t_kill = time.monotonic()
        while _processes_mentioning(str(tmp)) and time.monotonic() - t_kill < 20:
            time.sleep(0.2)
        assert not _processes_mentioning(str(tmp))
        # Read once every process is gone: a client still alive a moment after the kill can release its round
        # (seen on a fast machine: its ledger then says "trained", and the resume replays its stored result).
        killed = ledgers()
    finally:
        if first.poll() is None:
            first.kill()
    (run,) = out.iterdir()
    killed_round = max(led["reserved_round"] or 0 for led in killed.values())
    mid_round = [
        c for c, led in killed.items() if led["reserved_round"] and led["reserved_round"] not in led["rounds_trained"]
    ]
    assert mid_round and killed_round >= 4
    t0 = time.monotonic()
    resumed = subprocess.run(
        [*base, "--run-dir", str(run), "--stages", "train"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"killed in round {killed_round} ({mid_round} mid-round); resume took {time.monotonic() - t0:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "complete"
    training = json.loads((run / "models" / "regressor.json").read_text())["training"]
    # The resume started right after the last completed round (the checkpoint did not lag).
    assert training["resumed_from_round"] == [killed_round - 1] and training["completed_rounds"] == rounds
    # Every client trained every round and spent each round once, within budget by its own ledger: the ones
    # killed mid-round re-ran the killed round under their reservation; one that had already released its
    # result for it sent that result again (client_rounds says "replayed").
    assert [h["clients_trained"] for h in training["history"]] == [3] * rounds and training["failures"] == []
    for client, led in ledgers().items():
        eps = epsilon_of([tuple(h) for h in led["accountant_history"]], delta=1e-5, accountant="rdp")
        assert eps <= target + 1e-9, (client, eps)
        assert led["rounds_trained"] == list(range(1, rounds + 1)), (client, led["rounds_trained"])
        # one round's spend, from the ledger at the kill: its steps over the rounds it counted (a reservation too)
        spent, before = killed[client]["accountant_history"], killed[client]["rounds_trained"]
        counted = len(before) + (1 if killed[client]["reserved_round"] not in (None, *before) else 0)
        assert sum(n for _, _, n in led["accountant_history"]) * counted == sum(n for _, _, n in spent) * rounds
    resumed_round = training["client_rounds"][killed_round - 1]
    replayed = sorted(f"client-{int(c['partition-id'])}" for c in resumed_round["trained"] if c["replayed"])
    assert replayed == sorted(c for c, led in killed.items() if killed_round in led["rounds_trained"])
    assert training["privacy"]["epsilon"] <= target
    assert json.loads((run / "models" / "cnn.json").read_text())["training"]["completed_rounds"] == rounds
    assert not _flower_processes()
