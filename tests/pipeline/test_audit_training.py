"""The audit's models train concurrently (one thread each) exactly as they would one after the other."""

import os
import threading
import time

import numpy as np
import pytest
import torch

from auditml_core import config as config_mod
from auditml_core.config import load_config
from pipeline import audit, audit_training, runner, stage_workers
from pipeline.rundir import RunDir
from tests.tiny import AUDIT, TRAIN


def _trained(tmp_path, overrides):
    cfg = load_config(None, overrides)
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    outputs = runner.run_stages(cfg, run, ["data", "train"])
    return cfg, outputs


def _audit_cnn(cfg, outputs):
    return audit.audit_model(
        cfg, "cnn", outputs["data"]["images"], outputs["train"].models["cnn"], seed=7, device=torch.device("cpu")
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],  # LiRA shadows, the overfit control and its shadows
        # DP (noise seeded from the run seed, so that two runs can be compared): shadow 0 carries the canaries,
        # the noise mutant carries its own. Slow tier: ~16 s on a loaded machine (DP training and planning).
        pytest.param(
            ["dp.enabled=true", "dp.target_epsilon=3", "dp.reproducible_noise=true", "audit.canaries=40"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["non-dp", "dp"],
)
def test_concurrent_trainings_give_the_sequential_results(tmp_path, monkeypatch, extra):
    cfg, outputs = _trained(tmp_path, TRAIN + AUDIT + extra)
    monkeypatch.setattr(audit_training, "concurrent_trainings", lambda device: 2)  # two at once, on any machine
    together = _audit_cnn(cfg, outputs)
    monkeypatch.setattr(audit_training, "concurrent_trainings", lambda device: 1)
    alone = _audit_cnn(cfg, outputs)
    assert set(together["scores"]) == set(alone["scores"])
    for key, value in alone["scores"].items():
        np.testing.assert_array_equal(together["scores"][key], value, err_msg=key)
    strip = {"seconds"}
    assert {k: v for k, v in together["record"].items() if k not in strip} == {
        k: v for k, v in alone["record"].items() if k not in strip
    }


def test_concurrent_trainings_counts_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(audit_training.torch, "get_num_threads", lambda: 2)
    assert audit_training.concurrent_trainings(torch.device("cpu")) == 2
    assert audit_training.concurrent_trainings(torch.device("cuda")) == 1
    monkeypatch.setattr(stage_workers, "_share", 2)  # in a stage worker: its share of the CPUs, not all of them
    assert audit_training.concurrent_trainings(torch.device("cpu")) == 1
    monkeypatch.setattr(stage_workers, "_share", None)
    monkeypatch.setattr(audit_training.torch, "get_num_threads", lambda: 8)
    assert audit_training.concurrent_trainings(torch.device("cpu")) == 1  # never 0


def test_a_failing_training_is_raised_in_the_caller_after_the_others_stop(monkeypatch):
    monkeypatch.setattr(audit_training, "concurrent_trainings", lambda device: 2)  # the threaded path on any machine
    started, finished = [], []
    failed = threading.Event()

    def ok(i):
        started.append(i)
        time.sleep(0.2)  # still running when the other thread's job fails
        finished.append(i)
        return i

    def boom():
        started.append(1)
        failed.set()
        raise RuntimeError("training diverged")

    jobs = [lambda: ok(0), boom, lambda: ok(2), lambda: ok(3)]
    with pytest.raises(RuntimeError, match="training diverged"):
        audit_training.run_concurrently(jobs, device=torch.device("cpu"))
    assert failed.is_set()
    assert finished == [0] and sorted(started) == [0, 1]  # job 0 ran to its end first; no job started after the failure
    assert audit_training.run_concurrently([lambda i=i: i * i for i in range(5)], device=torch.device("cpu")) == [
        0,
        1,
        4,
        9,
        16,
    ]
