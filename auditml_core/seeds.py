"""Every seed of a run, derived from the root seed in one place.

The derivation tree (each arrow is :func:`derive_seed` with that name)::

    root ── "<stage>" ── stage seed
                 train ── "<model>" ── model seed (weights init, central training)
                                ├── "pretrain" ── public pretraining
                                ├── "dp-sampling", "dp-noise" ── DP-SGD, only with dp.reproducible_noise
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
functions, so a bare ``flwr run .`` trains the model the pipeline would.

DP-SGD's Poisson sampling and Gaussian noise are the exception: by default their
generators are seeded from the OS's CSPRNG (:func:`secret_seed`) and the seed is never
recorded, because a guarantee resting on a published seed is void against anyone holding
the run directory. Only ``dp.reproducible_noise = true`` derives them here.

Every ``torch.Generator`` of the project is made by :func:`make_generator`, for the device
of the tensors it fills.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

DERIVATION = {
    "stage": "derive_seed(root, stage)",
    "model": "derive_seed(stage_seed, model)",
    "pretrain": "derive_seed(model_seed, 'pretrain')",
    "partition": "derive_seed(model_seed, 'partition', split)",
    "client_round": "derive_seed(model_seed, 'client', client, 'round', round)",
    "dp": "derive_seed(training_seed, 'dp-sampling' | 'dp-noise'), only with dp.reproducible_noise; "
    "otherwise drawn from the OS CSPRNG and never recorded",
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


def dp_seed(training_seed: int, purpose: str) -> int:
    """DP-SGD's ``purpose`` ("sampling" or "noise") generator seed under ``dp.reproducible_noise`` only."""
    if purpose not in ("sampling", "noise"):
        raise ValueError(f"purpose={purpose!r} is not valid; choose 'sampling' or 'noise'")
    return derive_seed(training_seed, f"dp-{purpose}")


def secret_seed() -> int:
    """64 bits from the OS's CSPRNG (``secrets``): a seed nobody can re-derive. Never record it."""
    return secrets.randbits(64)


def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` for the tensors of ``device``, seeded with ``seed`` (None: :func:`secret_seed`).

    torch refuses a generator of another device type (a CPU generator filling CUDA noise
    fails at the first DP step), so every generator is created here, for where its draws land.

    Parameters
    ----------
    device : the device of the tensors the generator fills (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    seed : a recorded seed, or None for a secret one drawn from the OS's CSPRNG (unrecoverable).

    Returns
    -------
    torch.Generator
    """
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(secret_seed() if seed is None else seed)
    return generator


def audit_seed(audit_model_seed: int, part: str, index: int | None = None) -> int:
    """A part of the membership-inference audit of one model (``part`` in :data:`AUDIT_PARTS`)."""
    if part not in AUDIT_PARTS:
        raise ValueError(f"audit seed part {part!r} is unknown; choose one of: {', '.join(AUDIT_PARTS)}")
    return derive_seed(audit_model_seed, part) if index is None else derive_seed(audit_model_seed, part, index)
