"""How a federated schedule reaches central training: the test metric after every round, against central, per seed.

The defaults of ``<model>.federated.rounds`` / ``local_epochs`` were chosen with this script (federated/README.md,
"Per-model schedules"). No Flower runtime and no Ray: the real ServerApp (``federated.app.server_app.main``) and
ClientApps of the train stage's federation run in this process, their messages passed by a small in-process grid
(the same seeds, partition, training and FedAvg; the Flower simulation's replies may arrive in another order, so
its floating-point sums, and a CNN's test accuracy by an image or so, can differ). For one model, partitioner and
local-epoch count it trains ``--rounds`` rounds per seed, evaluates the global model on the test split after every
round (exploration only: the product evaluates the test split once, after the last round) and prints the gap to
the train stage's own central model at the same seed (``seed=N`` moves the data split too), in points of accuracy
or of R² x 100, at the rounds of ``--show``; then, per round count, how many seeds are within ``--tolerance``.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_schedule.py --model cnn --partitioner dirichlet \\
        --local-epochs 3 --rounds 100 --seeds 0 1 2
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_schedule.py --model regressor --local-epochs 4 --rounds 40
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_schedule.py --model regressor --local-epochs 4 --rounds 13 \
        --seeds 0 1 2 3 4 5 6 7 --data-seed 1   # one split, 8 trainings of each side: their spread and paired gap

Extra ``KEY=VALUE`` arguments are pipeline config overrides (e.g. ``federated.strategy=fedprox``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from auditml_core import data as core_data
from auditml_core import models, seeds, training
from auditml_core.config import load_config
from auditml_core.teacher import model_specs
from federated.app import server_app
from federated.app.components import client as client_app
from federated.app.run_config import to_run_config
from federated.app.workdir import read_result, write_inputs
from pipeline import train as train_stage

METRIC = {"images": "accuracy", "tabular": "r2"}


class LocalGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process, in node order."""

    def __init__(self, run_config: dict, n_nodes: int):
        self.contexts = {
            100 + i: Context(
                run_id=7,
                node_id=100 + i,
                state=RecordDict(),
                run_config=dict(run_config),
                node_config={"partition-id": i, "num-partitions": n_nodes},
            )
            for i in range(n_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            try:
                replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # what Flower's runtime does: an error reply
                replies.append(Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def key_of(name: str) -> str:
    """The dataset key of model ``name`` ("images" or "tabular")."""
    return models.model_entry(name).dataset


def central_metric(cfg, name: str, datasets) -> float:
    """The test metric of the train stage's central model ``name`` (early stopping on validation, as the pipeline)."""
    central = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="central"))
    trained = train_stage.run(central, {"data": datasets}, seed=seeds.stage_seed(cfg.seed, "train")).models[name]
    ds = datasets[key_of(name)]
    return training.evaluate(trained.build(), ds.x["test"], ds.y["test"], task=ds.task)[METRIC[key_of(name)]]


def federated_curve(cfg, name: str, datasets) -> tuple[list[float], dict]:
    """The test metric of the global model after every round (index 0: the initial model), and the record."""
    key = key_of(name)
    curve: list[float] = []
    evaluate = server_app._evaluate

    def with_test(task, arrays, grid=None, *, splits=("val",)):
        out = evaluate(task, arrays, grid, splits=tuple(dict.fromkeys([*splits, "test"])))
        if splits == ("val",):  # the per-round call; the final one (val, test) is the record's
            curve.append(out[f"test_{METRIC[key]}"])
            return {k: v for k, v in out.items() if k.startswith("val_")}
        return out

    server_app._evaluate = with_test
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            write_inputs(work, name=name, dataset=datasets[key], spec=model_specs(cfg, datasets)[name])
            rc = to_run_config(cfg, work_dir=str(work), model=name, node_wait_s=2.0)
            server_context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc))
            server_app.main(LocalGrid(rc, cfg.federated.n_clients), server_context)
            return curve, read_result(work, name)[1]
    finally:
        server_app._evaluate = evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--model", default="cnn", choices=list(models.MODELS))
    p.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet", "quantity"])
    p.add_argument("--alpha", type=float, default=0.5, help="federated.dirichlet_alpha")
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="hold the data split at this seed: --seeds then move only the training (initialisation, batches, "
        "the clients' partition), of central and federated alike",
    )
    p.add_argument("--tolerance", type=float, default=None, help="points; default 0.5 IID, 1.5 otherwise")
    p.add_argument("--show", type=int, nargs="+", default=[10, 20, 30, 40, 60, 80, 100])
    args = p.parse_args()
    tolerance = args.tolerance if args.tolerance is not None else (0.5 if args.partitioner == "iid" else 1.5)
    torch.set_num_threads(1)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 7, 1, 1  # Messages read these
    gaps: dict[int, list[float]] = {}
    finals: dict[int, tuple[float, float]] = {}  # seed -> (central, federated after the last round)
    for seed in args.seeds:
        cfg = load_config(
            None,
            [
                f"seed={seed}",
                "train.mode=federated",
                f"federated.partitioner={args.partitioner}",
                f"federated.dirichlet_alpha={args.alpha}",
                f"federated.rounds={args.rounds}",
                f"federated.local_epochs={args.local_epochs}",
                *args.overrides,
            ],
        )
        split = seed if args.data_seed is None else args.data_seed
        datasets = core_data.prepare(cfg, seed=seeds.stage_seed(split, "data"))
        central = central_metric(cfg, args.model, datasets)
        t0 = time.process_time()
        curve, record = federated_curve(cfg, args.model, datasets)
        gaps[seed] = [100 * (m - central) for m in curve]
        finals[seed] = (central, curve[-1])
        shown = {r: round(gaps[seed][r], 2) for r in args.show if r < len(curve)}
        print(
            json.dumps(
                {
                    "seed": seed,
                    "central": round(central, 4),
                    "final": round(curve[-1], 4),
                    "gap_points_at_round": shown,
                    "client_rows": record["partition"]["sizes"],
                    "cpu_seconds": round(time.process_time() - t0, 1),
                }
            )
        )
    within = {r: sum(g[r] >= -tolerance for g in gaps.values()) for r in range(1, args.rounds + 1)}
    best = max(within.values())
    print(
        f"{args.model}, {args.partitioner}, {args.local_epochs} local epochs: at most {best} of {len(gaps)} seeds "
        f"within {tolerance} points, at rounds {[r for r, n in within.items() if n == best]}"
    )
    if len(finals) > 1:  # the spread of each side over the seeds: what a gap at one seed can be told apart from
        central, federated = (np.array([f[k] for f in finals.values()]) for k in (0, 1))
        diff = 100 * (federated - central)
        print(
            f"over {len(finals)} seeds (points): central mean {100 * central.mean():.2f} sd {100 * central.std(ddof=1):.2f}, "
            f"federated after round {args.rounds} mean {100 * federated.mean():.2f} sd {100 * federated.std(ddof=1):.2f}; "
            f"paired gap mean {diff.mean():+.2f} (standard error {diff.std(ddof=1) / np.sqrt(len(diff)):.2f})"
        )


if __name__ == "__main__":
    main()
