"""Every seed of a run, derived from the root seed in one place.

The derivation tree (each arrow is :func:`derive_seed` with that name)::

    root ── "<stage>" ── stage seed
                 train ── "<model>" ── model seed (weights init, central training)
                                ├── "pretrain" ── public pretraining
                                ├── "partition", "<split>" ── federated partition
                                └── "client", i, "round", r ── client i's training in round r
                 explain ── "<model>" ── ...   distill ── "<model>" ── ...
                 audit ── "<model>" ── audit model seed
                                ├── "members" ── which train/test rows are attacked
                                ├── "shadow", i ── LiRA shadow model i (i = -1: which records each shadow trains on)
                                ├── "control" ── the overfit positive control (rows and training)
                                ├── "control_shadow", i ── shadow i of the control's LiRA (-1: assignment)
                                └── "statistics" ── bootstrap and held-out split of the audit statistics

The runner, the Flower apps, the deployment launcher and the scripts all call these
functions, so a bare ``flwr run .`` trains the model the pipeline would. DP-SGD's
sampling and noise are not derived here: see :mod:`core.privacy`.
"""

from __future__ import annotations

import hashlib

DERIVATION = {
    "stage": "derive_seed(root, stage)",
    "model": "derive_seed(stage_seed, model)",
    "pretrain": "derive_seed(model_seed, 'pretrain')",
    "partition": "derive_seed(model_seed, 'partition', split)",
    "client_round": "derive_seed(model_seed, 'client', client, 'round', round)",
    "audit": "derive_seed(audit_model_seed, part[, index])",
}
AUDIT_PARTS = ("members", "shadow", "control", "control_shadow", "statistics")


def derive_seed(root: int, *names: str | int) -> int:
    """A stable 31-bit seed for a named part of the run (stage, model, client) from ``root``."""
    text = "/".join([str(root), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def stage_seed(root: int, stage: str) -> int:
    """The seed the runner gives ``stage``."""
    return derive_seed(root, stage)


def model_seed(root: int, model: str, *, stage: str = "train") -> int:
    """The seed of ``model`` inside ``stage`` (training: weights init and the training loop)."""
    return derive_seed(stage_seed(root, stage), model)


def pretrain_seed(model_seed_: int) -> int:
    """Public pretraining of a model (central and federated alike)."""
    return derive_seed(model_seed_, "pretrain")


def partition_seed(model_seed_: int, split: str) -> int:
    """The federated partition of ``split``."""
    return derive_seed(model_seed_, "partition", split)


def client_round_seed(model_seed_: int, client: int, server_round: int) -> int:
    """Client ``client``'s local training in round ``server_round``."""
    return derive_seed(model_seed_, "client", client, "round", server_round)


def audit_seed(audit_model_seed: int, part: str, index: int | None = None) -> int:
    """A part of the membership-inference audit of one model (``part`` in :data:`AUDIT_PARTS`)."""
    if part not in AUDIT_PARTS:
        raise ValueError(f"audit seed part {part!r} is unknown; choose one of: {', '.join(AUDIT_PARTS)}")
    return derive_seed(audit_model_seed, part) if index is None else derive_seed(audit_model_seed, part, index)
