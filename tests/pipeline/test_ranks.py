"""``python -m pipeline train.processes=N`` and torchrun across "hosts": rank 0 writes, the others train with it.

The slow tests start real ranks (gloo on this machine) as a user would and compare with one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from auditml_core import allocator, models
from auditml_core.config import load_config
from auditml_core.distributed import World
from auditml_core.errors import ConfigError
from pipeline import ranks
from tests.tiny import TRAIN

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def run_dir(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(re.search(r"^run directory: (.+)$", proc.stdout, re.M).group(1))


def training_record(run: Path, model: str) -> dict:
    return json.loads((run / "models" / f"{model}.json").read_text())["training"]


# --------------------------------------------------------------------------- no processes


def test_processes_are_validated():
    assert load_config(None, ["train.processes=4"]).train.processes == 4
    with pytest.raises(ConfigError, match=r"train.processes.*\[1, 256\]"):
        load_config(None, ["train.processes=0"])
    with pytest.raises(ConfigError, match="train.processes=2 is for central training"):
        load_config(None, ["train.processes=2", "train.mode='federated'"])


def _failure(exitcode: int, pid: int, ts: float) -> SimpleNamespace:
    return SimpleNamespace(
        exitcode=exitcode, pid=pid, timestamp=ts, signal_name=lambda: "SIGKILL" if exitcode == -9 else "SIGTERM"
    )


def test_the_launcher_names_the_rank_that_died():
    failures = {1: _failure(-9, 4242, 1.0), 0: _failure(-15, 4241, 2.0)}
    exc = SimpleNamespace(failures=failures, get_first_failure=lambda: (1, failures[1]))
    message, code = ranks.failure_message(exc, run_dir="runs/x")
    assert message == (
        "rank 1 (pid 4242) was killed by SIGKILL; ranks 0 were stopped; resume with: python -m pipeline --run-dir runs/x"
    )
    assert code == 1
    # Rank 0's own user error (exit code 2) was printed by rank 0 in one line: nothing is added.
    failures = {0: _failure(2, 4241, 1.0)}
    exc = SimpleNamespace(failures=failures, get_first_failure=lambda: (0, failures[0]))
    assert ranks.failure_message(exc, run_dir="") == ("", 2)


def test_more_ranks_than_gpus_is_refused_before_anything_is_sent(monkeypatch):
    class NoCollective:
        def broadcast(self, obj=None):
            raise AssertionError("nothing may be sent")

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    order = ranks.Order(
        name="cnn",
        spec={},
        initial_state={},
        task="classification",
        fit_cfg=load_config().cnn.fit,
        dp=load_config().dp,
        device_type="cuda",
        seed=0,
        patience=0,
        resume=None,
    )
    with pytest.raises(ConfigError, match="2 ranks on this host but 1 CUDA device"):
        ranks.Followers(NoCollective()).train(order, x_train=None, y_train=None)


def test_a_follower_trains_with_rank_0s_process_settings(monkeypatch):
    """Rank 0 sets its torch threads and glibc's malloc thresholds (resolve_device); a follower set only the threads,
    so its steps came back to fresh pages and it set the pace of both ranks (bench_scale --processes 1,2: non-DP
    efficiency 0.58 -> 0.80). Here a follower's training must ask for the thresholds; the control is the old
    follower, which set the threads alone and must fail."""
    cfg = load_config()
    spec = {"kind": "regressor", "kwargs": {"n_features": 3, "hidden_sizes": [4]}}
    order = ranks.Order(
        name="regressor",
        spec=spec,
        initial_state=models.build(spec).state_dict(),
        task="regression",
        fit_cfg=dataclasses.replace(cfg.regressor.fit, epochs=1),
        dp=dataclasses.replace(cfg.dp, enabled=False),
        device_type="cpu",
        seed=0,
        patience=0,
        resume=None,
    )
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(16, 3)).astype(np.float32), "y": rng.normal(size=16).astype(np.float32)}
    world = World(rank=1, size=1, local_rank=0)  # a world of one: fit's collectives are skipped

    def settings_asked(train) -> int:
        asked: list[int] = []
        monkeypatch.setattr(allocator, "_done", None)
        monkeypatch.setattr(allocator, "_set_thresholds", lambda: asked.append(1) or True)
        threads = torch.get_num_threads()
        try:
            train(world, order, arrays)
        finally:
            torch.set_num_threads(threads)
        return len(asked)

    assert settings_asked(ranks._train) == 1

    def old_train(world, order, arrays):  # the control: threads only
        torch.set_num_threads(order.num_threads)
        model = models.build(order.spec)
        model.load_state_dict(dict(order.initial_state))

    assert settings_asked(old_train) == 0


# --------------------------------------------------------------------------- ranks


@pytest.mark.slow
def test_two_process_dp_training_is_accounted_once(tmp_path):
    dp = ["dp.enabled=true", *TRAIN, "--stages", "data,train", "--quiet"]
    two = run_dir(cli("train.processes=2", *dp, "--out", str(tmp_path / "two")))
    one = run_dir(cli(*dp, "--out", str(tmp_path / "one")))
    for model in ("regressor", "cnn"):
        rec2, rec1 = training_record(two, model), training_record(one, model)
        assert rec2["world_size"] == 2 and rec1["world_size"] == 1
        p2, p1 = rec2["privacy"], rec1["privacy"]
        assert p2["world_size"] == 2
        for key in ("noise_multiplier", "sample_rate", "steps", "total_steps", "max_grad_norm", "grad_sample_mode"):
            assert p2[key] == p1[key], key
        assert abs(p2["epsilon"] - p1["epsilon"]) < 1e-6
        assert 0 < p2["epsilon"] <= p2["target_epsilon"]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["invocations"][-1]["world_size"] == 2
    assert [p.name for p in (tmp_path / "two").iterdir()] == [two.name]  # one run directory: rank 0's
    check = cli("verify", str(two))  # every artifact matches (the later stages were not asked for: exit 3)
    assert check.returncode == 3 and "artifacts match the manifest" in check.stderr, check.stdout + check.stderr


@pytest.mark.slow
def test_two_process_non_dp_training_reaches_the_one_process_accuracy(tmp_path):
    args = [
        "regressor.hidden_sizes=[8]",
        "regressor.fit.epochs=20",
        "cnn.channels=[8]",
        "cnn.hidden=16",
        "cnn.fit.epochs=15",
        "--stages",
        "data,train,evaluate",
        "--quiet",
    ]
    two = run_dir(cli("train.processes=2", *args, "--out", str(tmp_path / "two")))
    one = run_dir(cli(*args, "--out", str(tmp_path / "one")))
    acc = [json.loads((r / "metrics" / "evaluation.json").read_text())["cnn"]["test"]["accuracy"] for r in (one, two)]
    print(f"CNN test accuracy: 1 process {acc[0]:.4f}, 2 processes {acc[1]:.4f}")
    assert acc[0] > 0.8  # it learned: a test that could not tell a broken training from a working one asserts nothing
    assert abs(acc[0] - acc[1]) <= 0.005


# --------------------------------------------------------------------------- faults across ranks

JOB_MARKER = "AUDITML_TEST_JOB"  # environment variable every process of one test's job inherits


def _job_pids(marker: str) -> list[int]:
    """Live processes whose environment carries this test job's marker (launchers and ranks)."""
    want = f"{JOB_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if want in environ and state != "Z":
            found.append(int(entry.name))
    return found


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of rank ``rank`` of the job (a process whose environment says RANK=rank)."""
    for pid in _job_pids(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ):
            return pid
    return None


def _kill_job(marker: str) -> None:
    for pid in _job_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for_checkpoint(out: Path, procs: list[subprocess.Popen], timeout_s: float = 600) -> Path:
    """The run directory under ``out`` once rank 0 has written a training checkpoint in it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(out.glob("*/checkpoints/*.pt"))
        if found:
            return found[0].parent.parent
        assert all(p.poll() is None for p in procs), "the job ended before its first checkpoint"
        time.sleep(0.1)
    raise AssertionError("no training checkpoint within the time limit")


def _gone_within(marker: str, t0: float, limit_s: float) -> float:
    """Seconds from ``t0`` until no process of the job is left (fails after ``limit_s``)."""
    while _job_pids(marker):
        assert time.monotonic() - t0 < limit_s, f"processes of the job still alive: {_job_pids(marker)}"
        time.sleep(0.1)
    return time.monotonic() - t0


# Long enough to be killed mid-training on a loaded machine; checkpoints after every epoch.
FAULT_TRAINING = [*TRAIN, "regressor.dp_fit.epochs=40", "cnn.dp_fit.epochs=20", "train.checkpoint_every_s=0"]


def _env(marker: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", JOB_MARKER: marker, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_9_of_rank_0_stops_every_rank_names_it_and_resumes(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "pipeline", "train.processes=2", "dp.enabled=true", *FAULT_TRAINING]
    launcher = subprocess.Popen(
        [*argv, "--stages", "data,train", "--quiet", "--out", str(out)],
        cwd=ROOT,
        env=_env(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        run = _wait_for_checkpoint(out, [launcher])
        victim = _rank_pid(marker, 0)
        assert victim is not None
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
        assert launcher.returncode == 1
        assert f"error: rank 0 (pid {victim}) was killed by SIGKILL; ranks 1 were stopped; resume with: " in stderr
        assert f"python -m pipeline --run-dir {run}" in stderr
        gone = _gone_within(marker, t_kill, 20.0)
        assert json.loads((run / "manifest.json").read_text())["stages"]["train"]["status"] != "complete"
        # The resume: the run directory's config says train.processes=2, so it starts two ranks again.
        resumed = cli("--run-dir", str(run), "--stages", "train", "--quiet")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        records = {m: training_record(run, m) for m in ("regressor", "cnn")}
        assert max(r["resumed_from_epoch"] for r in records.values()) > 0
        for model, rec in records.items():
            assert rec["world_size"] == 2 and rec["privacy"]["world_size"] == 2
            epochs = 40 if model == "regressor" else 20
            # every step of the whole planned training is counted once, the ones before the kill included
            assert rec["privacy"]["total_steps"] == round(1 / rec["privacy"]["sample_rate"]) * epochs
            assert rec["privacy"]["epsilon"] <= rec["privacy"]["target_epsilon"]
        print(f"no process left {gone:.1f} s after the kill")
    finally:
        _kill_job(marker)
        if launcher.poll() is None:
            launcher.kill()


def readme_command(prefix: str) -> str:
    """The README's command that starts with ``prefix`` (its "More than one machine" section), joined."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            if line.startswith(prefix):
                return line.partition(" #")[0].strip()
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


def _hosts(command: str, extra: list[str], *, marker: str, port: int, logs: Path) -> list[subprocess.Popen]:
    """Two "hosts" on loopback: the README's torchrun command started twice, each in a folder of its own."""
    words = command.replace("HOST:PORT", f"127.0.0.1:{port}").split()
    words[0] = str(Path(sys.executable).with_name("torchrun"))
    procs = []
    for host in range(2):
        folder = logs / f"host{host}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "log.txt").open("w") as log_file:
            procs.append(
                subprocess.Popen(
                    [*words, *extra],
                    cwd=ROOT,
                    env=_env(marker),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


@pytest.mark.slow
def test_two_hosts_on_loopback_kill_9_and_resume(tmp_path):
    """The README's torchrun command on two "hosts" (two launchers, --nnodes 2, c10d on 127.0.0.1): kill -9 of
    rank 1 mid-training stops both hosts' processes within 20 s, each host's error names the dead rank, and
    the same two commands with --run-dir resume and complete."""
    from federated.launch.processes import free_port

    command = readme_command("torchrun ")
    assert "--nnodes 2" in command and "--rdzv-backend c10d" in command and "HOST:PORT" in command
    marker, out = uuid.uuid4().hex, tmp_path / "runs"
    hosts = _hosts(
        command,
        [*FAULT_TRAINING, "--stages", "data,train", "--quiet", "--out", str(out)],
        marker=marker,
        port=free_port(),
        logs=tmp_path / "first",
    )
    try:
        run = _wait_for_checkpoint(out, hosts)
        victim = _rank_pid(marker, 1)
        assert victim is not None
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        codes = [h.wait(timeout=120) for h in hosts]
        assert all(code != 0 for code in codes), codes
        gone = _gone_within(marker, t_kill, 20.0)
        logs = [(tmp_path / "first" / f"host{i}" / "log.txt").read_text() for i in range(2)]
        # rank 0's host: the collective failed and rank 0 names the rank that died (same machine: its pid is known)
        assert any(f"rank 1 (pid {victim}) died" in text for text in logs), logs
        # rank 1's host: torchrun's own report names it
        assert any(re.search(r"rank\s*:\s*1 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*-9", text) for text in logs)
        assert [p.name for p in out.iterdir()] == [run.name]  # one run directory, rank 0's
        # The same command with --run-dir in place of the settings (a run directory keeps its config).
        resume = _hosts(
            command.split(" -m pipeline ")[0] + " -m pipeline",
            ["--run-dir", str(run), "--stages", "train", "--quiet"],
            marker=marker,
            port=free_port(),
            logs=tmp_path / "resume",
        )
        assert [h.wait(timeout=900) for h in resume] == [0, 0], [
            (tmp_path / "resume" / f"host{i}" / "log.txt").read_text()[-3000:] for i in range(2)
        ]
        records = {m: training_record(run, m) for m in ("regressor", "cnn")}
        assert max(r["resumed_from_epoch"] for r in records.values()) > 0
        for model, rec in records.items():
            assert rec["world_size"] == 2
            epochs = 40 if model == "regressor" else 20
            assert rec["privacy"]["total_steps"] == round(1 / rec["privacy"]["sample_rate"]) * epochs
        print(f"no process left {gone:.1f} s after the kill")
    finally:
        _kill_job(marker)


@pytest.mark.slow
def test_kill_9_of_the_launcher_takes_every_rank_with_it(tmp_path):
    """The launcher of train.processes=2 killed with -9 (no finally runs): the ranks' parent-death signal ends them."""
    marker = uuid.uuid4().hex
    out = tmp_path / "runs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train.processes=2", "dp.enabled=true", *FAULT_TRAINING]
        + ["--stages", "data,train", "--quiet", "--out", str(out)],
        cwd=ROOT,
        env=_env(marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(out, [launcher])
        ranks_before = [p for p in _job_pids(marker) if p != launcher.pid]
        assert len(ranks_before) == 2  # the two ranks, children of the launcher
        t_kill = time.monotonic()
        launcher.kill()
        launcher.wait(timeout=30)
        gone = _gone_within(marker, t_kill, 20.0)
        print(f"no rank left {gone:.1f} s after the launcher's kill -9")
    finally:
        _kill_job(marker)


def test_rank_0_of_our_launcher_does_not_repeat_the_launchers_warnings(tmp_path, monkeypatch, caplog):
    """`train.processes=2 dp.target_epsilon=3` warned twice ("has no effect"): once from the launcher, once from
    rank 0 of the job it started. Rank 0 of our launcher stays quiet; rank 0 of a user's own torchrun (no launcher
    of ours to warn) still warns."""
    from pipeline import __main__ as entry

    followers = SimpleNamespace(world=SimpleNamespace(size=2), release=lambda ok: None)
    argv = ["--stages", "data", "dp.target_epsilon=3"]

    def warnings_of_rank_0(out: str) -> int:
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline"):
            assert entry._run([*argv, "--out", str(tmp_path / out)], followers=followers) == 0
        return sum("setting dp.target_epsilon has no effect" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv(ranks.RUN_NOTE, str(tmp_path / "note"))
    assert warnings_of_rank_0("ours") == 0
    monkeypatch.delenv(ranks.RUN_NOTE)
    assert warnings_of_rank_0("torchrun") == 1  # the control
