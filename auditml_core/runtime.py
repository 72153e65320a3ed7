"""What a stage may need beyond config and inputs: progress display and the checkpoint store."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from auditml_core.artifacts import read_state_dict, state_dict_bytes
from auditml_core.errors import RunDirError
from auditml_core.placement import Placement
from auditml_core.training import Checkpoint, checkpoint_bytes, read_checkpoint


@dataclass
class Runtime:
    """Run-time services the runner gives stages; the defaults make a stage runnable alone (tests)."""

    progress: bool = False  # show progress bars
    save_bytes: Callable[[str, bytes], None] | None = None  # persist an intermediate file (checkpoints)
    load_bytes: Callable[[str], bytes | None] | None = None  # read it back, None when absent
    # A folder where other processes (federated clients) write their privacy ledgers in place, write-ahead:
    # the authority a resumed run reads, never a copy that could lag; None = they keep them in their own scratch.
    ledger_dir: Path | None = None
    record_ledger: Callable[[Path], None] | None = None  # note a ledger file of ledger_dir's in the manifest
    # Likewise the federated server's checkpoint: written in place by the ServerApp after every round (none = it
    # keeps it in its scratch folder), noted in the manifest by record_checkpoint.
    server_checkpoint_dir: Path | None = None
    record_checkpoint: Callable[[Path], None] | None = None
    checkpoint_every_s: float = 5.0  # write a checkpoint at most this often (always after the last epoch)
    placement: dict[str, Any] | None = None  # the stage's device decision (Placement.record), for the manifest
    # Rank 0's link to the other ranks of a multi-process training (pipeline.ranks.Followers); None = one process
    followers: Any = None
    _memory: dict[str, bytes] = field(default_factory=dict)
    _last_save: dict[str, float] = field(default_factory=dict)

    def record_placement(self, placement: Placement) -> None:
        """Note the device the stage runs on and why; the runner writes it into the manifest."""
        self.placement = placement.record()

    def save_checkpoint(self, name: str, ck: Checkpoint) -> None:
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

    def load_checkpoint(self, name: str) -> Checkpoint | None:
        """The last checkpoint of model ``name``, or None."""
        rel = f"checkpoints/{name}.pt"
        data = self.load_bytes(rel) if self.load_bytes is not None else self._memory.get(name)
        if data is None:
            return None
        try:
            return read_checkpoint(data)
        except Exception as exc:  # torch.load(weights_only=True) refuses with several types; all mean "damaged"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RunDirError(
                f"this run directory is damaged: {rel} (not a checkpoint this pipeline wrote: {reason}); "
                "re-run the stage afresh with --from"
            ) from None

    def save_public_pretraining(
        self, name: str, record: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> None:
        """Persist model ``name``'s public pretraining (its record, the weights DP-SGD starts from) before any
        private step, so that a run resumed from a later checkpoint records what a fresh run records."""
        data = state_dict_bytes(state_dict, metadata={"public_pretraining": json.dumps(dict(record))})
        rel = public_pretraining_path(name)
        if self.save_bytes is not None:
            self.save_bytes(rel, data)
        else:
            self._memory[rel] = data

    def load_public_pretraining(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """``(record, weights)`` saved by :meth:`save_public_pretraining`, or None when there was none."""
        rel = public_pretraining_path(name)
        data = self.load_bytes(rel) if self.load_bytes is not None else self._memory.get(rel)
        if data is None:
            return None
        try:
            (size,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then the JSON header
            record = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["public_pretraining"])
            return record, read_state_dict(data)
        except Exception as exc:  # any decoding failure means the file is not what this pipeline wrote
            raise RunDirError(
                f"this run directory is damaged: {rel} (not a public-pretraining record this pipeline wrote: "
                f"{type(exc).__name__}); re-run the stage afresh with --from"
            ) from None


def public_pretraining_path(name: str) -> str:
    """Where model ``name``'s public pretraining (record + weights) waits for a resume (an intermediate file)."""
    return f"checkpoints/{name}_public_pretraining.safetensors"
