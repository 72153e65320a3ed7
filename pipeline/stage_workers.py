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

Not used (the stages then run one after another in the runner's process): with ``stages.workers=1``, for a
single job (a stage alone that has no parts), where ``fork`` is unavailable or unsafe (not Linux; CUDA initialised in the runner, which a
forked child cannot use; another thread running in the runner, whose locks a child would inherit held), and
under a multi-process training (``train.processes``). Every child dies with the runner
(``PR_SET_PDEATHSIG``), also after ``kill -9``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
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


def run_concurrently(
    names: list[str],
    *,
    n_workers: int,
    job: Callable[[str, Runtime], tuple[Any, dict[str, Any] | None]],
    runtime_of: Callable[[str], Runtime],
    on_start: Callable[[str], None],
    on_done: Callable[[Done], None],
) -> None:
    """Run ``job(name, runtime)`` for every job in ``names`` in forked children, at most ``n_workers`` at once.

    ``on_start`` runs in this process before a child is forked, ``on_done`` when its result arrives (in order
    of arrival). After a job fails, no further job starts; those already running finish and are handed
    to ``on_done`` (their results are valid). Children still running when this returns or raises (SIGTERM,
    Ctrl-C) are killed.
    """
    ctx = mp.get_context("fork")
    share = max(1, cpus() // n_workers)
    pending = list(names)
    running: dict[Connection, tuple[str, Any]] = {}
    failed = False
    try:
        while running or (pending and not failed):
            while pending and not failed and len(running) < n_workers:
                name = pending.pop(0)
                on_start(name)
                receive, send = ctx.Pipe(duplex=False)
                child = ctx.Process(target=_child, args=(send, name, job, runtime_of(name), share), name=f"job {name}")
                # A signal handled while fork runs its at-fork hooks (logging's lock) is lost ("Exception
                # ignored"): SIGTERM and SIGINT wait until the child exists, then arrive here as usual.
                signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
                try:
                    child.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)
                send.close()  # the child holds the sending end: EOF here once it is gone
                running[receive] = (name, child)
            for conn in wait(list(running)):
                name, child = running.pop(conn)  # type: ignore[index]
                done = _receive(conn, name, child)
                failed = failed or done.error is not None
                on_done(done)
    finally:
        for conn, (_, child) in running.items():
            child.kill()
            child.join()
            conn.close()


def _receive(conn: Connection, name: str, child: Any) -> Done:
    try:
        done = pickle.loads(conn.recv_bytes())  # from our own forked child (see _child)
    except EOFError:  # it died without a word (killed, out of memory)
        child.join()
        done = Done(name, error=RuntimeError(f"the worker of {describe(name)} died (exit code {child.exitcode})"))
    conn.close()
    child.join()
    return done


def _child(
    conn: Connection,
    name: str,
    job: Callable[[str, Runtime], tuple[Any, dict[str, Any] | None]],
    runtime: Runtime,
    share: int,
) -> None:
    from auditml_core.distributed import die_with_parent  # torch: loaded already (the stages use it)

    global _share
    _share = share

    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)  # blocked by the runner around the fork
    _renew_torch_thread_pool()
    t0 = time.perf_counter()
    try:
        output, placement = job(name, runtime)
        done = Done(name, output=output, placement=placement, seconds=time.perf_counter() - t0)
    except BaseException as exc:  # handed to the runner, which records and raises it as in one process
        if not isinstance(exc, (UserError, KeyboardInterrupt)):  # a bug: keep where it happened
            exc.add_note(f"(in the worker process of {describe(name)})\n" + "".join(traceback.format_exception(exc)))
        done = Done(name, error=_portable(exc))
    # Plain pickle, not multiprocessing's: torch's reductions for that one pass tensors as shared-memory handles
    # that the receiver fetches from this process, which exits once the bytes are sent.
    try:
        data = pickle.dumps(done)
    except Exception as exc:  # an output that does not pickle: a bug, named as such rather than a silent death
        data = pickle.dumps(Done(name, error=RuntimeError(f"{describe(name)} could not hand back its output: {exc!r}")))
    conn.send_bytes(data)
    conn.close()


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
