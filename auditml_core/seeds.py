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
                                ├── "canaries", i ── gradient canaries of shadow 0 (i = 0) and of the mutant (1)
                                ├── "mutant" ── the DP noise mutant (the positive control under DP)
                                └── "statistics" ── bootstrap and held-out split of the audit statistics

The runner, the Flower apps, the deployment launcher and the scripts all call these
functions, so a bare ``flwr run .`` trains the model the pipeline would.

DP-SGD's Poisson sampling and Gaussian noise are the exception: by default their
generators get their whole state from the OS's CSPRNG (:func:`secret_generator`) and no bit
of it is recorded, because a guarantee resting on a published or guessable seed is void
against anyone holding the run directory. Only ``dp.reproducible_noise = true`` derives
them here.

Every ``torch.Generator`` of the project is made by :func:`make_generator`, for the device
of the tensors it fills.
"""

from __future__ import annotations

import hashlib
import os
import struct

import torch

DERIVATION = {
    "stage": "derive_seed(root, stage)",
    "model": "derive_seed(stage_seed, model)",
    "pretrain": "derive_seed(model_seed, 'pretrain')",
    "partition": "derive_seed(model_seed, 'partition', split)",
    "client_round": "derive_seed(model_seed, 'client', client, 'round', round)",
    "dp": "derive_seed(training_seed, 'dp-sampling' | 'dp-noise'), only with dp.reproducible_noise; "
    "otherwise drawn from the OS CSPRNG and never recorded",
    "rank": "derive_seed(training_seed, 'rank', r) for rank r > 0 of a multi-process training (its dp seeds)",
    "audit": "derive_seed(audit_model_seed, part[, index])",
}
AUDIT_PARTS = ("members", "shadow", "control", "control_shadow", "statistics", "canaries", "mutant")


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


# torch's CPU generator state (``CPUGeneratorImplState`` in ATen/CPUGeneratorImpl.cpp, 5056 bytes): uint64
# initial seed, int32 left, int32 seeded, uint64 next, uint64[624] MT19937 words (each < 2**32), then the
# cached-normal fields (doubles x, y, rho, int32 valid; float sample, bool valid). Checked at run time by
# _mt19937_template, so a torch that lays it out otherwise fails loudly instead of running on a bad state.
_MT_N = 624
_MT_STATE_BYTES = 5056
_MT_WORDS_AT = 24
MT19937_SECRET_BITS = 32 * (_MT_N - 1)  # 19 936: words 1..623; word 0 contributes only its top bit, set to 1
PHILOX_SECRET_BITS = 64 + 62  # CUDA: the 64-bit Philox key and a counter offset that must be a multiple of 4


def os_entropy(n_bytes: int) -> bytes:
    """``n_bytes`` from the OS's CSPRNG (``os.urandom``): the one source of every DP secret. Never record it."""
    return os.urandom(n_bytes)


def secret_generator(device: torch.device | str) -> torch.Generator:
    """A ``torch.Generator`` for ``device`` whose whole state is drawn from the OS's CSPRNG, none of it kept.

    DP-SGD's Poisson sampling and Gaussian noise (and any other randomness a privacy guarantee
    rests on, e.g. a distributed trainer's shared noise stream) must come from this helper.
    ``manual_seed`` is not enough: torch's CPU generator (MT19937) keeps only the low 32 bits of
    the seed, so 2**32 candidates could be scored offline against released weights.

    - CPU (MT19937): words 1..623 of the state come straight from ``os.urandom`` (19 936 bits);
      word 0 contributes only its top bit to the recurrence and is set to ``0x80000000``, as the
      reference ``init_by_array`` does, so the state is never the degenerate all-zero one. The
      generator starts with a full twist before its first output (``left = 1``), no cached
      normal sample, and a reported ``initial_seed()`` of 0 (it has no seed: nothing to record).
    - CUDA (Philox4x32-10): the most it accepts, a 64-bit key and a 64-bit counter offset that
      must be a multiple of 4: 126 secret bits, all from ``os.urandom``. The offset only moves
      where the counter starts (below 2**62, so it never carries into another thread's
      subsequence).

    Residual: these are seeded PRNGs with a secret, full-entropy state, not a CSPRNG stream
    (Opacus' ``secure_mode`` draws every sample from torchcsprng): an adversary who could invert
    MT19937 from raw outputs could predict later ones, but no raw output is released, only
    noised, clipped gradient sums after many steps.

    To share one secret stream between processes (identical noise on several ranks), draw it
    here on one and send ``generator.get_state()`` in memory; never write it anywhere.

    Parameters
    ----------
    device : the device of the tensors the generator fills (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Returns
    -------
    torch.Generator

    Raises
    ------
    ValueError
        If ``device`` is neither a CPU nor a CUDA device.
    RuntimeError
        If this torch lays its CPU generator state out otherwise, or the OS returned a degenerate block.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"no secret generator for device {device}: DP noise is drawn on 'cpu' or 'cuda'; train on one of them"
        )
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        generator.set_state(mt19937_state(os_entropy(4 * (_MT_N - 1)), template=_mt19937_template(generator)))
    else:
        generator.set_state(philox_state(os_entropy(16)))
    return generator


def _mt19937_template(generator: torch.Generator) -> torch.Tensor:
    """The state of ``generator`` seeded with 0, after checking it has the layout this module writes."""
    generator.manual_seed(0)
    state = generator.get_state()
    raw = state.numpy().tobytes()
    initial, left, seeded, _next = struct.unpack_from("<QiiQ", raw, 0)
    word = struct.unpack_from("<3Q", raw, _MT_WORDS_AT)
    # init_genrand(0): w0 = 0, w[j] = 1812433253 * (w[j-1] ^ (w[j-1] >> 30)) + j
    if len(raw) != _MT_STATE_BYTES or (initial, left, seeded) != (0, 1, 1) or word != (0, 1, 1812433255):
        raise RuntimeError(
            f"torch {torch.__version__} lays out its CPU generator state otherwise than auditml_core.seeds "
            "expects (CPUGeneratorImplState); update seeds.mt19937_state for this torch"
        )
    return state


def mt19937_state(entropy: bytes, *, template: torch.Tensor) -> torch.Tensor:
    """A valid torch CPU generator state whose MT19937 words 1..623 are ``entropy`` (2492 bytes).

    ``template`` is a state of a generator seeded with 0 (its header and cached-normal fields are
    kept: ``left = 1``, seeded, no cached normal sample, initial seed 0). Word 0 is ``0x80000000``.

    Raises
    ------
    RuntimeError
        If ``entropy`` has the wrong length or is far from half ones (a broken entropy source:
        MT19937 from a nearly-zero state emits nearly-zero output for thousands of draws).
    """
    if len(entropy) != 4 * (_MT_N - 1):
        raise RuntimeError(f"MT19937 needs {4 * (_MT_N - 1)} bytes of entropy, got {len(entropy)}")
    ones = int.from_bytes(entropy, "little").bit_count() / (8 * len(entropy))
    if not 0.45 < ones < 0.55:  # 14 standard deviations from 0.5 for 19 936 fair bits: never by chance
        raise RuntimeError(f"the OS entropy source returned a degenerate block ({ones:.1%} one bits); check os.urandom")
    words = (0x80000000, *struct.unpack(f"<{_MT_N - 1}I", entropy))
    raw = bytearray(template.numpy().tobytes())
    struct.pack_into(f"<{_MT_N}Q", raw, _MT_WORDS_AT, *words)
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


def philox_state(entropy: bytes) -> torch.Tensor:
    """A CUDA generator state (int64 seed, int64 offset, 16 bytes) from 16 bytes of ``entropy``.

    All 64 bits of the first 8 bytes are the Philox key; the last 8 give the counter offset with
    its two low bits cleared (torch requires a multiple of 4): 126 secret bits.
    """
    if len(entropy) != 16:
        raise RuntimeError(f"Philox needs 16 bytes of entropy, got {len(entropy)}")
    key, offset = struct.unpack("<QQ", entropy)
    return torch.frombuffer(bytearray(struct.pack("<QQ", key, offset & ~3)), dtype=torch.uint8).clone()


def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` for the tensors of ``device``: seeded with ``seed``, or secret (None).

    torch refuses a generator of another device type (a CPU generator filling CUDA noise
    fails at the first DP step), so every generator is created here, for where its draws land.

    Parameters
    ----------
    device : the device of the tensors the generator fills (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    seed : a recorded seed (``manual_seed``: replayable by anyone who has it), or None for
        :func:`secret_generator` (a whole state from the OS's CSPRNG, unrecoverable).

    Returns
    -------
    torch.Generator
    """
    if seed is None:
        return secret_generator(device)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def audit_seed(audit_model_seed: int, part: str, index: int | None = None) -> int:
    """A part of the membership-inference audit of one model (``part`` in :data:`AUDIT_PARTS`)."""
    if part not in AUDIT_PARTS:
        raise ValueError(f"audit seed part {part!r} is unknown; choose one of: {', '.join(AUDIT_PARTS)}")
    return derive_seed(audit_model_seed, part) if index is None else derive_seed(audit_model_seed, part, index)


def rank_seed(training_seed: int, rank: int) -> int:
    """The training seed of rank ``rank`` > 0 of a multi-process training (rank 0 keeps ``training_seed``).

    Only DP-SGD's reproducible sampling and noise streams use it: each rank Poisson-samples its own
    shard, and ranks sharing one stream would sample their shards in lockstep instead of independently.
    """
    if rank < 1:
        raise ValueError(f"rank={rank} is not valid; rank 0 uses the training seed itself")
    return derive_seed(training_seed, "rank", rank)
