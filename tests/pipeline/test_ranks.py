"""``python -m pipeline train.processes=N`` and torchrun across "hosts": rank 0 writes, the others train with it.

The slow tests start real ranks (gloo on this machine) as a user would and compare with one process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from auditml_core.config import load_config
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
    assert acc[0] > 0.8  # it learned: a test that could not tell a broken training from a working one asserts nothing
    assert abs(acc[0] - acc[1]) <= 0.005
