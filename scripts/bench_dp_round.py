"""Where one DP federated client round's time goes: the ClientApp's train handler called in-process.

No Flower runtime, no Ray: one client (``--partition``) of the default federation trains
``--rounds`` rounds of one model under the default DP settings (PRV accountant, σ planned for
all rounds), exactly as :func:`federated.app.client_app.train` runs inside a simulation actor, its
ledger in a temporary folder. Round 1 pays the process's one-offs (σ search, lazy torch imports);
later rounds show the steady state. Prints each round's seconds and ε, then the profile's top
entries of the later rounds (cumulative time).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_dp_round.py [--model cnn] [--rounds 5] [KEY=VALUE ...]

``--cold`` empties the accounting caches (:mod:`auditml_core.privacy.accounting`, the σ cache of
:mod:`auditml_core.privacy.dp_sgd`) before every round: what each round would cost with nothing remembered.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from auditml_core import data as core_data
from auditml_core import models, seeds
from auditml_core.config import load_config
from auditml_core.privacy import accounting
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.teacher import model_specs
from federated.app.client_app import train
from federated.app.run_config import to_run_config
from federated.app.workdir import write_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", choices=sorted(models.MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--cold", action="store_true", help="empty the accounting caches before every round")
    ap.add_argument("--top", type=int, default=20, help="profile entries to print")
    ap.add_argument("overrides", nargs="*", help="config overrides (dp.enabled=true is always set)")
    args = ap.parse_args()

    # Messages take their run and node ids from the process's task identity, which only Flower's runtime sets.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 7, 1, 1
    cfg = load_config(None, ["dp.enabled=true", *args.overrides])
    datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    key = models.model_entry(args.model).dataset
    spec = model_specs(cfg, datasets)[args.model]
    with tempfile.TemporaryDirectory(prefix="bench-dp-round-") as tmp:
        work = Path(tmp)
        write_inputs(work, name=args.model, dataset=datasets[key], spec=spec)
        run_config = to_run_config(cfg, work_dir=str(work), seed=3, model=args.model)
        context = Context(
            run_id=7,
            node_id=100 + args.partition,
            state=RecordDict(),
            run_config=dict(run_config),
            node_config={"partition-id": args.partition, "num-partitions": cfg.federated.n_clients},
        )
        torch.manual_seed(0)
        weights = models.build(spec).state_dict()
        profile = cProfile.Profile()
        print(f"{args.model}, client {args.partition} of {cfg.federated.n_clients}, accountant {cfg.dp.accountant}")
        for r in range(1, args.rounds + 1):
            if args.cold:
                for cached in (accounting.epsilon, accounting.rdp_per_step, privacy._noise_multiplier):
                    cached.cache_clear()
            msg = Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord(weights),
                        "config": ConfigRecord({"server-round": r, "model": args.model}),
                    }
                ),
                dst_node_id=100 + args.partition,
                message_type=MessageType.TRAIN,
            )
            t0 = time.perf_counter()
            if r > 1:
                profile.enable()
            reply = train(msg, context)
            profile.disable()
            m = reply.content["metrics"]
            print(f"round {r}: {time.perf_counter() - t0:.3f} s  epsilon {m['epsilon']:.6f}  refused {m['refused']}")
            if not m["refused"]:
                weights = reply.content["arrays"].to_torch_state_dict()
    if args.rounds > 1:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(f"profile of rounds 2-{args.rounds}:")
        print(out.getvalue())


if __name__ == "__main__":
    main()
