"""Central training across processes (``train.processes=N``) and hosts (``torchrun``): who does what.

- ``python -m pipeline train.processes=N ...`` (not itself under a launcher) runs torch's elastic
  launcher in this process (:func:`launch`, ``torch.distributed.run --standalone``): N ranks on this
  host, each ``python -m pipeline`` with the same arguments. Across hosts, the user starts
  ``torchrun --nnodes H --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m pipeline ...``
  on every host instead (docs/distributed.md).
- Rank 0, the leader, runs the pipeline as one process would: it alone reads and writes the run
  directory (config, manifest, checkpoints) and runs every stage. In the train stage it sends each
  model's training to the other ranks as an order (:class:`Order`: model spec and starting weights,
  fit settings, the checkpoint to resume from, the training split) and trains its own part of it;
  when the train stage ends, or the run fails before an order, it releases them.
- Every other rank, a follower (:func:`follow`), writes nothing and reads no file: it joins the
  process group, trains the orders it is sent and exits when released. So a host needs neither the
  data nor the run directory, only this code.

Faults: the launcher stops every rank when one dies and names it (:func:`failure_message`); a rank
whose peer died gets :class:`auditml_core.distributed.RankLostError` from its next collective; every
rank asks the kernel to kill it if its launcher dies (:func:`auditml_core.distributed.die_with_parent`).
A run that failed resumes with ``--run-dir`` from rank 0's last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from auditml_core import models, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.distributed import RankLostError, World
from auditml_core.errors import ConfigError, PrivacyBudgetError, TrainingDivergedError, UserError

log = logging.getLogger(__name__)
RUN_NOTE = "AUDITML_RUN_DIR_NOTE"  # environment: a file where rank 0 notes its run directory for the launcher


@dataclass(frozen=True)
class Order:
    """One model's training, as rank 0 sends it to the other ranks (the training split follows as tensors)."""

    name: str
    spec: Mapping[str, Any]  # model spec (auditml_core.models.build)
    initial_state: Mapping[str, torch.Tensor]  # the weights training starts from (after public pretraining)
    task: str
    fit_cfg: FitConfig
    dp: DPConfig
    device_type: str  # "cpu" or "cuda": each rank trains on its own GPU (auditml_core.distributed.World.device)
    seed: int
    patience: int
    resume: bytes | None  # checkpoint bytes to resume from (rank 0 read them from the run directory)
    num_threads: int = 1  # torch CPU threads of each rank (train.num_threads)


@dataclass(frozen=True)
class Release:
    """The end of the ranks' work: the train stage is over, or the run failed before it trained."""

    ok: bool


class Followers:
    """Rank 0's link to the other ranks: send orders, then release them (once)."""

    def __init__(self, world: World):
        self.world = world
        self.busy = False  # inside an order: the others are in training's collectives, not waiting for a message
        self.released = False

    def train(self, order: Order, *, x_train: np.ndarray, y_train: np.ndarray) -> None:
        """Send ``order`` and the training split; rank 0 then calls ``fit`` with the same arguments.

        Raises
        ------
        ConfigError
            On CUDA, when this host has fewer GPUs than ranks (one GPU per rank), before anything is sent.
        """
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if order.device_type == "cuda" and torch.cuda.device_count() < local_ranks:
            raise ConfigError(
                f"{local_ranks} ranks on this host but {torch.cuda.device_count()} CUDA device(s): each rank trains on "
                "a GPU of its own; start at most one rank per GPU (train.processes, --nproc-per-node) or set "
                "train.device=cpu"
            )
        self.world.broadcast(order)
        self.world.broadcast_arrays({"x": x_train, "y": y_train})
        self.busy = True

    def trained(self) -> None:
        """Rank 0's ``fit`` of the last order returned (every rank's did: it ends with a collective)."""
        self.busy = False

    def release(self, *, ok: bool) -> None:
        """Let the other ranks exit. Mid-order (a failure inside training) they are not waiting for a
        message: leaving the process group ends their collectives instead."""
        if self.released:
            return
        self.released = True
        settled = False
        if not self.busy:
            try:
                self.world.broadcast(Release(ok))
                settled = True  # every follower leaves through the same barrier (follow)
            except RankLostError:
                pass  # they are gone already
        self.world.close(settled=settled)


def follow(world: World) -> int:
    """A follower's whole life: train every order rank 0 sends until it is released. Writes no file.

    Returns the process exit code: 0, also when the failure is one rank 0 reports itself (a shared
    decision such as divergence, or its run failing); 1 when this rank lost a peer.
    """
    logging.getLogger().setLevel(logging.ERROR)  # rank 0 tells the story (and warns once)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher stops us: at once, even inside a collective
    try:
        while True:
            message = world.broadcast()
            if isinstance(message, Release):
                world.close(settled=True)  # meets rank 0's barrier (Followers.release)
                return 0
            arrays = world.broadcast_arrays(None)
            _train(world, message, arrays)
    except RankLostError as exc:
        print(f"error (rank {world.rank}): {exc}", file=sys.stderr)
        return 1
    except (TrainingDivergedError, PrivacyBudgetError):
        return 0  # every rank reached the same verdict; rank 0 reports it and fails the stage
    except UserError as exc:
        print(f"error (rank {world.rank}): {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        world.close()


def _train(world: World, order: Order, arrays: Mapping[str, np.ndarray]) -> None:
    # rank 0's threads and allocator settings (resolve_device): without them a follower's steps came back to
    # fresh pages of memory and it set the pace of every rank (2-process efficiency 0.58, measured)
    training.resolve_device(order.device_type, num_threads=order.num_threads)
    model = models.build(order.spec)
    model.load_state_dict(dict(order.initial_state))
    training.fit(
        model,
        x_train=arrays["x"],
        y_train=arrays["y"],
        x_val=None,  # rank 0 validates
        y_val=None,
        task=order.task,
        fit_cfg=order.fit_cfg,
        dp=order.dp,
        device=world.device(order.device_type),
        seed=order.seed,
        patience=order.patience,
        resume=training.read_checkpoint(order.resume) if order.resume is not None else None,
        desc=f"{order.name} (rank {world.rank})",
        world=world,
    )


def launched_here() -> bool:
    """Whether this rank was started by :func:`launch` (``train.processes``), not by a torchrun of the user's."""
    return RUN_NOTE in os.environ


def note_run_dir(path: Path) -> None:
    """Rank 0: tell the launcher (``train.processes``) where the run directory is, for its resume hint."""
    note = os.environ.get(RUN_NOTE)
    if note:
        Path(note).write_text(str(path))


def launch(argv: list[str], *, processes: int, num_threads: int) -> int:
    """Run ``python -m pipeline ARGV`` as ``processes`` ranks on this host with torch's elastic launcher.

    Returns the exit code: 0, or non-zero with one line on stderr naming the rank that failed
    (a rank's own error, such as a bad config, is printed by that rank).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))  # else the launcher sets 1 and says so
    with tempfile.NamedTemporaryFile(prefix="auditml-run-", suffix=".txt") as note:
        os.environ[RUN_NOTE] = note.name
        args = get_args_parser().parse_args(
            ["--standalone", f"--nproc-per-node={processes}", "--max-restarts=0", "-m", "pipeline", *argv]
        )
        try:
            run(args)
        except ChildFailedError as exc:
            run_dir = Path(note.name).read_text().strip()
            message, code = failure_message(exc, run_dir=run_dir)
            if message:
                print(f"error: {message}", file=sys.stderr)
            return code
        finally:
            os.environ.pop(RUN_NOTE, None)
    return 0


def failure_message(exc: Any, *, run_dir: str) -> tuple[str, int]:
    """One line naming the rank that failed first (and how), and the exit code for the launcher.

    A rank 0 that exited with a user error's code (2) has printed its own one-line error: nothing
    is added then.
    """
    rank, failure = exc.get_first_failure()
    resume = f"; resume with: python -m pipeline --run-dir {run_dir}" if run_dir else ""
    if failure.exitcode < 0:
        what = f"was killed by {failure.signal_name()}"
    elif rank == 0 and failure.exitcode == 2:
        return "", 2
    else:
        what = f"exited with code {failure.exitcode} (its error is above)"
    others = sorted(r for r in exc.failures if r != rank)
    stopped = f"; ranks {', '.join(map(str, others))} were stopped" if others else ""
    return f"rank {rank} (pid {failure.pid}) {what}{stopped}{resume}", 1
