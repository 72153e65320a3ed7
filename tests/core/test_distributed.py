"""Training across ranks (auditml_core.distributed, auditml_core.privacy.dp_ranks) against one process.

The slow tests start real ranks with torch's launcher (gloo, 2 processes on this machine) running
tests/core/dist_probe.py, and compare with the same probe run as one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auditml_core import distributed
from auditml_core.privacy import dp_ranks
from auditml_core.privacy import dp_sgd as privacy

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("dist_probe.py")
ENGINES = ("bk", "ghost", "hooks", "functorch", "ew")


def _probe(out_dir: Path, mode: str, *, processes: int, engines: str = "bk") -> dict:
    out = out_dir / f"{mode}-{processes}.json"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*launcher, str(PROBE), mode, str(out), engines], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noise")
    engines = ",".join(ENGINES)
    return _probe(tmp, "noise", processes=1, engines=engines), _probe(tmp, "noise", processes=2, engines=engines)


# --------------------------------------------------------------------------- no processes


def test_shards_are_disjoint_and_cover_every_record():
    for size in (1, 2, 3, 7):
        parts = [dp_ranks.shard(23, distributed.World(rank=r, size=size, local_rank=r)) for r in range(size)]
        flat = torch.cat(parts)
        assert sorted(flat.tolist()) == list(range(23))  # every record in exactly one shard
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_a_global_batch_is_shared_in_contiguous_parts():
    batch = torch.arange(10, 17)  # 7 rows over 2 ranks: 4 + 3
    shares = [distributed.share(batch, distributed.World(rank=r, size=2, local_rank=r)) for r in range(2)]
    assert [s.tolist() for s in shares] == [[10, 11, 12, 13], [14, 15, 16]]


def test_the_expected_batch_is_the_single_process_one():
    # Opacus: expected_batch_size = int(len(dataset) * sample_rate) for the whole dataset.
    n, batch = 1078, 256
    q = 1.0 / privacy.steps_per_epoch(n, batch)
    assert dp_ranks.expected_batch_size(n, q) == int(n * q) == 215


def test_a_lost_rank_on_this_host_is_named():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    world = distributed.World(
        rank=0,
        size=3,
        local_rank=0,
        peers={0: (socket.gethostname(), os.getpid()), 1: (socket.gethostname(), dead.pid)},
    )
    message = world.lost_message(
        "the gradient sum",
        RuntimeError(
            "[/__w/pytorch/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:5518. This is typically caused by a remote"
        ),
    )
    assert f"rank 1 (pid {dead.pid}) died (Connection closed by peer" in message and "rank 0 (pid" not in message
    assert "resume with --run-dir" in message and "\n" not in message


# --------------------------------------------------------------------------- ranks (gloo)


@pytest.mark.slow
def test_non_dp_steps_across_two_ranks_equal_one_process(tmp_path):
    one = _probe(tmp_path, "steps", processes=1)["ranks"][0]
    two = _probe(tmp_path, "steps", processes=2)
    ranks = two["ranks"]
    assert two["world_size"] == 2
    initial = np.array(one["initial"])
    for key in ("first_step", "epoch"):
        reference = np.array(one[key])
        assert np.abs(reference - initial).max() > 1e-3  # training moved the weights
        for rank in ranks:  # the same global batches, shared 16 + 16 and 4 + 3 rows: the same weights
            assert np.abs(np.array(rank[key]) - reference).max() < 1e-5
    # Positive control: averaging the two ranks' mean gradients with equal weights (wrong for a 4 + 3 share)
    # must be caught by the same tolerance.
    assert np.abs(np.array(ranks[0]["epoch_unweighted"]) - np.array(one["epoch"])).max() > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_noise_of_the_aggregated_gradient_is_sigma_c_over_b(noise_runs, engine):
    _, two = noise_runs
    rank0, rank1 = (r[engine] for r in two["ranks"])
    grads = np.array(rank0["grads"])  # 40 steps x 650 coordinates, zero clipped sums in
    target = rank0["sigma"] * rank0["max_grad_norm"] / rank0["expected_batch"]  # σC/B, B global (100)
    assert rank0["expected_batch"] == 100
    assert abs(grads.std() / target - 1) < 0.03
    assert abs(grads.mean()) < 4 * target / np.sqrt(grads.size)
    assert np.array_equal(grads, np.array(rank1["grads"]))  # both ranks release the same all-reduced step
    # Positive control: each rank adding its own noise gives std √2·σC/B, which the 3 % check must refuse.
    control = np.array(rank0["grads_noise_on_every_rank"]).std() / target
    assert abs(control - np.sqrt(2)) < 0.05 and abs(control - 1) > 0.03
    assert rank0["accountant_steps"] == 80  # every step counted once, at the global rate


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_clipped_mean_across_two_ranks_equals_one_process(noise_runs, engine):
    one, two = noise_runs
    reference = np.array(one["ranks"][0][engine]["clipped_mean"])
    assert np.abs(reference).max() > 1e-3
    for rank in two["ranks"]:
        assert np.abs(np.array(rank[engine]["clipped_mean"]) - reference).max() < 1e-6


@pytest.mark.slow
def test_each_record_enters_at_most_one_ranks_batch(tmp_path):
    two = _probe(tmp_path, "sampling", processes=2, engines="bk,ghost")
    for engine in ("bk", "ghost"):
        rank0, rank1 = (r[engine] for r in two["ranks"])
        assert len(rank0["batches"]) == len(rank1["batches"]) == 30  # 3 epochs x ceil(400 / 40), empties included
        for step, (a, b) in enumerate(zip(rank0["batches"], rank1["batches"])):
            assert not set(a) & set(b), f"step {step}: records in both ranks' batches"
            assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)  # each rank samples its own shard
        # Each record enters the global batch with probability q = 0.1: 12,000 Bernoulli trials.
        counts = np.bincount([i for batch in rank0["batches"] + rank1["batches"] for i in batch], minlength=400)
        rate = counts.sum() / (400 * 30)
        assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 12_000)
        record = rank0["privacy"]
        assert record["world_size"] == 2 and record["sample_rate"] == 0.1 and record["total_steps"] == 30
        # ε is the single-process ε of the same plan (σ planned for 400 records, batch 40, 3 epochs).
        from auditml_core.config import DPConfig

        plan = privacy.plan(
            DPConfig(enabled=True, target_epsilon=50.0), n_samples=400, batch_size=40, max_grad_norm=1.0, epochs=3
        )
        assert record["noise_multiplier"] == plan.noise_multiplier
        assert abs(record["epsilon"] - plan.planned_epsilon) < 1e-6
    # Positive control of the checker: two single-process Poisson draws over all records do overlap.
    gen = torch.Generator().manual_seed(0)
    a, b = (set(torch.nonzero(torch.rand(400, generator=gen) < 0.1).flatten().tolist()) for _ in range(2))
    assert a & b


def test_a_resume_with_another_number_of_ranks_is_refused_under_reproducible_noise():
    from auditml_core import training
    from auditml_core.config import DPConfig, FitConfig
    from auditml_core.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    resume = training.Checkpoint(
        epoch=1,
        model={},
        optimizer={},
        accountant_history=[],
        history=[],
        generator_state=torch.Generator().get_state(),
        dp_generator_states=[torch.Generator().get_state()] * 2,  # one rank's pair
    )
    with pytest.raises(ConfigError, match="states of 1 rank\\(s\\), this run has 2"):
        training._make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.zeros(10, 3),
            torch.zeros(10, dtype=torch.long),
            dp=DPConfig(enabled=True, target_epsilon=50.0, reproducible_noise=True),
            fit_cfg=FitConfig(batch_size=5),
            epochs=1,
            total_epochs=1,
            history=[],
            seed=0,
            resume=resume,
            criterion=torch.nn.CrossEntropyLoss(),
            n_records=20,
            world=distributed.World(rank=1, size=2, local_rank=1),
        )


@pytest.mark.slow
def test_reproducible_noise_across_ranks_replays_and_gives_each_rank_its_own_stream(tmp_path):
    two = _probe(tmp_path, "reproducible", processes=2)
    rank0, rank1 = two["ranks"]
    for rank in (rank0, rank1):
        assert rank["first"]["positions"] == rank["second"]["positions"]  # the same seed replays the sampling
        assert rank["first"]["weights"] == rank["second"]["weights"]  # and the noise
    # Not in lockstep: the ranks' streams differ (the same stream would pick the same shard positions).
    assert rank0["first"]["positions"] != rank1["first"]["positions"]
    assert rank0["first"]["checkpoint_states"] == [4, 4]  # every rank's (sampling, noise) pair, in each checkpoint
