"""The server's checkpoint: global weights, strategy state and the federation's record, in one file.

One safetensors file per model, rewritten atomically after every completed round:
tensors ``model/<key>`` (the global weights) and ``strategy/<key>`` (e.g. FedAdam's
moments), and the JSON record (round, per-round metrics, per-client ε, failures) in
the file's metadata. Loading it unpickles nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from auditml_core.artifacts import atomic_write

# Run-config keys that may differ between a run and its resume (where files live, fault injection).
RESUME_NEUTRAL = (
    "app.work-dir",
    "app.checkpoint-dir",
    "app.fail-partition",
    "app.fail-round",
    "app.node-wait-s",
    "app.round-timeout-s",
)


@dataclass
class ServerCheckpoint:
    """State after ``record["completed_rounds"]`` rounds."""

    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    record: dict[str, Any]


def fingerprint(run_config: Mapping[str, Any]) -> str:
    """Hash of the settings a resume must share with the run it continues."""
    kept = {k: v for k, v in sorted(run_config.items()) if k not in RESUME_NEUTRAL}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def save(path: Path, ck: ServerCheckpoint) -> None:
    """Write ``ck`` atomically (the previous checkpoint stays valid until the new one is complete)."""
    from safetensors.numpy import save as st_save

    tensors = {f"model/{k}": np.ascontiguousarray(v) for k, v in ck.weights.items()}
    tensors.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in ck.strategy_state.items()})
    atomic_write(path, st_save(tensors, metadata={"record": json.dumps(ck.record, allow_nan=True)}))


def load(path: Path) -> ServerCheckpoint | None:
    """The checkpoint at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        record = json.loads(fh.metadata()["record"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    strategy = {k[len("strategy/") :]: v for k, v in tensors.items() if k.startswith("strategy/")}
    return ServerCheckpoint(weights=weights, strategy_state=strategy, record=record)


def summary(data: bytes) -> dict[str, Any] | None:
    """``completed_rounds`` and ``fingerprint`` of a checkpoint file's bytes, read from its header only (no tensor
    is parsed, nothing is unpickled); None when the bytes are not a checkpoint :func:`save` wrote."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        record = json.loads(header["__metadata__"]["record"])
        return {"completed_rounds": int(record["completed_rounds"]), "fingerprint": str(record["fingerprint"])}
    except (ValueError, KeyError, TypeError):
        return None
