"""The Flower ServerApp's main: run the configured strategy, evaluate, checkpoint and record every round.

The ServerApp object Flower loads is :data:`federated.app.components.server`, which calls :func:`main`.

It trains each pipeline model of ``app.model`` in turn (one name, or e.g. ``regressor,cnn``: one
federation for both, so start-up is paid once) for its own rounds (``<model>.federated``), evaluating
the global model on the validation split after each round and on the test split once, after the
last (``final_metrics``: a per-round test curve would invite selecting on the test split). After every round
it rewrites one checkpoint (global weights, strategy state, the record so far), so a
crashed run resumes from its last completed round. At the end it writes the final
global weights (safetensors) and the JSON record the train stage reads back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid

from auditml_core import models, seeds, training
from auditml_core.artifacts import atomic_write, json_bytes, state_dict_bytes
from auditml_core.errors import UserError
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy import user_level as user_privacy
from auditml_core.privacy.client_noise import ClientNoise, check_clip_term, clip_probability
from auditml_core.teacher import public_pretrain
from federated.app import checkpoint, secagg, server_record, site, user_dp, workdir
from federated.app.run_config import AppSettings, from_run_config
from federated.app.strategies import Recording, RecordingFedAdam, build_strategy
from federated.app.task import Task, load_task
from federated.patches import fast_poll

log = logging.getLogger(__name__)


class NodesMissingError(UserError):
    """Fewer SuperNodes connected than federated.n_clients."""


def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls; failures are written down for the train stage, then re-raised."""
    error_path = None
    try:
        cfg, all_settings = from_run_config(context.run_config)
        if all_settings.sites:
            site.refuse_unsupported(cfg)  # at once, not after waiting for the sites
        grid = fast_poll.wrap_grid(
            grid
        )  # deployments: poll every 0.1 s, not Flower's 3 s (federated/patches/fast_poll.py)
        # One federation trains every model of app.model in turn (issue 12: start-up paid once); each message
        # names its model, each model has its own checkpoint, client ledgers, result and error file.
        for name in all_settings.models:
            settings = dataclasses.replace(all_settings, model=name)
            task = load_task(cfg, settings, run_id=context.run_id)
            error_path = workdir.result_paths(task.work_dir, task.name)[2]
            error_path.unlink(missing_ok=True)
            if (
                settings.sites
            ):  # --- per-site data (federated/app/site.py): agree on schema and scaling; no row comes here
                _wait_for_nodes(grid, cfg.federated.n_clients, settings.node_wait_s)
                task = site.agree(grid, task, timeout=settings.round_timeout_s)
            run_server(grid, task, settings, run_config=dict(context.run_config))
            log.info("federated training of %s done; record in %s", name, workdir.result_paths(task.work_dir, name)[1])
    except BaseException as exc:
        if error_path is None and context.run_config.get("app.work-dir"):  # failed before the task was known
            first = str(context.run_config.get("app.model", "cnn")).split(",")[0].strip()
            error_path = workdir.result_paths(Path(str(context.run_config["app.work-dir"])), first)[2]
        if error_path is not None:
            message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            atomic_write(
                error_path,
                json_bytes(
                    {
                        "error": message,
                        "user_error": isinstance(exc, UserError),
                        "error_type": type(exc).__name__,
                        "traceback": traceback.format_exc(),
                    }
                ),
            )
        raise


def _initial_weights(task: Task) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any] | None]:
    """The first global model: seeded as the central path seeds it, and (under DP) pretrained on the public split.

    The server holds only the splits that are not the clients' training data; the public
    split is public by declaration, so pretraining on it spends no privacy budget, exactly
    as in central DP training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.model_seed)
        model = models.build(task.spec)
    device = training.resolve_device(task.cfg.train.device, num_threads=task.cfg.train.num_threads)
    pretraining = public_pretrain(
        task.cfg, task.name, model, task.dataset, device=device, seed=seeds.pretrain_seed(task.model_seed)
    )
    return privacy.unwrap_state_dict(model), pretraining


def _wait_for_nodes(grid: Grid, n_clients: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while (n := len(list(grid.get_node_ids()))) < n_clients:
        if time.monotonic() > deadline:
            raise NodesMissingError(
                f"{n} SuperNode(s) connected after {wait_s:.0f} s, but federated.n_clients={n_clients}; start "
                f"{n_clients} SuperNodes (simulation: num-supernodes={n_clients}) or lower federated.n_clients"
            )
        time.sleep(0.5)


def _evaluate(
    task: Task, arrays: ArrayRecord, grid: Grid | None = None, *, splits: tuple[str, ...] = ("val",)
) -> dict[str, float]:
    """Metrics of ``arrays`` on ``splits``: every round the validation split only (the curve, and anything that
    might select on it); the test split once, after the last round (``final_metrics``)."""
    if task.sites is not None:  # per-site mode: the sites evaluate on their own val/test rows
        return site.evaluate_at_sites(grid, task, arrays, splits=splits)
    model = models.build(task.spec)
    model.load_state_dict(arrays.to_torch_state_dict())
    ds = task.dataset
    out: dict[str, float] = {}
    for split in splits:
        if len(ds.y[split]):
            out.update(
                {f"{split}_{k}": v for k, v in training.evaluate(model, ds.x[split], ds.y[split], task=ds.task).items()}
            )
    return out


def run_server(grid: Grid, task: Task, settings: AppSettings, *, run_config: dict[str, Any]) -> None:
    """Train ``task`` federated for its configured rounds, resuming from a checkpoint if one matches."""
    t_start = time.time()
    f, rounds = task.cfg.federated, task.schedule.rounds  # this model's own rounds (federated_schedule)
    # raises DataError early if a client's share is below the batch size (per-site mode: checked in site.agree)
    parts = task.partition() if task.sites is None else None
    ck_path = workdir.checkpoint_path(task.work_dir, task.name, checkpoint_dir=task.checkpoint_dir)
    ck, record, done, arrays = _start_or_resume(task, parts, ck_path=ck_path, run_config=run_config)
    record["server_started_unix"] = t_start
    record.pop("first_round_started_unix", None)  # a resumed record carries the previous launch's
    if task.sites is not None:  # per-site mode: only agreed sites train; a returning site is checked first
        grid = site.AdmittedSites(grid, task, timeout=settings.round_timeout_s)
    user_plan = _user_dp_plan(task, rounds=rounds)
    strategy, secagg_params, noise = _strategy(task, settings, record, user_plan=user_plan, arrays=arrays, done=done)
    if ck is not None and isinstance(strategy, RecordingFedAdam):
        strategy.load_optimizer_state(ck.strategy_state)
    recorder = _RoundRecorder(
        task,
        grid,
        record,
        strategy,
        done=done,
        rounds=rounds,
        ck_path=ck_path,
        arrays=arrays,
        secagg_params=secagg_params,
    )
    if done < rounds:
        _wait_for_nodes(grid, f.n_clients, settings.node_wait_s)
    if done < rounds and secagg_params is not None:
        secagg.run_secagg(
            grid,
            strategy,
            params=secagg_params,
            num_rounds=rounds - done,
            evaluate_fn=recorder,
            run_config=run_config,
            timeout=settings.round_timeout_s,
            min_uploads=secagg.min_survivors(task.cfg),
        )
    elif done < rounds:
        strategy.start(
            grid=RoundNodeView(grid, need=f.min_clients),  # one list of nodes per sampling (issue 25 item 4)
            initial_arrays=arrays,
            num_rounds=rounds - done,
            timeout=settings.round_timeout_s,
            train_config=ConfigRecord({"model": task.name, **site.message_config(task)}),
            evaluate_config=ConfigRecord({"model": task.name, **site.message_config(task)}),
            evaluate_fn=recorder,
        )
    _after_rounds(task, grid, record, strategy, user_plan=user_plan, noise=noise)
    # The test split, once, on the released model (never per round: the curve and any selection use validation).
    record["final_metrics"] = _evaluate(task, recorder.last_arrays, grid, splits=("val", "test"))
    _write_result(task, record, recorder.last_arrays, t_start)


def _start_or_resume(
    task: Task, parts: list[np.ndarray] | None, *, ck_path: Path, run_config: dict[str, Any]
) -> tuple[checkpoint.ServerCheckpoint | None, dict[str, Any], int, ArrayRecord]:
    """(checkpoint, record, completed rounds, global weights) to start from: the checkpoint's, else a new record.

    Raises
    ------
    UserError
        If the checkpoint belongs to a run with other settings.
    """
    fp = checkpoint.fingerprint(run_config)
    ck = checkpoint.load(ck_path)
    if ck is not None and ck.record.get("fingerprint") != fp:
        raise UserError(
            f"the checkpoint {ck_path} belongs to a run with other settings; delete it or restore those settings"
        )
    if ck is not None:
        record = ck.record
        done = int(record["completed_rounds"])
        record["resumed_from_round"].append(done)
        log.info("resuming %s after round %d of %d", task.name, done, task.schedule.rounds)
        return ck, record, done, ArrayRecord({k: _array(v) for k, v in ck.weights.items()})
    record = server_record.new_record(task, parts, fp)
    initial, record["public_pretraining"] = _initial_weights(task)
    return None, record, 0, ArrayRecord(initial)


def _user_dp_plan(task: Task, *, rounds: int) -> user_privacy.UserDPPlan | None:
    """User-level DP (issue 14): σ planned (and refused past budget) before any round runs; None when it is off.

    A deployment has no launcher preflight: the warning that the noise drowns the model is given here.
    """
    if not task.cfg.client_dp.enabled:
        return None
    user_plan = user_privacy.plan_user_dp(task.cfg.client_dp, rounds=rounds, n_clients=task.cfg.federated.n_clients)
    noise_estimate = user_privacy.aggregate_noise(user_plan, n_parameters=models.n_parameters(models.build(task.spec)))
    warning = user_privacy.noise_warning(models.title(task.name), user_plan, noise_estimate)
    if warning is not None:
        log.warning("%s", warning)
    return user_plan


def _strategy(
    task: Task,
    settings: AppSettings,
    record: dict[str, Any],
    *,
    user_plan: user_privacy.UserDPPlan | None,
    arrays: ArrayRecord,
    done: int,
) -> tuple[Recording, secagg.SecAggParams | None, ClientNoise | None]:
    """(strategy, SecAgg+ parameters, SecAgg+ noise plan): SecAgg+, else DP-FedAvg (user-level DP), else the
    configured strategy; rounds are numbered after the ``done`` ones."""
    f = task.cfg.federated
    if f.secure_aggregation:
        return _secagg_strategy(task, settings, record, user_plan=user_plan, arrays=arrays, done=done)
    if user_plan is not None:
        strategy: Recording = user_dp.build_user_dp_strategy(
            user_plan, min_clients=f.min_clients, round_offset=done, client_evaluate=settings.client_evaluate
        )
        return strategy, None, None
    strategy = build_strategy(
        f.strategy,
        n_clients=f.n_clients,
        min_clients=f.min_clients,
        round_offset=done,
        proximal_mu=f.proximal_mu,
        server_lr=f.server_lr,
        client_evaluate=settings.client_evaluate,
    )
    return strategy, None, None


def _secagg_strategy(
    task: Task,
    settings: AppSettings,
    record: dict[str, Any],
    *,
    user_plan: user_privacy.UserDPPlan | None,
    arrays: ArrayRecord,
    done: int,
) -> tuple[Recording, secagg.SecAggParams, ClientNoise | None]:
    """SecAgg+ (issue 14): Flower's legacy workflow (federated/app/secagg.py); under user-level DP, who adds which
    noise (auditml_core/privacy/client_noise.py). Writes the protocol's settings into ``record``."""
    f = task.cfg.federated
    secagg.check_supported(task.cfg, client_evaluate=settings.client_evaluate)
    noise = None
    if user_plan is not None:
        noise = secagg.noise_plan(task.cfg, user_plan)
        check_clip_term(
            delta=user_plan.delta,
            epsilon=user_plan.planned_epsilon,
            clip_prob=clip_probability(
                noise, n_parameters=record["n_parameters"], uploads=f.n_clients * user_plan.rounds
            ),
        )
    secagg_params = secagg.SecAggParams.from_config(
        f.secagg, max_weight=secagg.max_weight_of(task.train_sizes()), noise=noise
    )
    secagg_rounds = (record.get("secure_aggregation") or {}).get("rounds", [])  # a resumed run keeps its rounds
    record["secure_aggregation"] = {
        **secagg.secagg_record(
            secagg_params, n_clients=f.n_clients, min_uploads=secagg.min_survivors(task.cfg), noise=noise
        ),
        "rounds": secagg_rounds,
    }
    strategy = secagg.build_secagg_strategy(
        n_clients=f.n_clients,
        min_clients=f.min_clients,
        round_offset=done,
        initial_arrays=arrays,
        model=task.name,
        plan=user_plan,
        noise=noise,
    )
    return strategy, secagg_params, noise


class _RoundRecorder:
    """Flower's ``evaluate_fn``: evaluate each round's global model on the validation split, fold the round into
    the record and rewrite the checkpoint. Rounds are numbered from this launch's start (``done`` resumed before)."""

    def __init__(
        self,
        task: Task,
        grid: Grid,
        record: dict[str, Any],
        strategy: Recording,
        *,
        done: int,
        rounds: int,
        ck_path: Path,
        arrays: ArrayRecord,
        secagg_params: secagg.SecAggParams | None,
    ) -> None:
        self.task, self.grid, self.record, self.strategy = task, grid, record, strategy
        self.done, self.rounds, self.ck_path, self.secagg_params = done, rounds, ck_path, secagg_params
        self.last_t = time.time()
        self.last_arrays = arrays  # the latest global model: the released one after the last round
        self.seen: dict[str, Any] = {"rejoined": 0}  # site events already in an earlier round's entry

    def __call__(self, server_round: int, round_arrays: ArrayRecord) -> MetricRecord:
        metrics = _evaluate(self.task, round_arrays, self.grid)
        now = time.time()
        if server_round == 0:
            self.record["first_round_started_unix"] = now  # of this launch (a resume starts a new one)
            if self.done == 0:
                self.record["initial_metrics"] = metrics
        else:
            self._fold(server_round + self.done, round_arrays, metrics, seconds=now - self.last_t)
        self.last_t = now
        return MetricRecord(metrics)

    def _fold(self, absolute: int, round_arrays: ArrayRecord, metrics: dict[str, float], *, seconds: float) -> None:
        """Round ``absolute``'s entry (and SecAgg+'s, and the sites' events) in the record; then the checkpoint."""
        record, strategy = self.record, self.strategy
        server_record.round_entry(record, strategy.rounds[absolute], metrics, seconds)
        if isinstance(self.grid, site.AdmittedSites):  # what happened to the sites in this round, in its own entry
            server_record.site_events(record["client_rounds"][-1], self.grid, strategy.rounds[absolute], self.seen)
        if self.secagg_params is not None:  # the protocol's own account of each round (it halts silently otherwise)
            replies = strategy.rounds[absolute]
            record["secure_aggregation"]["rounds"].append(
                {
                    "round": absolute,
                    "unmasked": absolute in strategy.aggregated,
                    "clients_completed": len(replies.trained),
                    "clients_dropped": len(replies.failed),
                }
            )
        self.last_arrays = round_arrays
        checkpoint.save(
            self.ck_path,
            checkpoint.ServerCheckpoint(
                weights={k: v.numpy() for k, v in round_arrays.items()},
                strategy_state=_strategy_state(strategy),
                record=record,
            ),
        )
        log.info("round %d/%d: %s", absolute, self.rounds, {k: round(v, 4) for k, v in metrics.items()})


def _after_rounds(
    task: Task,
    grid: Grid,
    record: dict[str, Any],
    strategy: Recording,
    *,
    user_plan: user_privacy.UserDPPlan | None,
    noise: ClientNoise | None,
) -> None:
    """What the record says once the rounds are over: the user-level guarantee, the sites that rejoined or were
    refused."""
    if user_plan is not None:
        record.setdefault("user_dp_rounds", {}).update({str(r): c for r, c in strategy.dp_rounds.items()})
        record["user_level_privacy"] = user_privacy.user_privacy_record(
            user_plan,
            completed_rounds=int(record["completed_rounds"]),
            sample_level=server_record.privacy_summary(task, record) if task.cfg.dp.enabled else None,
            noise=noise,
            n_parameters=int(record["n_parameters"]),
            max_participations=server_record.max_participations(record),
        )
    if isinstance(grid, site.AdmittedSites):  # sites that came back under a new node id, nodes left out
        record.setdefault("sites_rejoined", []).extend(grid.rejoined)
        record.setdefault("nodes_refused", {}).update({str(n): why for n, why in grid.refused.items()})


class RoundNodeView:
    """The grid as Flower's strategies see it: one list of connected nodes per round's sampling.

    Flower's ``FedAvg.configure_train`` asks the grid for its nodes twice, once to size the sample
    (``len(nodes) * fraction_train``) and once to draw it (``sample_nodes``). A node that connects between
    the two calls (a site rejoining, admitted by :class:`federated.app.site.AdmittedSites` during the first)
    made the sample one short of the second list: a random connected node, often a healthy one, got no round
    and was recorded as "node not connected when the round started". Here every call returns the first
    call's list until the round's messages are pushed (also while fewer than ``need`` are connected, so a
    strategy waiting for nodes still sees them come); a node that connects in between trains from the next
    round. Everything else goes to the wrapped grid.
    """

    def __init__(self, grid: Any, *, need: int):
        self._grid, self._need, self._nodes = grid, need, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        """The connected nodes, as listed by the first call since the last push."""
        if self._nodes is None or len(self._nodes) < self._need:
            self._nodes = [int(n) for n in self._grid.get_node_ids()]
        return list(self._nodes)

    def push_messages(self, messages):
        """Push (a new sampling starts after this)."""
        self._nodes = None
        return self._grid.push_messages(messages)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        """Push and wait for the replies (a new sampling starts after this)."""
        self._nodes = None
        return self._grid.send_and_receive(messages, timeout=timeout)


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.asarray(v))


def _strategy_state(strategy: Recording) -> dict[str, np.ndarray]:
    return strategy.optimizer_state() if isinstance(strategy, RecordingFedAdam) else {}


def _write_result(task: Task, record: dict[str, Any], arrays: ArrayRecord, t_start: float) -> None:
    weights_path, record_path, _ = workdir.result_paths(task.work_dir, task.name)
    record["server_seconds"] = time.time() - t_start
    record["finished_unix"] = time.time()
    if task.cfg.dp.enabled:
        record["privacy"] = server_record.privacy_summary(task, record)
    state = {k: torch.as_tensor(v.numpy()) for k, v in arrays.items()}
    atomic_write(weights_path, state_dict_bytes(state))
    atomic_write(record_path, json_bytes(record))
