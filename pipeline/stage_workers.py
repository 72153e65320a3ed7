"""Stages that read only what training recorded run side by side, in forked worker processes.

Once the data and the trained models are recorded, evaluate, explain, distill and audit depend on nothing but
them: their outputs are pure functions of (config, inputs, stage seed), which the resume tests already rely on
(a stage resumed alone gives the same bytes as one run after its predecessors). On a machine with several CPUs
the runner therefore runs them at once as jobs: one per stage, or one per model for a stage whose module has
``parts`` (explain, distill and audit: ``run_part`` per model, ``combine`` to the stage output, which is what
their ``run`` does in one process). Each job runs in a child forked from the runner (multiprocessing's
``fork`` context, as torch's DataLoader workers are: the child shares the loaded libraries and the in-memory
inputs, without re-importing or re-reading anything) and hands its output back through a pipe; the runner
combines a stage's parts and writes its files. Only the runner writes the run directory, so the manifest
keeps one writer and a stage is marked complete only once its files are written, exactly as in one process.
A model's jobs may also start before the next model is trained (:meth:`Pool.start_early`): the runner trains
the models one after another itself, and the CPUs its training leaves idle run the trained ones' jobs.

Not used (the stages then run one after another in the runner's process): with ``stages.workers=1``, for a
single job (a stage alone that has no parts), where ``fork`` is unavailable or unsafe (not Linux; CUDA initialised in the runner, which a
forked child cannot use; another thread running in the runner, whose locks a child would inherit held), and
under a multi-process training (``train.processes``). Every child dies with the runner
(``PR_SET_PDEATHSIG``), also after ``kill -9``.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from auditml_core.config import Config
from auditml_core.errors import UserError
from auditml_core.runtime import Runtime

_DEFERRED = {signal.SIGTERM, signal.SIGINT}  # signals held back while a worker is forked
_share: int | None = None  # in a worker: the CPUs it may keep busy (the runner's, divided among the workers)


def cpus() -> int:
    """CPUs this process may keep busy: in a worker, its share of the runner's; else every CPU it may use.

    The audit trains its shadows this many at a time: two workers on two cores each training two at once would
    run four trainings on two cores, each slowing the others (measured: explain's CNN part 8 s alone, 16.6 s
    beside an audit that trained two shadows at once).
    """
    return _share or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclass
class Done:
    """What a worker hands back: its job's output, placement and seconds, or the exception it raised."""

    name: str  # the job: "stage" or "stage:part"
    output: Any = None
    placement: dict[str, Any] | None = None
    seconds: float = 0.0
    error: BaseException | None = None


def no_tqdm_monitor() -> None:
    """Keep tqdm from starting its monitor thread in this process (for every later bar).

    tqdm starts that thread with its first bar and keeps it for the life of the process (tqdm 4.70), and
    :func:`workers` forks nothing beside a second thread: a run in a terminal (progress bars on) ran every stage
    one after another, measured. The thread only makes a stalled bar redraw less often.
    """
    from tqdm import std

    std.tqdm.monitor_interval = 0


def workers(cfg: Config, n_jobs: int) -> int:
    """How many workers run ``n_jobs`` independent jobs (stages or their parts) at once (1 = in this process, one
    after another)."""
    if cfg.stages.workers == 1 or n_jobs < 2 or cfg.train.processes > 1:
        return 1
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return 1
    if threading.active_count() > 1:  # fork copies only this thread: a lock another one holds would stay held
        return 1
    torch = sys.modules.get("torch")  # not imported: no CUDA context either
    if torch is not None and torch.cuda.is_initialized():  # a forked child cannot use the CUDA context it inherits
        return 1
    limit = cfg.stages.workers or len(os.sched_getaffinity(0))
    return max(1, min(limit, n_jobs))


class Pool:
    """Jobs in forked children: ``job(name, runtime)`` runs in the child; its :class:`Done` arrives in this process.

    ``on_start`` runs here before a job's child is forked, ``on_done`` when its result arrives (in order of
    arrival). Used as a context manager: children still running when it closes (an error, SIGTERM, Ctrl-C) are
    killed.
    """

    def __init__(
        self,
        *,
        n_workers: int,
        job: Callable[[str, Runtime], tuple[Any, dict[str, Any] | None]],
        runtime_of: Callable[[str], Runtime],
        on_start: Callable[[str], None],
        on_done: Callable[[Done], None],
    ) -> None:
        self.n_workers, self.job, self.runtime_of = n_workers, job, runtime_of
        self.on_start, self.on_done = on_start, on_done
        self.share = max(1, cpus() // n_workers)
        self.running: dict[Connection, tuple[list[str], Any]] = {}  # each child's jobs not yet back, in order
        self.failed = False

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        for conn, (_, child) in self.running.items():
            child.kill()
            child.join()
            conn.close()
        self.running.clear()

    def start_early(self, names: list[str]) -> None:
        """Start ``names`` now, while this process goes on with one job of its own (the runner trains the next
        model): in ``n_workers - 1`` children at most, each running its share one after another, so that with this
        process they keep ``n_workers`` CPUs busy and no more (their times stay what they would be alone)."""
        lanes = max(1, min(len(names), self.n_workers - 1))
        for k in range(lanes):
            self._fork(names[k::lanes])

    def run(self, names: list[str], *, on_idle: Callable[[], None] | None = None) -> None:
        """Run ``names`` at most ``n_workers`` children at once (those started early count), and wait for every
        child. After a job fails, no further job starts; those already running finish and are handed to
        ``on_done``. ``on_idle`` runs here once, when every job has started and a CPU is free (no fork follows)."""
        pending = list(names)
        while self.running or (pending and not self.failed):
            while pending and not self.failed and len(self.running) < self.n_workers:
                self._fork([pending.pop(0)])
            if on_idle is not None and not pending and len(self.running) < self.n_workers:
                on_idle()
                on_idle = None
            for conn in wait(list(self.running)):
                todo, child = self.running[conn]  # type: ignore[index]
                done = _receive(conn, todo[0], child)
                del todo[0]
                if not todo or done.error is not None:  # its last job, or it stopped at a failure
                    del self.running[conn]  # type: ignore[arg-type]
                    conn.close()
                    child.join()
                self.failed = self.failed or done.error is not None
                self.on_done(done)

    def _fork(self, names: list[str]) -> None:
        for name in names:
            self.on_start(name)
        # Python's advice for fork without exec: the child's collector then never walks (and so never copies, page
        # by page) the runner's objects it inherits; the runner's :func:`pipeline.runner.run_stages` unfreezes them.
        gc.freeze()
        ctx = mp.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        args = (send, names, self.job, [self.runtime_of(name) for name in names], self.share)
        child = ctx.Process(target=_child, args=args, name=f"job {'+'.join(names)}")
        # A signal handled while fork runs its at-fork hooks (logging's lock) is lost ("Exception
        # ignored"): SIGTERM and SIGINT wait until the child exists, then arrive here as usual.
        signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        try:
            child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)
        send.close()  # the child holds the sending end: EOF here once it is gone
        self.running[receive] = (list(names), child)


def _receive(conn: Connection, name: str, child: Any) -> Done:
    """The next result from ``child``: job ``name``'s."""
    try:
        return pickle.loads(conn.recv_bytes())  # from our own forked child (see _child)
    except EOFError:  # it died without a word (killed, out of memory)
        child.join()
        return Done(name, error=RuntimeError(f"the worker of {describe(name)} died (exit code {child.exitcode})"))


def _child(
    conn: Connection,
    names: list[str],
    job: Callable[[str, Runtime], tuple[Any, dict[str, Any] | None]],
    runtimes: list[Runtime],
    share: int,
) -> None:
    from auditml_core.distributed import die_with_parent  # torch: loaded already (the stages use it)

    global _share
    _share = share

    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)  # blocked by the runner around the fork
    _renew_torch_thread_pool()
    # Results go out from a thread: the runner may read them only once its own training is over, and a job's
    # bytes fill the pipe; the next job must not wait for that.
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_send_all, args=(conn, outbox), name="results", daemon=True)
    sender.start()
    for name, runtime in zip(names, runtimes):
        data, failed = _pickled(_run_job(name, job, runtime))
        outbox.put(data)
        if failed:  # the runner starts nothing after a failure, and stops reading from this child
            break
    outbox.put(None)
    sender.join()
    conn.close()


def _run_job(name: str, job: Callable[[str, Runtime], tuple[Any, dict[str, Any] | None]], runtime: Runtime) -> Done:
    t0 = time.perf_counter()
    try:
        output, placement = job(name, runtime)
        return Done(name, output=output, placement=placement, seconds=time.perf_counter() - t0)
    except BaseException as exc:  # handed to the runner, which records and raises it as in one process
        if not isinstance(exc, (UserError, KeyboardInterrupt)):  # a bug: keep where it happened
            exc.add_note(f"(in the worker process of {describe(name)})\n" + "".join(traceback.format_exception(exc)))
        return Done(name, error=_portable(exc))


def _pickled(done: Done) -> tuple[bytes, bool]:
    """``done`` as bytes, and whether it reports a failure.

    Plain pickle, not multiprocessing's: torch's reductions for that one pass tensors as shared-memory handles
    that the receiver fetches from this process, which exits once the bytes are sent."""
    try:
        return pickle.dumps(done), done.error is not None
    except Exception as exc:  # an output that does not pickle: a bug, named as such rather than a silent death
        message = f"{describe(done.name)} could not hand back its output: {exc!r}"
        return pickle.dumps(Done(done.name, error=RuntimeError(message))), True


def _send_all(conn: Connection, outbox: "queue.SimpleQueue[bytes | None]") -> None:
    while (data := outbox.get()) is not None:
        conn.send_bytes(data)


def describe(job: str) -> str:
    """A job in words: ``"audit:cnn"`` -> "stage 'audit' (cnn)"."""
    stage, _, part = job.partition(":")
    return f"stage {stage!r}" + (f" ({part})" if part else "")


def _renew_torch_thread_pool() -> None:
    """Let this one thread re-create torch's intra-op thread pool, which fork marks corrupt in the child.

    The first call that needs the pool re-creates it; each thread's first parallel op makes one. If two threads
    of a stage make it at once (the audit trains its shadows in threads), one can find no pool at all: "pool
    INTERNAL ASSERT FAILED at ParallelOpenMP.cpp:64 ... Invalid thread pool!", seen once in the slow tier, inside
    a shadow thread's ``mask.nonzero()``. Making the call here, before the stage starts any thread, removes the race.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch.get_num_threads())


def _portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it survives pickling (the project's errors do), else a RuntimeError with its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}\n" + "\n".join(getattr(exc, "__notes__", [])))
