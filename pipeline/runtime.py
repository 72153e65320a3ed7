"""What a stage may need beyond config and inputs: progress display, checkpoints, derived seeds."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def derive_seed(root: int, *names: str | int) -> int:
    """A stable 31-bit seed for a named part of the run (stage, model, client) from the root seed."""
    text = "/".join([str(root), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def checkpoint_bytes(ck) -> bytes:
    """Encode a :class:`pipeline.training.Checkpoint` (tensors and plain values only)."""
    buf = io.BytesIO()
    torch.save(dataclasses.asdict(ck), buf)
    return buf.getvalue()


def read_checkpoint(data: bytes):
    """Decode :func:`checkpoint_bytes` output; ``weights_only`` refuses anything but tensors and plain values."""
    from pipeline.training import Checkpoint

    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    state["accountant_history"] = [tuple(h) for h in state["accountant_history"]]
    return Checkpoint(**state)


@dataclass
class Runtime:
    """Run-time services the runner gives stages; the defaults make a stage runnable alone (tests)."""

    progress: bool = False  # show progress bars
    save_bytes: Callable[[str, bytes], None] | None = None  # persist an intermediate file (checkpoints)
    load_bytes: Callable[[str], bytes | None] | None = None  # read it back, None when absent
    checkpoint_every_s: float = 5.0  # write a checkpoint at most this often (always after the last epoch)
    manifest: dict | None = None  # the run directory's manifest, read-only by convention (the report lists its hashes)
    _memory: dict[str, bytes] = field(default_factory=dict)
    _last_save: dict[str, float] = field(default_factory=dict)

    def save_checkpoint(self, name: str, ck) -> None:
        """Persist the training checkpoint of model ``name`` (replacing the previous one), throttled."""
        now = time.monotonic()
        if not ck.done and now - self._last_save.get(name, -1e9) < self.checkpoint_every_s:
            return
        self._last_save[name] = now
        data = checkpoint_bytes(ck)
        if self.save_bytes is not None:
            self.save_bytes(f"checkpoints/{name}.pt", data)
        else:
            self._memory[name] = data

    def load_checkpoint(self, name: str):
        """The last checkpoint of model ``name``, or None."""
        data = self.load_bytes(f"checkpoints/{name}.pt") if self.load_bytes is not None else self._memory.get(name)
        return None if data is None else read_checkpoint(data)
