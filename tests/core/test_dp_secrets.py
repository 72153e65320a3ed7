"""The secrets DP-SGD rests on carry full OS entropy into the generators' state (issue 23, item 1).

torch's CPU generator keeps only the low 32 bits of ``manual_seed``: a 64-bit secret seed gave
2**32 noise streams, each scorable offline against the released weights. These tests make every
OS-randomness call deterministic, then change only the bits above the 32nd of each draw.
"""

import hashlib
import os
import random
import secrets
import struct

import numpy as np
import pytest
import torch

from auditml_core import models, seeds, training
from auditml_core.config import DPConfig, FitConfig
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.privacy import user_level

DP = DPConfig(enabled=True, target_epsilon=3.0, delta=1e-5, accountant="rdp")
FIT = FitConfig(epochs=1, batch_size=16, lr=0.05, max_grad_norm=1.0)


class FakeOS:
    """Deterministic stand-ins for every OS-randomness call; ``flip_high`` flips bits >= 32 of chosen draws.

    A draw of ``n`` bytes is read as a little-endian integer (as ``secrets.randbits`` builds one from
    ``os.urandom``), so "bits above the 32nd" are its bytes from the fifth on.
    """

    def __init__(self, flip_high: frozenset[int] = frozenset()):
        self.flip_high, self.draws = flip_high, 0

    def _bytes(self, n: int) -> bytes:
        index, self.draws = self.draws, self.draws + 1
        out = b"".join(hashlib.sha256(f"{index}/{i}".encode()).digest() for i in range(n // 32 + 1))[:n]
        if index in self.flip_high:
            out = out[:4] + bytes(b ^ 0xFF for b in out[4:])
        return out

    def urandom(self, n: int) -> bytes:
        return self._bytes(n)

    def randbits(self, k: int) -> int:
        return int.from_bytes(self._bytes((k + 7) // 8), "little") & ((1 << k) - 1)

    def install(self, monkeypatch) -> "FakeOS":
        monkeypatch.setattr(os, "urandom", self.urandom)
        monkeypatch.setattr(secrets, "randbits", self.randbits)
        monkeypatch.setattr(secrets, "token_bytes", lambda n=32: self._bytes(n))
        monkeypatch.setattr(random.SystemRandom, "getrandbits", lambda _self, k: self.randbits(k))
        monkeypatch.setattr(random.SystemRandom, "randbytes", lambda _self, n: self._bytes(n))
        return self


def _released_weights(rng_seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(rng_seed)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0])).astype(np.float32)
    torch.manual_seed(0)
    model = models.build_regressor(n_features=4, hidden_sizes=(8,))
    res = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=FIT,
        dp=DP,
        device=torch.device("cpu"),
        seed=0,
    )
    return res.state_dict


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_bits_above_the_32nd_of_every_draw_change_the_released_weights(monkeypatch):
    _released_weights()  # imports (torch.distributed, scipy) draw OS randomness once: not part of a training call
    base = FakeOS().install(monkeypatch)
    reference = _released_weights()
    n_draws = base.draws
    assert n_draws >= 2  # the sampling and the noise secret, at least
    assert _same(reference, (FakeOS().install(monkeypatch), _released_weights())[1])  # every OS call is covered
    flipped_all = FakeOS(frozenset(range(n_draws))).install(monkeypatch)
    assert not _same(reference, _released_weights())  # with manual_seed (32 bits kept) this was bit-identical
    assert flipped_all.draws == n_draws
    for i in range(n_draws):  # each secret on its own: the sampling draw and the noise draw
        FakeOS(frozenset({i})).install(monkeypatch)
        assert not _same(reference, _released_weights()), f"the high bits of OS draw {i} change nothing"


def test_secret_cpu_generator_runs_the_mt19937_state_numpy_runs(monkeypatch):
    """Independent check: numpy's MT19937, given the state words we wrote, emits torch's exact stream."""
    for _ in range(3):
        g = seeds.secret_generator("cpu")
        raw = g.get_state().numpy().tobytes()
        assert struct.unpack_from("<QiiQ", raw, 0) == (0, 1, 1, 0)  # no seed kept, twist before the first draw
        assert struct.unpack_from("<dddi", raw, 24 + 8 * 624) == (0.0, 0.0, 0.0, 0)  # no cached normal sample
        words = np.array(struct.unpack_from("<624Q", raw, 24), dtype=np.uint32)
        assert words[0] == 0x80000000 and len(set(words[1:].tolist())) > 600
        bg = np.random.MT19937(0)
        bg.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
        out = bg.random_raw(4000).astype(np.uint64)
        expected = ((out[0::2] << np.uint64(32)) | out[1::2]) & np.uint64(2**63 - 1)  # torch's random_() on int64
        drawn = torch.empty(2000, dtype=torch.int64).random_(generator=g).numpy().astype(np.uint64)
        np.testing.assert_array_equal(drawn, expected)
    # positive control of the comparison: the stream of a state one word off is not torch's
    words[5] ^= 1
    bg.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
    out = bg.random_raw(4000).astype(np.uint64)
    assert not np.array_equal(((out[0::2] << np.uint64(32)) | out[1::2]) & np.uint64(2**63 - 1), expected)


def test_every_bit_of_the_cpu_state_entropy_matters(monkeypatch):
    """Flipping any one of the first 128 bits drawn (or a spread of the rest) changes the generator's stream."""
    entropy = bytes(hashlib.sha256(str(i).encode()).digest()[0] for i in range(2492))
    monkeypatch.setattr(seeds, "os_entropy", lambda n: entropy)
    reference = torch.randn(2000, generator=seeds.secret_generator("cpu"))
    for bit in [*range(128), *range(128, 8 * 2492, 997)]:
        flipped = bytearray(entropy)
        flipped[bit // 8] ^= 1 << (bit % 8)
        monkeypatch.setattr(seeds, "os_entropy", lambda n, f=bytes(flipped): f)
        assert not torch.equal(reference, torch.randn(2000, generator=seeds.secret_generator("cpu"))), bit


def test_a_degenerate_entropy_block_is_refused(monkeypatch):
    monkeypatch.setattr(seeds, "os_entropy", lambda n: bytes(n))
    with pytest.raises(RuntimeError, match="degenerate"):
        seeds.secret_generator("cpu")


def test_philox_state_keeps_the_whole_key_and_a_multiple_of_4_offset():
    entropy = bytes(range(1, 17))
    key, offset = struct.unpack("<QQ", entropy)
    state = seeds.philox_state(entropy)
    assert state.dtype == torch.uint8 and state.numel() == 16
    assert state.view(torch.int64).tolist() == [
        int.from_bytes(struct.pack("<Q", key), "little", signed=True),
        int.from_bytes(struct.pack("<Q", offset & ~3), "little", signed=True),
    ]
    assert seeds.PHILOX_SECRET_BITS == 126 and seeds.MT19937_SECRET_BITS == 19936
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        seeds.secret_generator("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_secret_cuda_generator_takes_key_and_offset(monkeypatch):
    entropy = hashlib.sha256(b"cuda").digest()[:16]
    monkeypatch.setattr(seeds, "os_entropy", lambda n: entropy)
    g = seeds.secret_generator("cuda")
    key, offset = struct.unpack("<QQ", entropy)
    assert g.initial_seed() == key and g.get_offset() == offset & ~3
    a = torch.randn(1000, device="cuda", generator=g)
    flipped = entropy[:8] + bytes([entropy[8] ^ 0x10]) + entropy[9:]  # one offset bit
    monkeypatch.setattr(seeds, "os_entropy", lambda n: flipped)
    assert not torch.equal(a, torch.randn(1000, device="cuda", generator=seeds.secret_generator("cuda")))


def test_user_level_rng_high_bits_matter(monkeypatch):
    FakeOS().install(monkeypatch)
    a = user_level.private_rng().random(8)
    FakeOS(frozenset({0})).install(monkeypatch)
    assert not np.array_equal(a, user_level.private_rng().random(8))


def test_reproducible_noise_still_replays_from_the_recorded_seed():
    """The opt-in mode is unchanged: manual_seed of dp_seed, so the same call replays bit for bit."""
    dp = DPConfig(enabled=True, reproducible_noise=True)
    a, b = (
        privacy.dp_generators(dp, seed=11, noise_device="cpu"),
        privacy.dp_generators(dp, seed=11, noise_device="cpu"),
    )
    for first, second, purpose in zip(a, b, ("sampling", "noise")):
        expected = torch.randn(50, generator=torch.Generator().manual_seed(seeds.dp_seed(11, purpose)))
        assert torch.equal(torch.randn(50, generator=first), expected)
        assert torch.equal(torch.randn(50, generator=second), expected)
