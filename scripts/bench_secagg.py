"""Per-round cost of SecAgg+ against plain FedAvg, in-process (no Ray, no SuperLink).

The ServerApp runs against a Grid whose nodes are ClientApp calls in this process (each
message deep-copied, as a transport would serialise it), so the figures are the protocol's
compute (key agreement, secret sharing, masking, unmasking) plus local training, without
network or Flower start-up. Per round the record's ``seconds_per_round`` is reported.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_secagg.py --clients 5 50 --rounds 3

``--flwr-run`` measures the same through the real launch the pipeline uses: one
``flwr run`` local simulation (SuperLink + Ray, one CPU per client) per variant, via
:func:`federated.launch.simulation.train_federated`, interleaving the variants (plain FedAvg,
SecAgg+, and with ``--user-dp`` SecAgg+ with user-level DP) ``--repeats`` times. Per
round is the median of rounds 2.. (round 1 also pays the Ray actors' imports).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_secagg.py --flwr-run --clients 5 --rounds 4 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "federated"))
from fed_helpers import InProcessGrid, digits_datasets, make_cfg, prepare_work_dir, server_context  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from federated.app.server_app import main  # noqa: E402
from federated.app.workdir import read_result  # noqa: E402


class CopyingGrid(InProcessGrid):
    run = SimpleNamespace(run_id=7)

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)


def one_run(n_clients: int, rounds: int, secure: bool, data, model: list[str]) -> dict:
    cfg = make_cfg(
        *model,
        f"federated.n_clients={n_clients}",
        f"federated.rounds={rounds}",
        "federated.min_clients=2",
        "cnn.fit.batch_size=16",
        f"federated.secure_aggregation={'true' if secure else 'false'}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        rc = prepare_work_dir(Path(tmp), cfg, data)
        t0 = time.perf_counter()
        main(CopyingGrid(rc, n_clients), server_context(rc))
        wall = time.perf_counter() - t0
        _, record = read_result(Path(tmp), "cnn")
    train_s = [sum(c.get("seconds", 0.0) for c in r["trained"]) for r in record["client_rounds"]]
    return {
        "per_round": float(np.median(record["seconds_per_round"])),
        "train": float(np.median(train_s)),
        "wall": wall,
        "acc": record["final_metrics"]["test_accuracy"],
        "params": record["n_parameters"],
    }


def flwr_run(n_clients: int, rounds: int, variant: str, model: list[str]) -> dict:
    """One real ``flwr run`` simulation of the CNN; its record's per-round seconds."""
    from auditml_core import data as core_data
    from auditml_core import seeds
    from auditml_core.config import load_config
    from auditml_core.teacher import model_specs
    from federated.launch.simulation import train_federated

    extra = {
        "fedavg": [],
        "secagg": ["federated.secure_aggregation=true"],
        "secagg+user-dp": [
            "federated.secure_aggregation=true",
            "client_dp.enabled=true",
            "client_dp.target_epsilon=20",
            f"client_dp.delta={0.01 / n_clients}",
        ],
    }[variant]
    cfg = load_config(
        None,
        [
            *model,
            f"federated.n_clients={n_clients}",
            f"federated.rounds={rounds}",
            "federated.min_clients=2",
            "cnn.fit.batch_size=16",
            *extra,
        ],
    )
    datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    spec = model_specs(cfg, datasets)["cnn"]
    t0 = time.perf_counter()
    trained = train_federated(cfg, name="cnn", dataset=datasets["images"], spec=spec, seed=3)
    wall = time.perf_counter() - t0
    record = trained.training
    later = record["seconds_per_round"][1:] or record["seconds_per_round"]
    train_s = [max((c.get("seconds", 0.0) for c in r["trained"]), default=0.0) for r in record["client_rounds"][1:]]
    return {
        "per_round": float(np.median(later)),
        "first_round": float(record["seconds_per_round"][0]),
        "slowest_client": float(np.median(train_s)) if train_s else float("nan"),
        "startup": float(record.get("startup_seconds") or float("nan")),
        "wall": wall,
        "acc": record["final_metrics"]["test_accuracy"],
        "params": record["n_parameters"],
    }


def flwr_run_cli(args) -> None:
    """Interleaved A/B(/C) repeats through the real launch; one line per run, then medians."""
    import logging

    logging.disable(logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",")] + (["secagg+user-dp"] if args.user_dp else [])
    model = [
        f"cnn.channels={args.channels}",
        f"cnn.hidden={args.hidden}",
        f"federated.secagg.num_shares={args.num_shares}",
    ]
    runs: dict[tuple[int, str], list[dict]] = {}
    print(
        f"{'clients':>7} | {'variant':>14} | {'s/round (2..)':>13} | {'round 1 s':>9} | {'slowest client s':>16} | "
        f"{'startup s':>9} | {'wall s':>7} | {'acc':>5}",
        flush=True,
    )
    for n in args.clients:
        for _ in range(args.repeats):
            for v in variants:
                r = flwr_run(n, args.rounds, v, model)
                runs.setdefault((n, v), []).append(r)
                print(
                    f"{n:>7} | {v:>14} | {r['per_round']:>13.3f} | {r['first_round']:>9.2f} | {r['slowest_client']:>16.3f} | "
                    f"{r['startup']:>9.1f} | {r['wall']:>7.1f} | {r['acc']:>5.3f}",
                    flush=True,
                )
    print("\nmedian per-round seconds (rounds 2..) and ratio to FedAvg:")
    for n in args.clients:
        if (n, "fedavg") not in runs:
            continue
        base = float(np.median([r["per_round"] for r in runs[(n, "fedavg")]]))
        for v in variants:
            med = float(np.median([r["per_round"] for r in runs[(n, v)]]))
            print(f"  {n:>3} clients {v:>14}: {med:.3f} s/round  x{med / base:.2f}")


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 50])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", default="[32, 64]", help="cnn.channels (default: the pipeline's CNN)")
    ap.add_argument("--hidden", type=int, default=64, help="cnn.hidden")
    ap.add_argument("--num-shares", type=int, default=0, help="federated.secagg.num_shares (0 = every client)")
    ap.add_argument("--flwr-run", action="store_true", help="measure through the real flwr run simulation")
    ap.add_argument("--repeats", type=int, default=1, help="--flwr-run: interleaved repeats of each variant")
    ap.add_argument("--user-dp", action="store_true", help="--flwr-run: also SecAgg+ with user-level DP (client_dp)")
    ap.add_argument("--variants", default="fedavg,secagg", help="--flwr-run: comma-separated, from fedavg,secagg")
    args = ap.parse_args()
    if args.flwr_run:
        flwr_run_cli(args)
        return
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 7, 1, 1  # what Flower's runtime sets
    import logging

    logging.disable(logging.WARNING)
    data = digits_datasets()
    rows = []
    for n in args.clients:
        model = [
            f"cnn.channels={args.channels}",
            f"cnn.hidden={args.hidden}",
            f"federated.secagg.num_shares={args.num_shares}",
        ]
        plain = one_run(n, args.rounds, False, data, model)
        secure = one_run(n, args.rounds, True, data, model)
        rows.append((n, plain, secure))
    print(
        f"{'clients':>7} | {'params':>6} | {'FedAvg s/round':>14} | {'SecAgg+ s/round':>15} | {'overhead s':>10} | "
        f"{'x':>5} | {'train s/round':>13} | {'acc FedAvg':>10} | {'acc SecAgg+':>11}"
    )
    for n, p, s in rows:
        print(
            f"{n:>7} | {p['params']:>6} | {p['per_round']:>14.3f} | {s['per_round']:>15.3f} | "
            f"{s['per_round'] - p['per_round']:>10.3f} | {s['per_round'] / p['per_round']:>5.2f} | "
            f"{s['train']:>13.3f} | {p['acc']:>10.3f} | {s['acc']:>11.3f}"
        )


if __name__ == "__main__":
    main_cli()
