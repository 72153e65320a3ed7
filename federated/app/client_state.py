"""A client's privacy ledger: its accountant history, kept across rounds and resumes.

Two copies, because they survive different things:

- Flower's per-client ``context.state`` lives as long as the Flower run (simulation
  keeps it between rounds, not across a restart);
- a JSON file in the client's own folder survives a crash and a resumed run: it is the authority,
  written in place (atomically, fsynced) where a resumed run reads it — the pipeline's run
  directory (``app.ledger-dir``) or, per site, the site's ``ledger-path`` — never copied there later.

On reading, the longer history wins: a round whose spend reached one copy but not the
other was still spent (ε may be overstated, never understated).

Write-ahead: before a round touches the data, the client reserves that round's planned
spend (:func:`reserve`): the ledger then already holds the history *after* the round,
with the round listed in ``reserved_round``. Training replaces it with what was really
spent (:func:`save_history`, never more than reserved). A crash in between leaves the
reservation standing, so a crash can only overstate ε, never hide a round that ran.

A round's result is released only after :func:`save_history` recorded the round as trained (the
reply is built after it). So a reservation whose round is not in ``rounds_trained`` released nothing:
when a resumed run sends that same round again, the client re-runs it under the same reservation
(:func:`unreleased_reservation`) instead of spending the round twice. Noise is drawn afresh, and only
the new result is ever released; the ledger never records less than it did (the reservation is
replaced by the same spend), so it stays write-ahead and conservative.

A round whose result *was* released (a server that crashed after the client replied, a reply that reached
the SuperLink of a server that died) is not trained again either: the ledger keeps the last released
result with the hash of the global model it was trained from (:func:`released_result`), and a request
for that round from that same model is answered with the same result. Releasing an output again costs
no privacy (post-processing); training again would spend the round twice and, with σ planned to land on
the budget after the last round, make the client refuse the last one. Not under secure aggregation,
where no individual update may be kept where the server's operator can read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from auditml_core.artifacts import atomic_write
from auditml_core.privacy.dp_sgd import History

STATE_KEY = "privacy-ledger"


def _steps(history: History) -> int:
    return sum(int(n) for _, _, n in history)


def load_history(context: Context, *, path: Path, model: str) -> History:
    """The accountant history this client has spent on ``model`` so far."""
    candidates: list[History] = []
    record = context.state.config_records.get(STATE_KEY)
    if record is not None and model in record:
        candidates.append([tuple(h) for h in json.loads(str(record[model]))])
    if path.is_file():
        candidates.append([tuple(h) for h in json.loads(path.read_text())["accountant_history"]])
    if not candidates:
        return []
    return [(float(s), float(q), int(n)) for s, q, n in max(candidates, key=_steps)]


def reserve(context: Context, planned: History, *, path: Path, model: str, server_round: int) -> None:
    """Write ahead: record ``planned`` (the history including this round's planned spend, its last entry)
    before training."""
    save_history(
        context,
        planned,
        path=path,
        model=model,
        rounds=load_rounds(path),
        reserved_round=server_round,
        reservation=planned[-1],
    )


def unreleased_reservation(path: Path, *, model: str, server_round: int) -> tuple[History, tuple] | None:
    """``(history before it, the reserved entry)`` when the ledger holds a reservation for ``server_round``
    whose result was never released (the round is not in ``rounds_trained``); None otherwise."""
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    entry = payload.get("reservation")
    history = [(float(s), float(q), int(n)) for s, q, n in payload["accountant_history"]]
    if (
        payload.get("model", model) != model
        or payload.get("reserved_round") != server_round
        or server_round in payload.get("rounds_trained", [])
        or not entry
        or not history
        or history[-1] != (float(entry[0]), float(entry[1]), int(entry[2]))
    ):
        return None
    return history[:-1], history[-1]


def save_history(
    context: Context,
    history: History,
    *,
    path: Path,
    model: str,
    rounds: list[int],
    reserved_round: int | None = None,
    reservation: tuple | None = None,
    released: dict | None = None,
) -> None:
    """Record ``history`` in both copies (file first: it is the one a crash cannot lose).

    ``reserved_round``: the round whose spend ``history`` already includes but which has not finished;
    ``reservation``: that round's entry (the last of ``history``); ``released``: the result this client is
    about to release for its last trained round (:func:`released_result`), or None.
    """
    payload = {
        "model": model,
        "accountant_history": [list(h) for h in history],
        "rounds_trained": rounds,
        "reserved_round": reserved_round,
        "reservation": list(reservation) if reservation is not None else None,
        "released": released,
    }
    # fsync of file and folder: the reservation must be on disk before the first step touches the data.
    atomic_write(path, json.dumps(payload, indent=1).encode(), sync_dir=True)
    record = context.state.config_records.get(STATE_KEY) or ConfigRecord()
    record[model] = json.dumps([list(h) for h in history])
    context.state[STATE_KEY] = record


def load_rounds(path: Path) -> list[int]:
    """Rounds this client has trained (from its file), for its record."""
    return list(json.loads(path.read_text())["rounds_trained"]) if path.is_file() else []


def arrays_sha256(arrays) -> str:
    """SHA-256 of a Flower ``ArrayRecord`` (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()):
        values = np.ascontiguousarray(arrays[name].numpy())
        digest.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def released_entry(*, server_round: int, input_sha256: str, state_dict, metrics: dict, privacy: dict) -> dict:
    """What :func:`save_history` keeps of a result before it is released (see :func:`released_result`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return {
        "round": server_round,
        "input_sha256": input_sha256,
        "weights": base64.b64encode(st_save(tensors)).decode("ascii"),  # safetensors: no code on load
        "metrics": metrics,
        "privacy": privacy,
    }


def released_result(path: Path, *, model: str, server_round: int, input_sha256: str) -> dict | None:
    """The result this client released for ``server_round`` from the global model hashed ``input_sha256``
    (``weights`` as a state dict, ``metrics``, ``privacy``), or None when it released none such."""
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    released = payload.get("released") or {}
    if (
        payload.get("model", model) != model
        or released.get("round") != server_round
        or released.get("input_sha256") != input_sha256
        or server_round not in payload.get("rounds_trained", [])
    ):
        return None
    return {**released, "weights": st_load(base64.b64decode(released["weights"]))}
