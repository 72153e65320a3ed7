"""A rank of the distributed-training tests (tests/core/test_distributed.py), started by torch's launcher.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/core/dist_probe.py MODE OUT.json [ENGINES]

Without a launcher (``python tests/core/dist_probe.py MODE OUT.json``) it runs the same code as one
process, the reference. Rank 0 writes ``OUT.json``; nothing is asserted here (the test does that).

Modes:
- ``steps``: non-DP ``fit`` of a small CNN on 71 digits (batch 32: steps of 32, 32 and 7 rows, the last
  shared 4 + 3 on 2 ranks), one epoch, with augmentation; the weights after the first step (the first
  32 digits, one batch) and after the epoch; and, as a positive control, the epoch with the ranks' mean
  gradients averaged with equal weights (wrong for unequal shares).
- ``noise``: for each of the comma-separated ENGINES, its DP optimizer across the ranks, 40 steps on empty batches (zero clipped sums):
  the released gradient of every step on every rank, with σ, C and the global expected batch; then,
  as a positive control, 40 steps with every rank adding noise as if it were rank 0; and one step at
  sample rate 1 without noise, whose released gradient is the clipped mean over all 400 records.
- ``reproducible``: DP ``fit`` under ``dp.reproducible_noise``, twice (module ``reproducible``).
- ``sampling``: DP ``fit`` (each of ENGINES) for 3 epochs on 400 records at q = 1/10, recording the global
  record ids of every rank's batch at every step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from auditml_core import distributed, models, training  # noqa: E402
from auditml_core.config import DPConfig, FitConfig  # noqa: E402
from auditml_core.privacy import dp_ranks  # noqa: E402
from auditml_core.privacy import dp_sgd as privacy  # noqa: E402


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = ((d.images[:n] - 8.0) / 8.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    return x, d.target[:n].astype(np.int64)


def _cnn() -> torch.nn.Module:
    torch.manual_seed(3)
    return models.build_cnn(input_shape=(1, 8, 8), n_classes=10, channels=(4,), hidden=8, activation="tanh")


def _flat(state: dict[str, torch.Tensor]) -> list[float]:
    return torch.cat([v.reshape(-1).double() for v in state.values()]).tolist()


def steps(world: distributed.World | None) -> dict:
    x, y = _digits(71)
    fit_cfg = FitConfig(epochs=1, batch_size=32, lr=1e-2, augment_shift=1)
    out = {"initial": _flat(_cnn().state_dict())}
    plain_weight = distributed.GradientShare.set_batch
    for label, n in (("first_step", 32), ("epoch", 71), ("epoch_unweighted", 71)):
        if label == "epoch_unweighted":  # positive control: plain averaging of the ranks' mean gradients
            distributed.GradientShare.set_batch = lambda self, n_rank, n_batch: setattr(  # type: ignore[method-assign]
                self, "weight", 1.0 / self.world.size
            )
        model = _cnn()
        training.fit(
            model,
            x_train=x[:n],
            y_train=y[:n],
            x_val=None,
            y_val=None,
            task="classification",
            fit_cfg=fit_cfg,
            dp=None,
            device=torch.device("cpu"),
            seed=11,
            world=world,
        )
        out[label] = _flat(model.state_dict())
    distributed.GradientShare.set_batch = plain_weight  # type: ignore[method-assign]
    return out


def _private(world: distributed.World | None, engine: str, *, sigma: float, sample_rate: float):
    """A CNN wrapped by ENGINE's DP optimizer on this rank's shard of 400 digits (SGD, lr 0: weights stay put)."""
    x, y = _digits(400)
    model = _cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    shard = dp_ranks.shard(len(x), world) if world is not None else torch.arange(len(x))
    xs, ys = torch.as_tensor(x)[shard], torch.as_tensor(y)[shard]
    plan = privacy.PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=0.7,
        sample_rate=sample_rate,
        steps=40,
        delta=1e-5,
        target_epsilon=1e9,
        planned_epsilon=0.0,
        accountant="rdp",
        noise_source="os-csprng",
        grad_sample_mode=engine,
    )
    sampling_gen, noise_gen = privacy.dp_generators(DPConfig(), seed=0, noise_device="cpu")
    run = privacy.make_private(
        model,
        optimizer,
        torch.utils.data.TensorDataset(xs, ys),
        plan=plan,
        sampling_generator=sampling_gen,
        noise_generator=noise_gen,
        grad_sample_mode=engine,
        criterion=torch.nn.CrossEntropyLoss(),
    )
    return run, xs, ys, len(x)


def _released(run) -> list[float]:
    return torch.cat([p.grad.reshape(-1) for p in privacy.unwrap(run.model).parameters()]).tolist()


def noise(world: distributed.World | None, engine: str) -> dict:
    run, xs, ys, n_records = _private(world, engine, sigma=1.3, sample_rate=0.25)
    released: dict[str, list[list[float]]] = {"grads": [], "grads_noise_on_every_rank": []}
    for key in released:
        if world is not None:
            # The positive control tells every rank it is rank 0, so that each adds its own noise.
            as_rank = world if key == "grads" else dataclasses.replace(world, rank=0)
            dp_ranks.spread(run.optimizer, world=as_rank, n_records=n_records, sample_rate=0.25)
        for _ in range(40):
            privacy.noise_only_step(run.model, run.optimizer)  # zero clipped sum in: the released gradient is noise
            released[key].append(_released(run))
    steps_counted = sum(n for _, _, n in run.history())
    run.close()
    # The signal: sample rate 1 (every record in the one batch) and no noise: the released gradient is the
    # clipped mean over all 400 records, whichever ranks clipped them.
    run, xs, ys, n_records = _private(world, engine, sigma=0.0, sample_rate=1.0)
    if world is not None:
        dp_ranks.spread(run.optimizer, world=world, n_records=n_records, sample_rate=1.0)
    (batch,) = run.index_batches()
    run.optimizer.zero_grad(set_to_none=True)
    out = run.model(xs[batch])
    (run.criterion or torch.nn.CrossEntropyLoss())(out, ys[batch]).backward()
    run.optimizer.step()
    clipped = _released(run)
    run.close()
    return {
        **released,
        "clipped_mean": clipped,
        "sigma": 1.3,
        "max_grad_norm": 0.7,
        "expected_batch": dp_ranks.expected_batch_size(n_records, 0.25),
        "accountant_steps": steps_counted,
    }


def sampling(world: distributed.World | None, engine: str) -> dict:
    x, y = _digits(400)
    ids = torch.arange(len(x))
    shard = dp_ranks.shard(len(x), world) if world is not None else ids
    drawn: list[list[int]] = []
    original = privacy.PrivateTraining.index_batches

    def recording(self, *, device=None):
        batches = original(self, device=device)
        drawn.extend(shard[b.cpu()].tolist() for b in batches)  # shard position -> global record id
        return batches

    privacy.PrivateTraining.index_batches = recording  # type: ignore[method-assign]
    result = training.fit(
        _cnn(),
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="classification",
        fit_cfg=FitConfig(epochs=3, batch_size=40, lr=1e-2),
        dp=DPConfig(enabled=True, target_epsilon=50.0, grad_sample_mode=engine),
        device=torch.device("cpu"),
        seed=5,
        world=world,
    )
    privacy.PrivateTraining.index_batches = original  # type: ignore[method-assign]
    return {"batches": drawn, "privacy": result.privacy}


def reproducible(world: distributed.World | None) -> dict:
    """DP ``fit`` under ``dp.reproducible_noise``, twice: each rank's local sample positions, the weights, and how
    many generator states rank 0's checkpoints hold."""
    x, y = _digits(400)
    out = {}
    original = privacy.PrivateTraining.index_batches
    for attempt in ("first", "second"):
        positions: list[list[int]] = []
        states: list[int] = []

        def recording(self, *, device=None):
            batches = original(self, device=device)
            positions.extend(b.cpu().tolist() for b in batches)  # positions in this rank's shard
            return batches

        privacy.PrivateTraining.index_batches = recording  # type: ignore[method-assign]
        model = _cnn()
        training.fit(
            model,
            x_train=x,
            y_train=y,
            x_val=None,
            y_val=None,
            task="classification",
            fit_cfg=FitConfig(epochs=2, batch_size=40, lr=1e-2),
            dp=DPConfig(enabled=True, target_epsilon=50.0, reproducible_noise=True),
            device=torch.device("cpu"),
            seed=5,
            world=world,
            on_epoch_end=(lambda ck: states.append(len(ck.dp_generator_states or [])))
            if world is None or world.leader
            else None,
        )
        privacy.PrivateTraining.index_batches = original  # type: ignore[method-assign]
        out[attempt] = {"positions": positions, "weights": _flat(model.state_dict()), "checkpoint_states": states}
    return out


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    engine = sys.argv[3] if len(sys.argv) > 3 else "bk"
    torch.set_num_threads(1)
    world = distributed.join() if distributed.launched() else None
    if mode == "steps":
        result = steps(world)
    elif mode == "noise":
        result = {name: noise(world, name) for name in engine.split(",")}
    elif mode == "reproducible":
        result = reproducible(world)
    else:
        result = {name: sampling(world, name) for name in engine.split(",")}
    gathered = world.gather(result) if world is not None else [result]
    if gathered is not None:
        out.write_text(json.dumps({"world_size": world.size if world else 1, "ranks": gathered}))
    if world is not None:
        world.close(settled=True)


if __name__ == "__main__":
    main()
