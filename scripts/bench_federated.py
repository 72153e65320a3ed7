"""Benchmark: federated CNN (Flower simulation) against central training of the same model. Prints figures.

Usage (from the repo root)::

    python scripts/bench_federated.py --central
    python scripts/bench_federated.py --partitioner iid --rounds 20 --local-epochs 2
    python scripts/bench_federated.py --partitioner dirichlet --alpha 0.5 --rounds 20 --local-epochs 2
    python scripts/bench_federated.py --dp --rounds 10 --local-epochs 2 cnn.dp_fit.batch_size=64
    python scripts/bench_federated.py --all-models --defaults seed=1            # what the pipeline's defaults give
    python scripts/bench_federated.py --all-models --central seed=1             # its central baseline, same seed

Extra ``KEY=VALUE`` arguments are pipeline config overrides (``seed=N`` sets the root seed).
``--all-models`` runs the pipeline's own train stage (every model, one federation) and prints each
model's test metric (CNN accuracy, regressor R²); ``--defaults`` leaves the federated schedule
(each model's own rounds and local epochs, strategy, partitioner) at the configuration's defaults;
``--rounds`` / ``--local-epochs`` set ``federated.rounds`` / ``local_epochs``, i.e. every model's schedule. Figures: test accuracy of the
final global model, ε per client, startup seconds (launch to first round), seconds per
round, wall time, and the peak resident memory of this process plus every process it
started (SuperLink, simulation, Ray), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditml_core import data as core_data  # noqa: E402
from auditml_core import models, seeds, training
from auditml_core.config import federated_schedule, load_config  # noqa: E402
from auditml_core.teacher import model_specs  # noqa: E402
from federated.launch.processes import descendants  # noqa: E402
from pipeline import train as train_stage  # noqa: E402


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Peak summed RSS of this process and all its descendants."""

    def __init__(self) -> None:
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(_rss_mb(p) for p in [me, *descendants(me)]))
            time.sleep(0.5)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _all_models(cfg, datasets, *, central: bool) -> dict:
    """The pipeline's train stage (central, or every model in one federation); each model's test metric."""
    mode = "central" if central else "federated"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode))
    trained = train_stage.run(cfg, {"data": datasets}, seed=seeds.stage_seed(cfg.seed, "train")).models
    f = cfg.federated
    out: dict = {"mode": mode, "seed": cfg.seed}
    if not central:
        out.update({"strategy": f.strategy, "partitioner": f.partitioner, "clients": f.n_clients})
    for name, model in trained.items():
        ds = datasets[models.model_entry(name).dataset]
        test = training.evaluate(model.build(), ds.x["test"], ds.y["test"], task=ds.task)
        rec = model.training
        metric = "accuracy" if ds.task == "classification" else "r2"
        out[name] = {
            f"test_{metric}": round(test[metric], 4),
            "epochs_run": rec.get("epochs_run"),
            "epsilon": (rec.get("privacy") or {}).get("epsilon"),
        }
        if not central:
            out[name]["epsilon_per_client"] = (
                {k: round(v[-1], 4) for k, v in rec["client_epsilon"].items()} if cfg.dp.enabled else None
            )
            sigmas = sorted({p.get("noise_multiplier") for p in (rec.get("client_privacy") or {}).values()} - {None})
            out[name]["noise_multiplier_per_client"] = [round(v, 3) for v in sigmas] or None
            out[name]["rounds_run"] = rec.get("completed_rounds")
            out[name]["schedule"] = dict(federated_schedule(cfg, name)._asdict())  # its own rounds x local epochs
            out[name]["federation_seconds"] = round(rec["seconds"], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--central", action="store_true", help="train the CNN centrally instead (the baseline)")
    p.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet", "quantity"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--n-clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    p.add_argument("--dp", action="store_true", help="DP-SGD on every client (dp.target_epsilon, default 3)")
    p.add_argument("--all-models", action="store_true", help="the train stage: every model, one federation")
    p.add_argument("--defaults", action="store_true", help="keep the config's federated defaults (ignore the above)")
    args = p.parse_args()
    schedule = [
        f"federated.partitioner={args.partitioner}",
        f"federated.dirichlet_alpha={args.alpha}",
        f"federated.n_clients={args.n_clients}",
        f"federated.rounds={args.rounds}",
        f"federated.local_epochs={args.local_epochs}",
        f"federated.strategy={args.strategy}",
    ]
    overrides = [*([] if args.defaults else schedule), f"dp.enabled={'true' if args.dp else 'false'}", *args.overrides]
    cfg = load_config(None, overrides)
    datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    spec = model_specs(cfg, datasets)["cnn"]
    seed = seeds.model_seed(cfg.seed, "cnn")
    ds = datasets["images"]
    t0 = time.time()
    with PeakMemory() as mem:
        if args.all_models:
            out = _all_models(cfg, datasets, central=args.central)
        elif args.central:
            # The train stage's own central path (public pretraining under DP included); it also fits the regressor.
            trained = train_stage.run(cfg, {"data": datasets}, seed=seeds.stage_seed(cfg.seed, "train")).models["cnn"]
            test = training.evaluate(trained.build(), ds.x["test"], ds.y["test"], task=ds.task)
            privacy = trained.training.get("privacy")
            out = {
                "mode": "central",
                "test_accuracy": test["accuracy"],
                "epochs_run": trained.training["epochs_run"],
                "epsilon": privacy["epsilon"] if privacy else None,
                "public_pretraining": bool(trained.training.get("public_pretraining")),
            }
        else:
            from federated.launch.simulation import train_federated

            trained = train_federated(cfg, name="cnn", dataset=ds, spec=spec, seed=seed)
            rec = trained.training
            final = rec["final_metrics"]  # test: once, on the released model (the per-round history is validation)
            spr = rec["seconds_per_round"]
            out = {
                "mode": "federated",
                "partitioner": args.partitioner,
                "alpha": args.alpha,
                "clients": args.n_clients,
                "rounds": args.rounds,
                "local_epochs": args.local_epochs,
                "strategy": args.strategy,
                "test_accuracy": final["test_accuracy"],
                "val_accuracy": final["val_accuracy"],
                "best_round_val_accuracy": max(h["val_accuracy"] for h in rec["history"]),
                "partition_sizes": rec["partition"]["sizes"],
                "epsilon_per_client": {k: v[-1] for k, v in rec["client_epsilon"].items()} if args.dp else None,
                "startup_seconds": round(rec["startup_seconds"], 1),
                "first_round_seconds": round(spr[0], 1),
                "later_rounds_mean_seconds": round(sum(spr[1:]) / max(len(spr) - 1, 1), 2),
                "failures": len(rec["failures"]),
                "public_pretraining": bool(rec.get("public_pretraining")),
            }
    out.update(
        {
            "wall_seconds": round(time.time() - t0, 1),
            "peak_rss_mb_all_processes": round(mem.peak_mb),
            "overrides": overrides,
        }
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
