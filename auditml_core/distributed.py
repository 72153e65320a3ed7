"""Training across processes and hosts on ``torch.distributed``: the world a rank lives in, and its collectives.

torch's elastic launcher (``torchrun`` / ``torch.distributed.run``) starts the ranks and gives each its
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and rendezvous address in the environment; :func:`join` joins
the process group they name: gloo for CPU tensors and, where CUDA is present, NCCL for CUDA tensors
(one GPU per local rank), plus a gloo group for the Python objects rank 0 sends the others.

What the ranks share in :func:`auditml_core.training.fit` (``world=``):

- without DP, every rank draws the same seeded order of the whole training set; each global batch is
  cut into one contiguous share per rank (:func:`share`), and after the backward pass the gradients
  are summed across ranks with weights ``n_rank / n_batch`` (:class:`GradientShare`): every rank steps
  with the gradient of the global batch's mean loss, as one process would;
- with DP, :mod:`auditml_core.privacy.dp_ranks` (each record in one rank's shard, noise added once).

Why not ``torch.nn.parallel.DistributedDataParallel``: it all-reduces ``p.grad`` during the backward
pass, which under DP would be the unclipped gradients, and it needs every rank to run a backward pass
at every step (an empty Poisson batch has none). One all-reduce of the flattened gradients before the
optimizer's step serves both paths; for these models it is a single small message per step.

A collective that fails because a peer is gone raises :class:`RankLostError`, naming the ranks of
this host that are no longer alive (every rank publishes its host and PID when it joins); a rank on
another host is named by that host's launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from auditml_core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# How long a rank waits in one collective (rank 0 sends the first order only after its data stage and
# public pretraining). A rank that dies is noticed at once (its connections close), not after this.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SETTLE_TIMEOUT = dt.timedelta(seconds=60)  # the barrier before leaving, when every rank ends normally
LOST_WAIT_S = 3.0  # how long a rank whose collective failed waits to see which local peer died


class RankLostError(UserError):
    """A rank of the training stopped (killed, crashed); the collective every other rank was in failed."""

    exit_code = 1


def launched() -> bool:
    """Whether this process is a rank of a torchrun job with more than one rank (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this rank when its launcher dies (Linux; a no-op elsewhere).

    torch's elastic agent starts each rank in a session of its own and stops the ranks itself when
    one fails; when the agent itself is killed (``kill -9``) nothing would stop them: this closes
    that gap (the ``prctl(PR_SET_PDEATHSIG)`` that :mod:`federated.launch.processes` gives its children).
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class World:
    """This rank's place in a torch.distributed job, and the collectives training uses.

    Built by :func:`join`; a rank's collectives must be called by every rank in the same order.
    """

    rank: int
    size: int
    local_rank: int
    control: Any = None  # gloo process group for Python objects and CPU tensors
    peers: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (host, pid), as published at join

    @property
    def leader(self) -> bool:
        """Rank 0: the one rank that reads and writes the run directory."""
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """The device of this rank for ``device_type``: its own GPU (``cuda:LOCAL_RANK``) or the CPU.

        Raises
        ------
        ConfigError
            If this host has fewer GPUs than local ranks.
        """
        if device_type != "cuda":
            return torch.device("cpu")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {self.rank} is local rank {self.local_rank} but this host has {torch.cuda.device_count()} CUDA "
                "device(s): start at most one rank per GPU (--nproc-per-node / train.processes) or set train.device=cpu"
            )
        return torch.device("cuda", self.local_rank)

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            raise RankLostError(self.lost_message(what, exc)) from None

    def lost_message(self, what: str, exc: BaseException) -> str:
        """One line: which rank is gone (when this host can tell) and how to resume.

        A peer's connections close while it is still exiting: a local peer's death is awaited for up
        to :data:`LOST_WAIT_S` before the message is written.
        """
        host = socket.gethostname()
        local = {r: pid for r, (h, pid) in sorted(self.peers.items()) if h == host and r != self.rank}
        deadline = time.monotonic() + LOST_WAIT_S
        gone = [r for r, pid in local.items() if not _alive(pid)]
        while not gone and local and time.monotonic() < deadline:
            time.sleep(0.05)
            gone = [r for r, pid in local.items() if not _alive(pid)]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:160]  # drop gloo's source line
        who = (
            ", ".join(f"rank {r} (pid {local[r]})" for r in gone) + " died"
            if gone
            else "a rank on another host stopped (its host's torchrun names it)"
            if any(h != host for h, _ in self.peers.values())
            else "a peer rank stopped"
        )
        return (
            f"training across {self.size} ranks failed in {what} on rank {self.rank}: {who} ({reason}); "
            "resume with --run-dir"
        )

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; the ranks trust each other, as torch.distributed does)."""
        box = [obj if self.leader else None]
        with self._collective("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_arrays(self, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Rank 0's numpy arrays on every rank, sent as tensors (no pickled copy of the data)."""
        meta = self.broadcast(
            {k: (v.shape, v.dtype.str) for k, v in arrays.items()} if self.leader and arrays else None
        )
        out = {}
        for key, (shape, dtype) in meta.items():
            if self.leader:
                tensor = torch.from_numpy(np.ascontiguousarray(arrays[key]))  # type: ignore[index]
            else:
                tensor = torch.from_numpy(np.empty(shape, dtype=np.dtype(dtype)))
            with self._collective("sending the training data"):
                dist.broadcast(
                    tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor, src=0, group=self.control
                )
            out[key] = tensor.numpy()
        return out

    def all_reduce_(self, tensor: torch.Tensor, *, what: str = "the gradient sum") -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (NCCL for CUDA tensors, gloo for CPU ones)."""
        with self._collective(what):
            dist.all_reduce(tensor, group=None if tensor.is_cuda else self.control)
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the others."""
        out: list[Any] | None = [None] * self.size if self.leader else None
        with self._collective("a gather to rank 0"):
            dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def close(self, *, settled: bool = False) -> None:
        """Leave the process group (every rank, at the end; a second call does nothing).

        ``settled``: every rank reached this point on the same normal path. The ranks then meet at a
        barrier first, so that none tears down its gloo connections while a peer's last message is
        still in flight (a rank doing so aborts with "terminate called without an active exception",
        seen once in CI after a gather). After a failure no barrier is attempted: a peer may be gone.
        """
        if not dist.is_initialized():
            return
        if settled:
            with contextlib.suppress(RuntimeError, dist.DistError):
                dist.monitored_barrier(group=self.control, timeout=SETTLE_TIMEOUT)
        dist.destroy_process_group()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def join() -> World:
    """Join the process group torchrun's environment names; publish this rank's host and PID to the others.

    Backend: gloo, and where CUDA is present ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors), with each
    rank's current CUDA device its local rank's GPU (when there are that many).
    """
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if cuda else None
    world = World(rank=rank, size=size, local_rank=local_rank, control=control)
    peers: list[Any] = [None] * size
    with world._collective("joining the process group"):
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=control)
    world.peers = {r: (str(h), int(p)) for r, (h, p) in enumerate(peers)}
    log.debug("rank %d of %d joined (local rank %d)", rank, size, local_rank)
    return world


def share(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous share of a global batch of indices (sizes differ by at most one)."""
    return torch.tensor_split(batch, world.size)[world.rank]


class GradientShare:
    """Non-DP training: after backward, every rank's gradient becomes the global batch's mean-loss gradient.

    Each rank's loss is the mean over its share of ``n_rank`` rows of an ``n_batch``-row global batch;
    weighting its gradient by ``n_rank / n_batch`` and summing over the ranks gives the gradient of the
    mean over all ``n_batch`` rows, also when the shares differ in size (or one is empty). The weight of
    the next step is set by the batch loop (:meth:`set_batch`); :meth:`hook` is an optimizer step pre-hook.
    """

    def __init__(self, model: torch.nn.Module, world: World):
        self.world = world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.weight = 1.0 / world.size

    def set_batch(self, n_rank: int, n_batch: int) -> None:
        """The share sizes of the step about to run."""
        self.weight = n_rank / n_batch if n_batch else 0.0

    def hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Sum the weighted gradients over the ranks (one flattened all-reduce), in place."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]) * self.weight
        self.world.all_reduce_(flat)
        for p, g in zip(self.params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)


def sum_over_ranks(world: World, *values: float) -> list[float]:
    """``values`` summed over the ranks (float64), for epoch statistics every rank must agree on."""
    t = torch.tensor(values, dtype=torch.float64)
    world.all_reduce_(t, what="the epoch's loss")
    return [float(v) for v in t]
