"""The ordered stage registry, with each stage's declared inputs, and the runner that executes a slice of it.

A stage is a module with ``run(cfg, inputs, *, seed, runtime)``, ``dump(outputs) -> {relpath: bytes}``
and ``load(read) -> outputs``; its :class:`Stage` entry declares which earlier stages it
reads. A stage with independent pieces (one per model) also has ``parts(cfg)``, ``run_part(cfg, inputs, part,
*, seed, runtime)`` and ``combine(cfg, {part: output})``; its ``run`` is ``combine`` over ``run_part``, and the
stage workers run each part as its own job. Only the runner touches files: it writes what ``dump`` returns into the run
directory and, when a stage needs an earlier stage's output that this invocation did
not compute, rebuilds it with ``load`` from the recorded (hash-checked) files. A slice
whose inputs are neither computed now nor complete in the run directory is refused
before any work.
"""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from auditml_core.artifacts import disk_full, json_bytes, read_json
from auditml_core.config import Config
from auditml_core.errors import ConfigError, DiskFullError, RunDirError, UserError
from auditml_core.runtime import Runtime
from auditml_core.seeds import stage_seed
from pipeline import stage_workers
from pipeline.rundir import LEDGER_DIR, SERVER_CHECKPOINT_DIR, RunDir, damaged

log = logging.getLogger(__name__)

PROVENANCE = "provenance"  # input name of the run's manifest (artifact hashes, seeds, versions)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and its contract."""

    name: str
    module: str  # implementing module: run / dump / load
    description: str  # one line for --help and the log
    requires: tuple[str, ...] = ()  # earlier stages whose outputs it reads
    optional: tuple[str, ...] = ()  # earlier stages it reads when the run has them
    provenance: bool = False  # whether it reads the run's manifest (inputs["provenance"])


# Order is execution order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("data", "pipeline.data", "load, validate, split (train/val/test/public) and standardise both datasets"),
        Stage(
            "train",
            "pipeline.train",
            "train the MLP regressor (+ Ridge baseline) and the CNN, central or federated, optionally DP",
            requires=("data",),
        ),
        Stage(
            "evaluate",
            "pipeline.evaluate",
            "test metrics with bootstrap confidence intervals",
            requires=("data", "train"),
        ),
        Stage(
            "explain",
            "pipeline.explain_stage",
            "SHAP and LIME for both models (public-split backgrounds) with additivity, faithfulness, agreement, "
            "stability",
            requires=("data", "train"),
        ),
        Stage(
            "distill",
            "pipeline.distill",
            "compress each teacher into a >=10x smaller student (+ a decision tree for the regressor); fidelity, "
            "latency, ONNX",
            requires=("data", "train"),
        ),
        Stage(
            "audit",
            "pipeline.audit",
            "privacy audit of every model: loss-threshold and LiRA attacks (shadows trained like it), under DP a "
            "one-run gradient-canary audit, what each can certify, and a positive control it must catch",
            requires=("data", "train"),
        ),
        Stage(
            "report",
            "pipeline.report",
            "report.html (+ report.pdf), report.json (+ schema) and a model card per model, listing every earlier "
            "artifact's hash",
            requires=("data", "train", "evaluate", "explain"),
            optional=("distill", "audit"),
            provenance=True,
        ),
    )
}
DESCRIPTIONS = {name: s.description for name, s in STAGES.items()}


def _check_name(name: str) -> None:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; valid stages in order: {', '.join(STAGES)}")


def stage_module(name: str) -> ModuleType:
    """The module implementing stage ``name`` (imported when first needed: stages pull in heavy libraries)."""
    _check_name(name)
    return importlib.import_module(STAGES[name].module)


def select_stages(*, stages: Iterable[str] | None = None, start: str | None = None) -> list[str]:
    """The stages to run, in registry order: an explicit list, everything from ``start``, or all."""
    names = list(STAGES)
    if stages:
        chosen = [s.strip() for s in stages if s.strip()]
        for s in chosen:
            _check_name(s)
        return [s for s in names if s in chosen]
    if start:
        _check_name(start)
        return names[names.index(start) :]
    return names


def check_inputs(run: RunDir, names: list[str]) -> None:
    """Refuse a slice whose required inputs are neither computed in it nor complete in ``run``.

    Raises
    ------
    RunDirError
        Naming the stage, the missing input and the fix.
    """
    order = list(STAGES)
    # run_stages marks every recorded stage after the slice's first one stale unless the slice re-runs it.
    stale = {n for n in order[order.index(names[0]) :] if n not in names} if names else set()
    available = {n for n in STAGES if run.stage_status(n) == "complete" and n not in stale}
    for name in names:
        missing = [r for r in STAGES[name].requires if r not in available]
        if missing:
            if stale & set(missing):
                why, start = f"which re-running {names[0]!r} makes stale", names[0]
            else:
                why, start = f"which has not completed in {run.path}", missing[0]
            raise RunDirError(
                f"stage {name!r} needs the output of {', '.join(map(repr, missing))}, {why}; add it to --stages "
                f"or re-run with --from {start}"
            )
        available.add(name)


def _inputs(stage: Stage, outputs: dict[str, Any], run: RunDir) -> dict[str, Any]:
    """The inputs ``stage`` declared: computed now, else loaded from the run directory."""
    inputs: dict[str, Any] = {}
    for dep in (*stage.requires, *stage.optional):
        if stage.provenance and run.stage_status(dep) == "complete":
            # A stage that records provenance (the report) always reads the recorded, hash-checked files,
            # never in-memory objects: it then describes exactly what is on disk, and re-rendering it
            # from the run directory gives the same bytes.
            inputs[dep] = load_recorded(dep, run)
            continue
        if dep not in outputs and run.stage_status(dep) == "complete":
            outputs[dep] = load_recorded(dep, run)
        if dep in outputs:
            inputs[dep] = outputs[dep]
    if stage.provenance:
        inputs[PROVENANCE] = provenance_view(run.manifest, stage.name)
    return inputs


def provenance_view(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """What stage ``name`` may know of the run: the manifest without its own record and the invocation log.

    Both change on every re-run of ``name`` (attempt counters, previous timings) while its inputs do
    not; leaving them out makes the stage's output a pure function of its recorded inputs.
    """
    view = copy.deepcopy(manifest)
    view["stages"].pop(name, None)
    view.pop("invocations", None)
    view["artifacts"] = {rel: a for rel, a in view["artifacts"].items() if a.get("stage") != name}
    return read_json(json_bytes(view))  # its recorded form (sorted keys), exactly what a re-render reads back


def load_recorded(name: str, run: RunDir) -> Any:
    """Stage ``name``'s output rebuilt from its hash-checked files; undecodable files say which file is damaged.

    A file whose hash matches can still be hostile (the manifest was edited to match it): the
    decoders refuse pickles and code, and any decoding failure becomes a one-line RunDirError.
    """
    last: list[str] = []

    def read(rel: str) -> bytes:
        last.append(rel)
        return run.read(rel)

    try:
        return stage_module(name).load(read)
    except UserError:
        raise
    except Exception as exc:  # a decoder's error on a file it did not write: ValueError, KeyError, SafetensorError...
        # A decoder fails on the file it just read; a wrong key shows only once the loader combines them.
        where = run.path / last[-1] if last else run.path
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        read_too = f"; stage {name!r} files read: {', '.join(last)}" if len(last) > 1 else ""
        raise damaged(where, f"{type(exc).__name__}: {reason}{read_too}; re-run --from {name}") from None


def run_stages(
    cfg: Config, run: RunDir, names: list[str], *, progress: bool = False, followers: Any = None
) -> dict[str, Any]:
    """Run ``names`` in order inside ``run``; later recorded stages become stale.

    Consecutive stages that read none of each other's outputs (evaluate, explain, distill, audit) run at
    once in forked workers where :func:`pipeline.stage_workers.workers` allows, else one after another. Central
    training then runs here model by model, and a model's parts of those stages start as soon as it is trained,
    beside the next model's training (:func:`_early_jobs`).

    ``followers``: rank 0's link to the other ranks (``pipeline.ranks.Followers``) when this is rank 0 of
    a multi-process training; only the train stage uses them.

    Returns the outputs held in this process: those of the stages it ran itself and the inputs it loaded. A
    stage run in a worker is not read back (1.5-2 s on a default run, for nothing the command uses); a later
    stage that needs it loads it from the run directory (:func:`_inputs`), as a resume does.

    Raises
    ------
    RunDirError
        If a stage's declared inputs are missing (before any work).
    UserError
        From any stage; the failing stage is marked ``failed`` in the manifest first.
    """
    check_inputs(run, names)
    if progress:
        stage_workers.no_tqdm_monitor()  # before the first bar: its thread would keep every stage out of workers
    outputs: dict[str, Any] = {}
    i = 0
    try:
        while i < len(names):
            group = independent_stages(names[i:])
            jobs = _jobs(cfg, group)
            n_workers = stage_workers.workers(cfg, len(jobs))  # explain alone: two jobs, one per model
            if n_workers > 1:
                _run_group(cfg, run, jobs, outputs, n_workers=n_workers, names=names)
            elif ahead := _early_jobs(cfg, names, i):  # train, model by model, each model's later jobs started early
                group, jobs, n_workers = ahead
                _run_group(cfg, run, jobs, outputs, n_workers=n_workers, names=names, first=names[i], progress=progress)
                group = [names[i], *group]
            else:
                group = group[:1]
                _run_one(cfg, run, group[0], outputs, names=names, progress=progress, followers=followers)
            i += len(group)
    finally:
        gc.unfreeze()  # what the stages and their forks froze (:func:`_begin`) is the collector's again: a caller may run many
    return outputs


def independent_stages(names: list[str]) -> list[str]:
    """The longest head of ``names`` whose stages read none of each other's outputs (nor the manifest)."""
    group = [names[0]]
    for name in names[1:]:
        stage = STAGES[name]
        if STAGES[group[0]].provenance or stage.provenance or set(stage.requires + stage.optional) & set(group):
            break
        group.append(name)
    return group


def _begin(cfg: Config, run: RunDir, name: str, outputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Stage ``name``'s inputs and seed; it is marked running.

    What is alive now (the libraries loaded, the earlier stages' outputs) stays alive until the run ends, so it is
    frozen out of the garbage collector's full passes, which walked all of it again and again: 13 of them took
    2.5 s of the runner's 41 s on a default run (measured with ``gc.callbacks``); 1.0 s with this. Frozen objects
    are still freed when their last reference goes; :func:`run_stages` unfreezes them when it returns.
    """
    gc.freeze()
    seed = stage_seed(cfg.seed, name)
    if run.stage_status(name) == "complete":
        # An explicit re-run starts afresh (no checkpoints); its old outputs stay until the new ones are complete.
        run.drop_intermediates(name)
    inputs = _inputs(STAGES[name], outputs, run)
    run.begin_stage(name, seed=seed)
    log.debug("stage %s: %s", name, STAGES[name].description)
    return inputs, seed


def _finish(run: RunDir, name: str, names: list[str], seconds: float) -> None:
    log.info("stage %-8s done in %6.1f s", name, seconds)  # the console's one line per stage
    # Only now are the later recorded stages stale: a stage that fails leaves them (and its own earlier
    # outputs) as they were, so a failed re-run loses nothing.
    order = list(STAGES)
    for later in order[order.index(name) + 1 :]:
        if later not in names and run.stage_status(later) == "complete":
            run.invalidate(later)


def _failure(run: RunDir, name: str, exc: BaseException) -> BaseException:
    """Mark stage ``name`` failed for ``exc``; the exception to raise."""
    if isinstance(exc, UserError):
        run.fail_stage(name, str(exc))
    elif isinstance(exc, OSError) and (full := disk_full(exc)) is not None:
        return _disk_full_stage(run, name, full)
    else:
        run.fail_stage(name, f"{type(exc).__name__}: {exc}")
    return exc


def _run_one(
    cfg: Config,
    run: RunDir,
    name: str,
    outputs: dict[str, Any],
    *,
    names: list[str],
    progress: bool,
    followers: Any = None,
    each: Callable[[str], None] | None = None,
) -> None:
    """Run stage ``name`` in this process and record it. With ``each``, part by part (a stage of
    :data:`IN_PARTS_HERE`): after each part but the last, ``outputs[name]`` is the stage output of the parts so
    far (its module's ``combine``) and ``each(part)`` is called."""
    inputs, seed = _begin(cfg, run, name, outputs)
    runtime = stage_runtime(cfg, run, name, seed=seed, progress=progress, followers=followers)
    t0 = time.perf_counter()
    module = stage_module(name)
    try:
        if each is None:
            out = module.run(cfg, inputs, seed=seed, runtime=runtime)
        else:
            order, done = stage_parts(cfg, name), {}
            for part in order:
                done[part] = module.run_part(cfg, inputs, part, seed=seed, runtime=runtime)
                if part != order[-1]:
                    outputs[name] = module.combine(cfg, done)
                    each(part)
            out = module.combine(cfg, done)
        files = module.dump(out)
        run.complete_stage(name, files, seed=seed, seconds=time.perf_counter() - t0, device=runtime.placement)
    except BaseException as exc:
        outputs.pop(name, None)  # the parts so far
        raised = _failure(run, name, exc)
        if raised is exc:
            raise
        raise raised from None
    outputs[name] = out
    _finish(run, name, names, time.perf_counter() - t0)


IN_PARTS_HERE = ("train",)  # stages with parts run in this process, one part after another (they write checkpoints)


# The jobs of a stage group that take longest on the default run, longest first (seconds in one of two workers
# on 2 cores: audit cnn 17.4, explain cnn 10.3, distill regressor 5.6, explain regressor 5.0, distill cnn 5.7,
# audit regressor 1.8, evaluate 0.6): started in this order the two workers finished 0.3 s apart (23.2 and
# 23.5 s). Jobs not named here follow in stage order.
LONGEST_FIRST = ("audit:cnn", "explain:cnn", "distill:regressor", "explain:regressor", "distill:cnn")


def stage_parts(cfg: Config, name: str) -> tuple[str | None, ...]:
    """The independent parts of stage ``name`` (its module's ``parts``: one per model), or ``(None,)``: one job."""
    parts = getattr(stage_module(name), "parts", None)
    return (parts(cfg) if parts else ()) or (None,)


def _jobs(cfg: Config, group: list[str]) -> dict[str, tuple[str, str | None]]:
    """The group's jobs, ``"stage:part"`` (or ``"stage"``) -> (stage, part), in the order they start. A stage of
    :data:`IN_PARTS_HERE` is one job: its parts never run in a worker."""
    jobs = {
        (f"{name}:{part}" if part else name): (name, part)
        for name in group
        for part in ((None,) if name in IN_PARTS_HERE else stage_parts(cfg, name))
    }
    rank = {job: i for i, job in enumerate(LONGEST_FIRST)}
    return {job: jobs[job] for job in sorted(jobs, key=lambda job: rank.get(job, len(rank)))}  # stable: stage order


def _prepare(cfg: Config, name: str | None) -> None:
    """Stage ``name``'s optional ``prepare(cfg)`` (what it imports lazily, e.g. the report's WeasyPrint). Never
    fails the stages still running: whatever it could not do, the stage meets again, and reports, itself."""
    prepare = getattr(stage_module(name), "prepare", None) if name else None
    if prepare is None:
        return
    try:
        prepare(cfg)
    except Exception as exc:  # the stage raises it again, in its own words
        log.debug("preparing stage %s: %s: %s", name, type(exc).__name__, exc)


def _early_jobs(
    cfg: Config, names: list[str], i: int
) -> tuple[list[str], dict[str, tuple[str, str | None]], int] | None:
    """When ``names[i]`` is a stage this process runs part by part (:data:`IN_PARTS_HERE`) and the stages after it
    run in workers: those stages, their jobs and the number of workers; else None.

    Not on a machine with CUDA unless ``train.device=cpu``: a model trained on the GPU initialises CUDA in this
    process, and a child forked after that cannot use it (:func:`pipeline.stage_workers.workers`).
    """
    if names[i] not in IN_PARTS_HERE or len(stage_parts(cfg, names[i])) < 2 or i + 1 == len(names):
        return None
    if cfg.train.device != "cpu":
        import torch  # loaded already: the train stage's inputs are tensors

        if torch.cuda.is_available():
            return None
    group = independent_stages(names[i + 1 :])
    jobs = _jobs(cfg, group)
    n_workers = stage_workers.workers(cfg, len(jobs))
    return (group, jobs, n_workers) if n_workers > 1 else None


@dataclass
class _Group:
    """The bookkeeping of one group of jobs (:func:`_run_group`): each stage begun once, recorded once all its
    parts are back (its module's ``combine``), the first failure kept to be raised once all have ended."""

    cfg: Config
    run: RunDir
    jobs: dict[str, tuple[str, str | None]]  # job -> (stage, part)
    outputs: dict[str, Any]
    names: list[str]
    prepared: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)  # stages begun: inputs, seed
    arrived: dict[str, dict[str | None, stage_workers.Done]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    started: set[str] = field(default_factory=set)

    def start(self, job: str) -> None:
        """A job is about to start: its stage begins (once)."""
        self.started.add(job)
        name = self.jobs[job][0]
        if name not in self.prepared:
            self.prepared[name] = _begin(self.cfg, self.run, name, self.outputs)

    def work(self, job: str, runtime: Runtime) -> tuple[Any, dict[str, Any] | None]:
        """The job itself (in the worker)."""
        name, part = self.jobs[job]
        inputs, seed = self.prepared[name]
        module = stage_module(name)
        if part is None:
            return module.run(self.cfg, inputs, seed=seed, runtime=runtime), runtime.placement
        return module.run_part(self.cfg, inputs, part, seed=seed, runtime=runtime), runtime.placement

    def done(self, d: stage_workers.Done) -> None:
        """A job is back: its stage is recorded once every part is (or recorded failed)."""
        name, part = self.jobs[d.name]
        log.debug("job %s back after %.1f s of work", d.name, d.seconds)
        if name not in self.prepared:  # another part of it failed: the stage is recorded failed already
            return
        try:
            if d.error is not None:
                raise d.error
            arrived = self.arrived.setdefault(name, {})
            arrived[part] = d
            if len(arrived) < len(stage_parts(self.cfg, name)):
                return
            seconds = _record(self.cfg, self.run, name, arrived, seed=self.prepared.pop(name)[1])
        except BaseException as exc:
            self.prepared.pop(name, None)
            self.errors.append(_failure(self.run, name, exc))
            return
        _finish(self.run, name, self.names, seconds)

    def fail_begun(self, reason: str) -> None:
        """Record every stage begun and not recorded as failed (``reason``)."""
        for name in self.prepared:
            self.run.fail_stage(name, reason)
        self.prepared.clear()


def _run_group(
    cfg: Config,
    run: RunDir,
    jobs: dict[str, tuple[str, str | None]],
    outputs: dict[str, Any],
    *,
    n_workers: int,
    names: list[str],
    first: str | None = None,
    progress: bool = False,
) -> None:
    """Run ``jobs`` (:func:`_jobs` of independent stages) in forked workers; a stage is recorded once all its
    parts are back (its module's ``combine``). The first failure is raised once all have ended.

    ``first`` (the train stage) runs here before them, part by part (:func:`_run_one`): once a model is
    trained, that model's jobs start at once on the CPUs the next model's training leaves idle
    (``Pool.start_early``); they see the train stage's output of the models trained so far.

    The stage after the group prepares here (its module's optional ``prepare(cfg)``: imports) once the last jobs
    have started and a CPU is free.
    """
    group = list(dict.fromkeys(name for name, _ in jobs.values()))
    early = f", {'/'.join(stage_parts(cfg, first)[:-1])} jobs during {first}" if first else ""
    log.info("stages %s: %d jobs, %d at once in worker processes%s", ",".join(group), len(jobs), n_workers, early)
    book = _Group(cfg, run, jobs, outputs, names)
    last = max(names.index(name) for name in group)
    then = names[last + 1] if last + 1 < len(names) else None
    try:
        with stage_workers.Pool(
            n_workers=n_workers,
            job=book.work,
            # No run-directory writers in a worker (checkpoints stay in its memory): only the runner writes the run.
            runtime_of=lambda job: Runtime(checkpoint_every_s=cfg.train.checkpoint_every_s),
            on_start=book.start,
            on_done=book.done,
        ) as pool:
            if first is not None:
                _train_first(book, pool, first, progress=progress)
            pool.run([job for job in jobs if job not in book.started], on_idle=lambda: _prepare(cfg, then))
    except BaseException as exc:  # SIGTERM, Ctrl-C: the workers are gone; so are the stages they ran
        for name in list(book.prepared):
            _failure(run, name, exc)
        raise
    # begun, but a part was never started after another stage failed
    book.fail_begun("not finished: the run stopped at the first failed stage")
    if book.errors:
        raise book.errors[0]


def _train_first(book: _Group, pool: stage_workers.Pool, first: str, *, progress: bool) -> None:
    """Run stage ``first`` (train) here, part by part; each trained model's jobs start in the pool at once."""

    def trained(part: str) -> None:
        pool.start_early([job for job, (_, p) in book.jobs.items() if p == part])

    try:
        _run_one(book.cfg, book.run, first, book.outputs, names=book.names, progress=progress, each=trained)
    except BaseException:
        # begun early; their workers are killed as the pool closes
        book.fail_begun(f"not finished: the run stopped at the failed stage {first!r}")
        raise
    for inputs, _ in book.prepared.values():  # begun early, with the models trained then: now all of them
        inputs[first] = book.outputs[first]


def _record(cfg: Config, run: RunDir, name: str, parts: dict[str | None, stage_workers.Done], *, seed: int) -> float:
    """Write stage ``name`` from its parts' outputs (combined by its module) and mark it complete; its seconds
    (the parts' total, each timed in its worker: what the stage took in one process)."""
    module, order = stage_module(name), stage_parts(cfg, name)
    out = parts[None].output if order == (None,) else module.combine(cfg, {p: parts[p].output for p in order})
    seconds = sum(d.seconds for d in parts.values())
    run.complete_stage(name, module.dump(out), seed=seed, seconds=seconds, device=parts[order[0]].placement)
    return seconds


def _disk_full_stage(run: RunDir, name: str, what: str) -> DiskFullError:
    """Mark stage ``name`` failed after the disk filled up (if the manifest can still be saved); the one-line error.

    Every write is atomic, so what the disk refused left no partial file; the stage is not complete and a
    resume runs it again.
    """
    try:
        run.fail_stage(name, what)
        state = "is marked failed"
    except OSError:  # the manifest could not be saved either: it still says "running", which resumes the same way
        state = "stays marked running"
    return DiskFullError(
        f"{what}; stage {name!r} {state} and can be resumed: free space, then `python -m pipeline --run-dir {run.path}`"
    )


def resume_stages(run: RunDir) -> list[str]:
    """The stages a plain resume runs: from the first one not complete to the end (else the last one again).

    Stages after it are re-run even when complete: they may have been computed from outputs that the
    unfinished stage is about to replace (a failed ``--stages`` re-run keeps the later stages' files).
    """
    order = list(STAGES)
    first = next((i for i, name in enumerate(order) if run.stage_status(name) != "complete"), None)
    return order[first:] if first is not None else order[-1:]


def stage_runtime(
    cfg: Config, run: RunDir, name: str, *, seed: int, progress: bool = False, followers: Any = None
) -> Runtime:
    """The run-time services stage ``name`` gets: progress display, checkpoints and ledgers in ``run``, and
    (rank 0 of a multi-process training) the other ranks."""

    def record_ledger(path: Path) -> None:
        run.record_ledger(path.resolve().relative_to(run.path.resolve()).as_posix(), stage=name, seed=seed)

    def record_checkpoint(path: Path) -> None:
        rel = path.resolve().relative_to(run.path.resolve()).as_posix()
        run.record_server_checkpoint(rel, stage=name, seed=seed)

    return Runtime(
        progress=progress,
        checkpoint_every_s=cfg.train.checkpoint_every_s,
        save_bytes=lambda rel, data: _save_intermediate(run, rel, data, name, seed),
        load_bytes=lambda rel: _load_intermediate(run, rel),
        ledger_dir=(run.path / LEDGER_DIR).resolve(),  # absolute: the clients run in other folders
        record_ledger=record_ledger,
        server_checkpoint_dir=(run.path / SERVER_CHECKPOINT_DIR).resolve(),  # the ServerApp writes it there itself
        record_checkpoint=record_checkpoint,
        followers=followers,
    )


def _save_intermediate(run: RunDir, rel: str, data: bytes, stage: str, seed: int) -> None:
    run.replace_checkpoint(rel, data, stage=stage, seed=seed)


def _load_intermediate(run: RunDir, rel: str) -> bytes | None:
    if rel not in run.manifest["artifacts"]:
        return None
    return run.read(rel)
