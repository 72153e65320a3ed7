"""The federation's record: what the ServerApp writes about a run, built up round by round.

:func:`new_record` before the first round (clients, schedule, strategy, partition), :func:`round_entry`
after each (the clients' replies, losses, ε, failures), :func:`site_events` in per-site mode, and at
the end :func:`privacy_summary` (sample-level DP) and :func:`max_participations` (user-level DP). The
train stage reads the record back; the report states it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from auditml_core import models
from auditml_core.config import Config, federated_schedule
from auditml_core.privacy import dp_sgd as privacy
from federated.app import site
from federated.app.partition import label_histograms
from federated.app.task import Task

NO_DP = "no DP (dp.enabled=false): the clients train without DP-SGD, so no per-client ε bounds them"


def schedule_note(cfg: Config, model: str) -> str:
    """Where model ``model``'s rounds x local epochs come from (the record says it; under DP it is a choice with a
    cost). Each model has its own (``<model>.federated``); ``federated.rounds`` / ``local_epochs`` above 0 set
    them for every model."""
    f, own = cfg.federated, getattr(cfg, model).federated
    rounds, epochs = federated_schedule(cfg, model)
    keys = " x ".join(
        f"federated.{k} (every model)" if getattr(f, k) else f"{model}.federated.{k}"
        for k in ("rounds", "local_epochs")
    )
    if not (cfg.dp.enabled or cfg.client_dp.enabled):
        return f"{keys} = {rounds} x {epochs}"
    plain = getattr(Config(), model).federated
    dp_default = (f.dp_rounds or own.dp_rounds, f.dp_local_epochs or own.dp_local_epochs)
    default = not (f.rounds or f.local_epochs) and (rounds, epochs) == dp_default
    return (
        f"{rounds} x {epochs}: "
        + (
            f"the DP default ({model}.federated.dp_rounds x dp_local_epochs)"
            if default
            else f"set for this run ({keys})"
        )
        + f"; σ is planned for the whole {rounds} x {epochs} schedule, so a longer one adds noise at "
        f"the same ε (the non-DP default is {plain.rounds} x {plain.local_epochs}; federated/README.md compares them)"
    )


def new_record(task: Task, parts: list[np.ndarray] | None, fp: str) -> dict[str, Any]:
    """The record of a federation before its first round: clients, schedule, strategy, partition, fit settings."""
    cfg, ds = task.cfg, task.dataset
    f = cfg.federated
    partition: dict[str, Any] = {
        "method": f.partitioner,
        "dirichlet_alpha": f.dirichlet_alpha,
        "sizes": task.train_sizes(),
    }
    if task.sites is not None:  # per-site mode: sizes and (without DP) histograms as the sites reported them
        partition = {"method": "sites", "sizes": task.train_sizes()}
        if task.sites.get("label_histograms") is not None:
            partition["label_histograms"] = task.sites["label_histograms"]
    elif ds.task == "classification":
        partition["label_histograms"] = label_histograms(ds.y["train"], parts, len(ds.class_names))
    strategy: dict[str, Any] = {"name": f.strategy}
    if f.strategy == "fedprox":
        strategy["proximal_mu"] = f.proximal_mu
    elif f.strategy == "fedadam":
        strategy["server_lr"] = f.server_lr
    return {
        "mode": "federated",
        "model": task.name,
        "clients": f.n_clients,
        "min_clients": f.min_clients,
        "rounds": task.schedule.rounds,
        "local_epochs": task.schedule.local_epochs,
        "schedule": schedule_note(cfg, task.name),
        "completed_rounds": 0,
        "strategy": strategy,
        "partition": partition,
        "seed": task.model_seed,
        "fit": dict(task.fit_cfg.__dict__),
        "batch_size": task.batch_size_record(),
        "dp_enabled": cfg.dp.enabled,
        "history": [],
        "initial_metrics": {},
        # Without sample-level DP there is no per-client ε to report (not 0: nothing bounds what a client leaks).
        "client_epsilon": {str(i): [] for i in range(f.n_clients)} if cfg.dp.enabled else NO_DP,
        "client_rounds": [],
        "failures": [],
        "seconds_per_round": [],
        "resumed_from_round": [],
        "n_parameters": models.n_parameters(models.build(task.spec)),
        "fingerprint": fp,
        "n_train": int(sum(task.train_sizes())),
        **({"sites": dict(task.sites)} if task.sites is not None else {}),
    }


def round_entry(record: dict[str, Any], replies, metrics: dict[str, float], seconds: float) -> None:
    """Fold one finished round into the record."""
    r = replies.round
    eps = {
        str(int(c["partition-id"])): float(c["epsilon"]) for c in replies.trained + replies.refused if "epsilon" in c
    }
    dp = isinstance(record["client_epsilon"], dict)  # sample-level DP (else the "no DP" note)
    for pid, series in record["client_epsilon"].items() if dp else ():
        series.append(eps.get(pid))  # None: the client did not answer this round
    # The clients' own training loss (their last local epoch), weighted by their rows: the curve's training series.
    losses = [
        (float(c["train-loss"]), float(c.get("num-examples", 0)))
        for c in replies.trained
        if np.isfinite(float(c.get("train-loss", float("nan")))) and float(c.get("num-examples", 0)) > 0
    ]
    trained = [{k: v for k, v in c.items() if k != "privacy"} for c in replies.trained]
    record["client_rounds"].append(
        {"round": r, "trained": trained, "refused": replies.refused, "failed": replies.failed}
    )
    record["failures"].extend({"round": r, **f} for f in replies.failed)
    record["seconds_per_round"].append(seconds)
    record["history"].append(
        {
            "round": r,
            **({"train_loss": sum(v * n for v, n in losses) / sum(n for _, n in losses)} if losses else {}),
            **metrics,
            "seconds": seconds,
            "clients_trained": sum(1 for c in replies.trained if int(c.get("dp-sampled", 1))),
            # user-level DP under SecAgg+: the clients that uploaded a zero update (+ noise)
            **(
                {"clients_noise_only": sum(1 for c in replies.trained if not int(c.get("dp-sampled", 1)))}
                if any("dp-sampled" in c for c in replies.trained)
                else {}
            ),
            "clients_refused": len(replies.refused),
            "clients_failed": len(replies.failed),
            **({"epsilon_max": max(eps.values()) if eps else 0.0} if dp else {}),
        }
    )
    record["completed_rounds"] = r
    for c in replies.trained:
        if "privacy" in c:
            record.setdefault("client_privacy", {})[str(int(c["partition-id"]))] = c["privacy"]


def site_events(entry: dict[str, Any], grid: site.AdmittedSites, replies, seen: dict[str, Any]) -> None:
    """Note in a round's record entry the sites that rejoined since the last entry (and whether they trained in
    it), the nodes waiting to rejoin (why) and the nodes refused so far: what happened, not just who failed."""
    new = grid.rejoined[seen["rejoined"] :]
    seen["rejoined"] = len(grid.rejoined)
    if new:
        entry["rejoined"] = [
            {**r, "sent_from_round": entry["round"] if r["node_id"] in replies.sent_to else entry["round"] + 1}
            for r in new
        ]
    if grid.waiting:
        entry["waiting"] = {str(n): why for n, why in grid.waiting.items()}


def max_participations(record: dict[str, Any]) -> int:
    """The most rounds any client's update was part of a release (under SecAgg+ DP: ``dp-sampled`` entries)."""
    counts: dict[int, int] = {}
    for r in record["client_rounds"]:
        for c in r["trained"]:
            if int(c.get("dp-sampled", 1)):
                pid = int(c["partition-id"])
                counts[pid] = counts.get(pid, 0) + 1
    return max(counts.values(), default=0)


def privacy_summary(task: Task, record: dict[str, Any]) -> dict[str, Any]:
    """Every number that defines the federation's ε: per client, and the worst client."""
    import opacus

    dp = task.cfg.dp
    finals = {
        pid: next((e for e in reversed(series) if e is not None), 0.0)
        for pid, series in record["client_epsilon"].items()
    }
    per_client = record.get("client_privacy", {})
    return {
        "epsilon": max(finals.values()) if finals else 0.0,
        "delta": dp.delta,
        "target_epsilon": dp.target_epsilon,
        "accountant": dp.accountant,
        "opacus_version": opacus.__version__,
        "noise_source": privacy.noise_source(dp),
        "epsilon_per_client": finals,
        "noise_multiplier_per_client": {pid: p.get("noise_multiplier") for pid, p in per_client.items()},
        "sample_rate_per_client": {pid: p.get("sample_rate") for pid, p in per_client.items()},
        "max_grad_norm": task.fit_cfg.max_grad_norm,
        "per_client": per_client,
        "mechanism": "DP-SGD on each client (Gaussian mechanism, Poisson subsampling, per-sample clipping)",
        "unit_of_privacy": "one training record of one client (sample-level DP, accounted per client over all rounds)",
        "floating_point_safe_noise": True,
    }
