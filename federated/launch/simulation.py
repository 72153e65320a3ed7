"""Federated training from the train stage: a real ``flwr run`` of this repo in local simulation.

:func:`train_federated` prepares a work folder (the dataset written with
:func:`auditml_core.data.dump`, the model spec, the run-config derived from the Config),
starts its own SuperLink in simulation mode on free loopback ports, submits this repo
as a Flower app with ``flwr run`` (which streams the logs until the run ends), and reads
back the final global weights and the federation's record that the ServerApp wrote.
The ServerApp writes its checkpoint straight into the pipeline's run directory after every round
(``runtime.server_checkpoint_dir``, as ``app.checkpoint-dir``), so ``python -m pipeline --run-dir ...``
resumes a crashed run from its last completed round: no polling copy that lagged a round behind. The
clients write their privacy ledgers there too (``runtime.ledger_dir``, write-ahead: before a round
touches the data), where a resumed run's clients read them. This process only notes both in the
manifest (their hashes, the checkpoint's rounds, the ledgers' spend).
Every process started here is stopped on the way out, also on failure and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from auditml_core import models
from auditml_core import seeds as core_seeds
from auditml_core.config import Config, federated_schedule
from auditml_core.data import Dataset
from auditml_core.errors import USER_ERRORS
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy import user_level
from auditml_core.runtime import Runtime
from auditml_core.teacher import TrainedModel, fit_config
from federated.app import checkpoint, workdir
from federated.app.run_config import overrides_for, run_config_toml, to_run_config
from federated.app.task import Task
from federated.launch import processes as launcher
from federated.launch import ray_start
from federated.launch.ray_cluster import RayPlacement

log = logging.getLogger(__name__)
CONNECTION = "pipeline-sim"
SUPERLINK_START_TIMEOUT_S = 60.0
# Flower's SuperExec polls the SuperLink for a submitted run every 1 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL):
# on average 0.5 s between `flwr run` and the simulation's start. A poll is one local gRPC call.
SUPEREXEC_POLL_S = 0.1


def train_federated(
    cfg: Config,
    *,
    name: str,
    dataset: Dataset,
    spec: Mapping[str, Any],
    seed: int,
    runtime: Runtime | None = None,
    app_settings: Mapping[str, Any] | None = None,
):
    """Train pipeline model ``name`` with ``federated.n_clients`` simulated Flower clients.

    One model in its own federation; :func:`train_federated_models` trains several in one.

    Parameters
    ----------
    cfg : resolved configuration (``cfg.federated``, ``cfg.dp`` and the model's fit settings are used).
    name : ``"regressor"`` or ``"cnn"``.
    dataset : the model's prepared dataset (train split is partitioned; val/test evaluate the global model).
    spec : the model spec (:func:`auditml_core.teacher.model_spec`).
    seed : model seed: initial weights, partition and per-client seeds derive from it.
    runtime : checkpoint store of the run directory (optional).
    app_settings : extra ``app.*`` run-config settings (tests: fault injection).

    Returns
    -------
    auditml_core.teacher.TrainedModel whose ``training`` is the federation's record.

    Raises
    ------
    DataError
        If a client's partition is smaller than the batch size.
    FederatedRunError
        If the Flower run fails (the server's error or the log's tail is in the message).
    """
    return train_federated_models(
        cfg,
        datasets={name: dataset},
        specs={name: spec},
        seeds={name: seed},
        runtime=runtime,
        app_settings={"seed": seed, **dict(app_settings or {})},
    )[name]


def train_federated_models(
    cfg: Config,
    *,
    datasets: Mapping[str, Dataset],
    specs: Mapping[str, Mapping[str, Any]],
    seeds: Mapping[str, int],
    runtime: Runtime | None = None,
    app_settings: Mapping[str, Any] | None = None,
) -> dict[str, TrainedModel]:
    """Train several pipeline models in ONE federation: one SuperLink, one ``flwr run``, one Ray start.

    The ServerApp trains the models in the order of ``datasets`` (``app.model="regressor,cnn"``);
    every message names its model, and each model keeps its own checkpoint, client ledgers,
    result and record in the work folder. The Flower start-up (~10-13 s to a ready server here)
    is paid once instead of once per model.

    Parameters
    ----------
    datasets : model name -> its prepared dataset.
    specs, seeds : model name -> model spec, model seed. Several models share one ``app.seed``
        only through the train stage's derivation (``auditml_core.seeds.model_seed(cfg.seed, name)``):
        other seeds need ``app_settings["seed"]`` and one model.

    Returns
    -------
    dict of model name -> auditml_core.teacher.TrainedModel.

    Raises
    ------
    DataError, PrivacyBudgetError
        Before any process starts, for impossible settings.
    FederatedRunError
        If the Flower run fails (the server's error or the log's tail is in the message).
    """
    runtime = runtime or Runtime()
    names = list(datasets)
    ray = RayPlacement.from_config(cfg)
    ray.check_reachable()  # an unreachable cluster is refused before any process starts
    settings = _seed_setting(cfg, seeds, names=names, app_settings=app_settings)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="flwr-") as tmp:
        work = Path(tmp)
        run_config, notes = prepare_federation(
            cfg, work=work, datasets=datasets, specs=specs, seeds=seeds, runtime=runtime, app_settings=settings
        )

        bar = RoundsBar(work, names, cfg, runtime)

        def sync() -> None:
            for note in notes:
                note.sync()
            bar.update()

        try:
            run_flower(work, run_config, n_supernodes=cfg.federated.n_clients, on_poll=sync, ray=ray)
            sync()
        finally:
            bar.close()
        results = {name: workdir.read_result(work, name) for name in names}
    return {name: _trained_model(cfg, results[name], spec=specs[name], names=names, t0=t0) for name in names}


def _trained_model(
    cfg: Config, result: tuple[Any, Mapping[str, Any]], *, spec: Mapping[str, Any], names: list[str], t0: float
) -> TrainedModel:
    """One model's (weights, server record) with what the launcher adds to the record: timings, versions, front end."""
    state_dict, record = result
    record = dict(record)
    first = record.get("first_round_started_unix")
    record.update(
        {
            # Of the whole federation (every model of it), from this call to the end.
            "seconds": time.time() - t0,
            "federation_models": names,
            # From this call to this launch's first round of this model (None: no round ran, e.g. resuming a
            # finished run); the later models of one federation wait for the earlier ones' rounds.
            "startup_seconds": first - t0 if first is not None else None,
            "device": cfg.train.device,
            "flwr_version": _flwr_version(),
            "fixed_front_end": models.front_end_record(spec),
        }
    )
    model = models.build(spec)
    model.load_state_dict(state_dict)  # checks the weights fit the spec
    return TrainedModel(spec=spec, state_dict=state_dict, training=record)


def _seed_setting(
    cfg: Config, seeds: Mapping[str, int], *, names: list[str], app_settings: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``app_settings`` with ``seed``: -1 (each model's seed derived from ``cfg.seed``, as the train stage does)
    unless given for a single model.

    Raises
    ------
    ValueError
        Seeds that are not the derived ones without ``app.seed``, or ``app.seed`` for several models.
    """
    settings = dict(app_settings or {})
    if "seed" not in settings:
        derived = {n: core_seeds.model_seed(cfg.seed, n) for n in names}
        if any(seeds[n] != derived[n] for n in names):
            raise ValueError(
                "several models in one federation derive their seeds from cfg.seed (auditml_core.seeds.model_seed); "
                f"got {dict(seeds)}, expected {derived}"
            )
        settings["seed"] = -1
    elif len(names) > 1:
        raise ValueError("app.seed sets one seed: train one model per federation to give it")
    return settings


def prepare_federation(
    cfg: Config,
    *,
    work: Path,
    datasets: Mapping[str, Dataset],
    specs: Mapping[str, Mapping[str, Any]],
    seeds: Mapping[str, int],
    runtime: Runtime,
    app_settings: Mapping[str, Any],
) -> tuple[dict[str, Any], list[_RunDirNotes]]:
    """Fill the work folder and restore what the run directory kept (the resume path); no process starts.

    The clients' privacy ledgers are not restored: with a run directory (``runtime.ledger_dir``) the
    clients write them there themselves, before each round, and a resumed run's clients read them there.

    Returns
    -------
    (the Flower run-config, one noter of the run directory's in-place files per model).

    Raises
    ------
    DataError, PrivacyBudgetError
        For impossible settings. RunDirError: a recorded ledger that now records less spend.
    """
    notes = []
    for name in datasets:
        task = Task(
            cfg=cfg,
            name=name,
            dataset=datasets[name],
            spec=specs[name],
            fit_cfg=fit_config(cfg, name),
            model_seed=seeds[name],
            work_dir=work,
        )
        _preflight(task)  # fail here, in one line, before any process starts
        workdir.write_inputs(work, name=name, dataset=datasets[name], spec=specs[name])
        notes.append(_RunDirNotes(work, name, runtime))
        notes[-1].restore()
    in_place: dict[str, Any] = {}
    if runtime.ledger_dir is not None:
        in_place["ledger_dir"] = str(runtime.ledger_dir)
    if runtime.server_checkpoint_dir is not None:
        in_place["checkpoint_dir"] = str(runtime.server_checkpoint_dir)
    run_config = to_run_config(cfg, model=",".join(datasets), work_dir=str(work), **in_place, **app_settings)
    return run_config, notes


def _preflight(task: Task) -> None:
    """Refuse impossible settings before any process starts: a partition below the batch size, or (under DP)
    a budget no noise multiplier reaches for the smallest client (largest sample rate) over all rounds.

    Raises
    ------
    DataError, PrivacyBudgetError
    """
    parts = task.partition()
    cfg = task.cfg
    if cfg.client_dp.enabled:  # user-level DP: refuse an overspending plan; say so when its noise drowns the model
        plan = user_level.plan_user_dp(
            cfg.client_dp, rounds=task.schedule.rounds, n_clients=cfg.federated.n_clients
        )  # this model's own rounds
        noise = user_level.aggregate_noise(plan, n_parameters=models.n_parameters(models.build(task.spec)))
        warning = user_level.noise_warning(models.title(task.name), plan, noise)
        if warning is not None:
            log.warning("%s", warning)
    if cfg.dp.enabled:
        schedule = task.schedule  # this model's own rounds x local epochs
        # The client with the fewest steps per epoch has the largest sample rate: the hardest to keep in budget.
        hardest = min(
            range(len(parts)), key=lambda i: privacy.steps_per_epoch(len(parts[i]), task.client_batch_size(i))
        )
        privacy.plan(
            cfg.dp,
            n_samples=len(parts[hardest]),
            batch_size=task.client_batch_size(hardest),
            max_grad_norm=task.fit_cfg.max_grad_norm,
            epochs=schedule.rounds * schedule.local_epochs,
        )
        note = task.batch_size_record().get("note")
        if note:
            log.warning("%s: %s", task.name, note)


# Ray puts Unix sockets at <RAY_TMPDIR>/ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store, and a
# socket path may not exceed 107 bytes: a deep TMPDIR crashes the simulation ("Simulation Runtime crashed").
RAY_SOCKET_SUFFIX = len("/ray/session_2026-11-28_18-15-21_485616_4194304/sockets/plasma_store")
AF_UNIX_PATH_MAX = 107


@contextlib.contextmanager
def _ray_tmp(work: Path) -> Iterator[Path]:
    """Ray's session folder: inside the work folder when its socket paths fit, else a short one under /tmp."""
    inside = work / "ray"
    if len(str(inside)) + RAY_SOCKET_SUFFIX <= AF_UNIX_PATH_MAX:
        yield inside
        return
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as short:
        yield Path(short)


def run_flower(
    work: Path, run_config: Mapping[str, Any], *, n_supernodes: int, on_poll=None, ray: RayPlacement | None = None
) -> None:
    """Run this repo as a Flower app on a private simulation SuperLink; return when the run has ended.

    ``ray``: where the clients run (:mod:`federated.launch.ray_cluster`; default a private Ray, 1 CPU per client).

    Raises
    ------
    FederatedRunError
        If the run did not produce its result.
    """
    overrides = overrides_for(run_config, (launcher.REPO_ROOT / "pyproject.toml").read_text())
    rc_path = work / "run_config.toml"
    rc_path.write_text(run_config_toml(overrides))
    procs = run_simulation(work, rc_path, n_supernodes=n_supernodes, on_poll=on_poll, ray=ray)
    for name in str(run_config["app.model"]).split(","):
        _raise_if_failed(work, name.strip(), procs)


def run_simulation(
    work: Path,
    rc_path: Path,
    *,
    n_supernodes: int,
    app: Path = launcher.REPO_ROOT,
    on_poll=None,
    fast_start: bool = True,
    ray: RayPlacement | None = None,
) -> launcher.Processes:
    """Run the Flower app ``app`` (default: this repo) on a private simulation SuperLink until its run ends.

    Its own FLWR_HOME and free loopback port under ``work``, Ray's folder from :func:`_ray_tmp`,
    ``client-resources-num-cpus=1``; every process is stopped on the way out. ``scripts/bench_flower_floor.py``
    runs a minimal app through here, so the floor it measures is this very launch path.

    ``ray`` (:mod:`federated.launch.ray_cluster`): a private Ray (default) or an existing cluster
    (``RAY_ADDRESS`` for the SuperLink and its children; the cluster is left running), and each client's
    reserved CPUs and GPUs.

    ``fast_start`` (issue 12; the app must ship the ``federated`` package): Ray's pre-started workers serve
    the clients (:mod:`federated.launch.ray_start`), and Flower's SuperExec looks for the submitted run every
    ``SUPEREXEC_POLL_S`` s instead of every 1 s. False: Flower and Ray as they come (the bench's floor).

    Returns
    -------
    The (stopped) processes, for their logs.

    Raises
    ------
    FederatedRunError
        If the SuperLink does not start or exits during the run.
    """
    flwr_home = work / "flwr-home"
    port = launcher.free_port()
    launcher.write_connection(flwr_home, CONNECTION, address=f"127.0.0.1:{port}")
    ray = ray or RayPlacement()
    with (
        _ray_tmp(work) as ray_tmp,
        launcher.sigterm_as_exit(),
        # The work folder is scratch (checkpoint and ledgers live in the run directory): if this
        # process is killed, the watchdog deletes it and Ray's folder rather than leave private-data weights behind.
        # On an existing cluster Ray's session folder is the cluster's own: no RAY_TMPDIR of ours.
        launcher.Processes(
            work / "logs",
            _simulation_env(flwr_home, ray=ray, ray_tmp=ray_tmp, fast_start=fast_start),
            disposable=[work] if ray.existing else [work, ray_tmp],
        ) as procs,
    ):
        superlink = _start_superlink(procs, port)
        run = launcher.start_flwr_run(
            procs,
            CONNECTION,
            rc_path,
            "--federation-config",
            ray.federation_config(n_supernodes),
            app=launcher.stage_app(work / "app") if app == launcher.REPO_ROOT else app,
        )
        while run.poll() is None:
            if superlink.poll() is not None:
                raise launcher.FederatedRunError(
                    f"flower-superlink exited during the run:\n{procs.log_tail('superlink')}"
                )
            if on_poll is not None:
                on_poll()
            time.sleep(0.25)
    return procs


def _simulation_env(flwr_home: Path, *, ray: RayPlacement, ray_tmp: Path, fast_start: bool) -> dict[str, str]:
    """The environment of the simulation's processes: Flower's, Ray's placement, and the fast-start tuning."""
    tuning = (
        {"RAY_RUNTIME_ENV_HOOK": ray_start.HOOK, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S)}
        if fast_start
        else {}
    )
    return {
        **launcher.flower_env(flwr_home, ray_tmp=None if ray.existing else ray_tmp),
        **tuning,
        **ray.environment(),
    }


def _start_superlink(procs: launcher.Processes, port: int) -> subprocess.Popen:
    """Start ``flower-superlink`` in simulation mode on loopback ``port`` and wait until it answers."""
    superlink = procs.start(
        "superlink",
        [
            launcher.bin_path("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
    )
    launcher.wait_until_healthy(
        superlink, port, timeout_s=SUPERLINK_START_TIMEOUT_S, what="flower-superlink", logs=procs, name="superlink"
    )
    return superlink


def _raise_if_failed(work: Path, model: str, procs: launcher.Processes) -> None:
    error = workdir.read_error(work, model)
    if error is not None:
        first_line = error["error"].splitlines()[0] if error["error"] else "unknown error"
        if error.get("user_error"):
            raise USER_ERRORS.get(error.get("error_type", ""), launcher.FederatedRunError)(error["error"])
        raise launcher.FederatedRunError(
            f"the federated run of {model} failed: {first_line}\n{procs.log_tail('flwr-run')}"
        )
    if not workdir.result_paths(work, model)[1].is_file():
        raise launcher.FederatedRunError(
            f"the federated run of {model} ended without a result:\n{procs.log_tail('flwr-run')}"
        )


class _RunDirNotes:
    """Note in the run directory's manifest what the Flower processes write there in place: the server's
    checkpoint (``runtime.server_checkpoint_dir``) and the clients' privacy ledgers (``runtime.ledger_dir``).

    Nothing is copied: the files the ServerApp and the clients write are the ones a resumed run reads.
    The notes may lag the files (a kill between a write and its note): the manifest then accepts a
    checkpoint with at least the rounds and a ledger with at least the spend it noted.
    """

    def __init__(self, work: Path, name: str, runtime: Runtime):
        self.work, self.name, self.runtime = work, name, runtime
        self.seen: dict[Path, int] = {}

    def _ledgers(self) -> list[Path]:
        if self.runtime.ledger_dir is None:
            return []
        return sorted(p for p in (self.runtime.ledger_dir / self.name).glob("*.json") if not p.name.startswith("."))

    def _checkpoint(self) -> list[Path]:
        if self.runtime.server_checkpoint_dir is None or self.runtime.record_checkpoint is None:
            return []
        path = workdir.checkpoint_path(self.work, self.name, checkpoint_dir=self.runtime.server_checkpoint_dir)
        return [path]

    def restore(self) -> None:
        """Before a (resumed) run: note what the last one left (a ledger that now spends less, or a checkpoint
        with fewer rounds than noted, is refused)."""
        self.sync()
        if self._checkpoint() and self._checkpoint()[0].is_file():
            log.info("%s: resuming from the federated server checkpoint in the run directory", self.name)

    def sync(self) -> None:
        """Note new or changed ledgers and server checkpoint in the manifest."""
        noters = [(p, self.runtime.record_ledger) for p in self._ledgers()]
        noters += [(p, self.runtime.record_checkpoint) for p in self._checkpoint()]
        for path, note in noters:
            if note is None:
                continue
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self.seen.get(path) != mtime:
                note(path)
                self.seen[path] = mtime


HEADER_LIMIT = 64 << 20  # a checkpoint header (the JSON record) larger than this is not one the server wrote


class RoundsBar:
    """A progress bar over the federation's rounds (every model's, in training order), advanced from the
    completed-round count in each server checkpoint's header as the launcher polls; none without ``progress``."""

    def __init__(self, work: Path, names: list[str], cfg: Config, runtime: Runtime):
        self.paths = [workdir.checkpoint_path(work, n, checkpoint_dir=runtime.server_checkpoint_dir) for n in names]
        self.done = dict.fromkeys(self.paths, 0)
        self.bar = None
        if runtime.progress:
            from tqdm.auto import tqdm

            total = sum(federated_schedule(cfg, n).rounds for n in names)
            self.bar = tqdm(total=total, desc=f"federated rounds ({', '.join(names)})", unit=" rounds", leave=False)

    def update(self) -> None:
        if self.bar is None:
            return
        for path in self.paths:
            try:
                with path.open("rb") as fh:  # the header only: the weights are not read
                    head = fh.read(8)
                    size = int.from_bytes(head, "little")
                    if size > HEADER_LIMIT:  # not a checkpoint the server wrote
                        continue
                    info = checkpoint.summary(head + fh.read(size))
            except OSError:
                continue
            if info is not None and info["completed_rounds"] != self.done[path]:
                self.done[path] = info["completed_rounds"]
        self.bar.n = sum(self.done.values())
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _flwr_version() -> str:
    from importlib import metadata

    return metadata.version("flwr")
