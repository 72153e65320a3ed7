"""The Flower ClientApp's handlers: thin, around the pipeline's training core.

The ClientApp object Flower loads is :data:`federated.app.components.client`, which registers these handlers
(``train`` behind :func:`federated.app.secagg_client.secagg_mod`) and imports this module with its first message.

Each client trains the global model on its partition with :func:`auditml_core.training.fit`
(DP-SGD when ``dp.enabled``), with the noise multiplier derived for the whole run
(the model's ``<model>.federated`` rounds x local epochs) and its own accountant history
restored every round, so the ε it reports covers everything it has spent. A client that
would overspend refuses: its reply carries no weights and says why.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from auditml_core import models, seeds, training
from auditml_core.config import FitConfig
from auditml_core.errors import ConfigError, PrivacyBudgetError
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy.dp_sgd import History, epsilon_of
from federated.app import client_state, site, workdir
from federated.app.run_config import AppSettings
from federated.app.task import Task, task_for

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the test-only ``app.fail-partition`` setting."""


def check_unwrapped(state_dict) -> None:
    """Refuse to send Opacus-wrapped weights (``_module.`` keys) to the server."""
    wrapped = [k for k in state_dict if k.startswith("_module.")]
    if wrapped:
        raise ValueError(
            f"state dict key {wrapped[0]!r} still carries Opacus' '_module.' prefix; unwrap before sending"
        )


def _client(context: Context, msg: Message | None = None) -> tuple[Task, int, AppSettings]:
    # The model a message is for (issue 12: one run trains every model in turn): its config's "model" key.
    model = None
    if msg is not None and "config" in msg.content.config_records and "model" in msg.content["config"]:
        model = str(msg.content["config"]["model"])
    listed = str(context.run_config.get("app.model", "cnn"))
    if model is None and "," in listed:
        raise ConfigError(f"this run trains {listed!r} but the message names no model (its config has no 'model' key)")
    task, settings = task_for(context.run_config, run_id=context.run_id, model=model)  # built once per process
    cfg = task.cfg
    partition_id = int(context.node_config["partition-id"])
    n_partitions = int(context.node_config.get("num-partitions", cfg.federated.n_clients))
    if n_partitions != cfg.federated.n_clients or not 0 <= partition_id < n_partitions:
        raise ConfigError(
            f"this SuperNode is partition {partition_id} of {n_partitions}, but federated.n_clients={cfg.federated.n_clients}; "
            "make num-supernodes / num-partitions equal to federated.n_clients and partition-id in [0, num-partitions)"
        )
    site.require_site_mode_data(context.node_config, settings.sites)
    return task, partition_id, settings


def schema(msg: Message, context: Context) -> Message:
    """Report this site's schema and training moments (never a row or a label)."""
    task, pid, _ = _client(context, msg)
    return site.schema_reply(msg, context, task.cfg, model=task.name, partition_id=pid)


def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition; reply with weights, size and ε."""
    t0 = time.perf_counter()
    task, pid, settings = _client(context, msg)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if settings.fail_partition == pid and settings.fail_round in (0, server_round):
        raise InjectedFailure(f"injected failure of client {pid} in round {server_round} (app.fail-partition={pid})")
    cfg = task.cfg
    shard = _shard(task, settings, context, config, pid)
    n_rows = len(shard.y)
    model = models.build(shard.spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    path = shard.ledger
    history = client_state.load_history(context, path=path, model=task.name)
    # Under sample-level DP a result, once released, is sent again rather than trained again (client_state).
    replayable = cfg.dp.enabled and not (cfg.federated.secure_aggregation or cfg.client_dp.enabled)
    input_sha256 = client_state.arrays_sha256(msg.content["arrays"]) if replayable else ""
    if replayable:
        again = _released_reply(
            msg, task, pid=pid, server_round=server_round, input_sha256=input_sha256, path=path, t0=t0
        )
        if again is not None:
            return again
    device = training.resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
    schedule = task.schedule  # this model's own rounds x local epochs: σ is planned for them
    fit_cfg = task.client_fit_cfg(pid, n_rows=n_rows)
    try:
        if cfg.dp.enabled:
            history = _reserve_round(
                context, task, fit_cfg, pid=pid, server_round=server_round, n_rows=n_rows, history=history, path=path
            )
        result = training.fit(
            model,
            x_train=shard.x,
            y_train=shard.y,
            x_val=None,
            y_val=None,
            task="regression" if models.model_entry(task.name).dataset == "tabular" else "classification",
            fit_cfg=fit_cfg,
            dp=cfg.dp,
            device=device,
            seed=seeds.client_round_seed(task.model_seed, pid, server_round),
            epochs=schedule.local_epochs,
            dp_total_epochs=schedule.rounds * schedule.local_epochs,
            privacy_history=history,
            proximal_mu=float(config.get("proximal-mu", 0.0)),  # sent by Flower's FedProx
        )
    except PrivacyBudgetError as exc:  # raised by the plan, before any reservation or step
        return _refusal(msg, task, pid=pid, server_round=server_round, history=history, exc=exc)
    return _trained_reply(
        msg,
        context,
        task,
        result,
        pid=pid,
        server_round=server_round,
        n_rows=n_rows,
        replayable=replayable,
        input_sha256=input_sha256,
        path=path,
        t0=t0,
    )


def _shard(task: Task, settings: AppSettings, context: Context, config: ConfigRecord, pid: int) -> site.Shard:
    """This client's training rows and ledger."""
    if settings.sites:  # this site's own file, standardised as the federation agreed; its own ledger
        return site.train_shard(task, context, config)
    # emulated site: its share of the prepared data, its ledger in app.ledger-dir (the run directory's)
    rows = task.partition()[pid]
    return site.Shard(
        x=task.dataset.x["train"][rows],
        y=task.dataset.y["train"][rows],
        spec=task.spec,
        ledger=workdir.ledger_path(task.work_dir, task.name, pid, ledger_dir=task.ledger_dir),
    )


def _released_reply(
    msg: Message, task: Task, *, pid: int, server_round: int, input_sha256: str, path: Path, t0: float
) -> Message | None:
    """The reply this client already released for this round and input, sent again (no new spend); None if none."""
    again = client_state.released_result(path, model=task.name, server_round=server_round, input_sha256=input_sha256)
    if again is None:
        return None
    log.info("client %d sends its released round-%d result again (no new spend)", pid, server_round)
    metrics = {**again["metrics"], "replayed": 1, "seconds": time.perf_counter() - t0}
    content = RecordDict({"arrays": ArrayRecord(again["weights"]), "metrics": MetricRecord(metrics)})
    content["status"] = ConfigRecord({"privacy": json.dumps(again["privacy"])})
    return Message(content, reply_to=msg)


def _reserve_round(
    context: Context,
    task: Task,
    fit_cfg: FitConfig,
    *,
    pid: int,
    server_round: int,
    n_rows: int,
    history: History,
    path: Path,
) -> History:
    """Write-ahead: reserve this round's ε in the ledger before any step touches the data (fit plans the same call).

    Returns the history the round trains on: ``history``, or, when this round re-runs under its own reservation,
    the history before it.

    Raises
    ------
    PrivacyBudgetError
        If the round would overspend (nothing is reserved).
    """
    cfg, schedule = task.cfg, task.schedule

    def plan_on(spent):
        return privacy.plan(
            cfg.dp,
            n_samples=n_rows,
            batch_size=fit_cfg.batch_size,
            max_grad_norm=fit_cfg.max_grad_norm,
            epochs=schedule.local_epochs,
            total_epochs=schedule.rounds * schedule.local_epochs,
            history=spent,
        )

    # A resumed run re-sends the round it crashed in: a reservation for it that released nothing (the
    # round is not in rounds_trained) already counts this round, so the same spend is not counted twice.
    standing = client_state.unreleased_reservation(path, model=task.name, server_round=server_round)
    if standing is not None and history == [*standing[0], standing[1]]:
        plan = plan_on(standing[0])
        if (plan.noise_multiplier, plan.sample_rate, plan.steps) == standing[1]:
            history = standing[0]
            log.info("client %d re-runs round %d under its unreleased reservation", pid, server_round)
        else:  # planned differently now: the reservation stays counted, the round spends anew
            plan = plan_on(history)
    else:
        plan = plan_on(history)
    planned = [*history, (plan.noise_multiplier, plan.sample_rate, plan.steps)]
    client_state.reserve(context, planned, path=path, model=task.name, server_round=server_round)
    return history


def _refusal(
    msg: Message, task: Task, *, pid: int, server_round: int, history: History, exc: PrivacyBudgetError
) -> Message:
    """The reply of a client that would overspend: no weights, its ε so far and why."""
    cfg = task.cfg
    spent = epsilon_of(history, delta=cfg.dp.delta, accountant=cfg.dp.accountant)
    log.warning("client %d refuses round %d: %s", pid, server_round, exc)
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 0, "partition-id": pid, "epsilon": spent, "refused": 1}),
                "status": ConfigRecord({"refused": f"client {pid} refuses to train in round {server_round}: {exc}"}),
            }
        ),
        reply_to=msg,
    )


def _trained_reply(
    msg: Message,
    context: Context,
    task: Task,
    result: training.TrainingResult,
    *,
    pid: int,
    server_round: int,
    n_rows: int,
    replayable: bool,
    input_sha256: str,
    path: Path,
    t0: float,
) -> Message:
    """The reply with the trained weights, rows, training loss and ε; under DP the ledger is settled first."""
    check_unwrapped(result.state_dict)
    metrics = {
        "num-examples": n_rows,
        "partition-id": pid,
        "refused": 0,
        **({"epsilon": float(result.privacy["epsilon"])} if result.privacy else {}),  # none without DP (not 0)
        **({"replayed": 0} if replayable else {}),
        "train-loss": float(result.history[-1]["train_loss"]) if result.history else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
    rounds = [*client_state.load_rounds(path), server_round]
    if task.cfg.dp.enabled:  # settled before the reply exists: only a round listed here can have been released
        released = (
            client_state.released_entry(
                server_round=server_round,
                input_sha256=input_sha256,
                state_dict=result.state_dict,
                metrics=metrics,
                privacy=result.privacy,
            )
            if replayable
            else None
        )
        client_state.save_history(
            context, result.accountant_history, path=path, model=task.name, rounds=rounds, released=released
        )
    content = RecordDict({"arrays": ArrayRecord(result.state_dict), "metrics": MetricRecord(metrics)})
    if result.privacy:
        content["status"] = ConfigRecord({"privacy": json.dumps(result.privacy)})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's share of the validation split."""
    task, pid, settings = _client(context, msg)
    if settings.sites:
        return site.evaluate_reply(msg, context, task, partition_id=pid)
    rows = task.partition("val")[pid]
    model = models.build(task.spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    ds = task.dataset
    if len(rows):
        metrics = training.evaluate(model, ds.x["val"][rows], ds.y["val"][rows], task=ds.task)
    else:  # same keys for every client, or Flower refuses to aggregate
        metrics = {"loss": float("nan"), "r2" if ds.task == "regression" else "accuracy": float("nan")}
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(rows)})}), reply_to=msg)
