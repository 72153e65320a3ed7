"""DP-SGD across ranks (``train.processes`` / torchrun), accounted once: the guarantee of one process.

One DP-SGD step of one process, on a dataset of N records with Poisson rate q, expected batch
B = int(N·q), clipping norm C and noise multiplier σ, releases ``(Σ_{i∈batch} clip(g_i) + N(0, σ²C²)) / B``.
Across W ranks (:func:`spread`):

- **sampling**: rank r holds the records at positions ``r, r + W, r + 2W, ...`` (:func:`shard`: disjoint,
  so each record can enter at most one rank's batch) and Poisson-samples them at the global rate q with
  its own secret generator. Every record is in the global batch independently with probability q:
  exactly the single-process sampling. Every rank takes the same number of steps per epoch (empty
  local batches included: their step is noise-only elsewhere, and a rank that skipped it would stop
  answering the others' collectives);
- **clipping**: each rank clips its own records' gradients with C, with whichever engine
  ``dp.grad_sample_mode`` names (the engines produce the clipped sum ``p.summed_grad`` per rank);
- **noise, once**: rank 0 alone adds the Gaussian noise N(0, σ²C²) (from its secret generator, Opacus'
  floating-point-safe recipe) to its clipped sum, then one all-reduce sums the ranks' vectors, so every
  rank holds ``Σ clip(g_i) + noise`` with the noise's std exactly σC; the division is by the global B;
- **accounting**: the plan is made for the global N and batch (σ, q, steps per epoch are those of one
  process), and the accountant counts each global step once, at rate q: ε equals the single-process ε.

Opacus ships these pieces (``DPDDP``, ``DistributedDPOptimizer``, ``DistributedUniformWithReplacementSampler``);
they are not used as such because: its distributed sampler skips empty batches (ranks would then take
different numbers of steps and wait on each other's collectives for ever, and an empty global batch's
noise-only step would be missing); ``DistributedDPOptimizer`` is a subclass of Opacus' own optimizer, while the
default engine (``bk``) and ghost clipping bring optimizers of their own, and it all-reduces tensor by tensor;
``DPDDP`` only broadcasts rank 0's initial weights (rank 0 sends the weights with each order here) and adds a
``module.`` level to the state-dict keys. The noise step below is the one seam all engines share.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from auditml_core.distributed import World


def shard(n_records: int, world: World) -> torch.Tensor:
    """The positions of the records rank ``world.rank`` samples from: ``r, r + W, ...`` (disjoint across ranks)."""
    return torch.arange(world.rank, n_records, world.size)


def expected_batch_size(n_records: int, sample_rate: float) -> int:
    """The global expected batch B the clipped, noised sum is divided by: ``int(N·q)``, as Opacus computes it."""
    return int(n_records * sample_rate)


def spread(optimizer: Any, *, world: World, n_records: int, sample_rate: float) -> None:
    """Turn one rank's DP optimizer (any engine) into its part of the global DP-SGD step (module docstring).

    Its noise step becomes :func:`add_noise_across_ranks` and its mean is taken over the global expected
    batch. The accountant hook is left as it is: it counts one step at ``sample_rate`` (the global q).
    """
    optimizer.expected_batch_size = expected_batch_size(n_records, sample_rate)
    optimizer.add_noise = types.MethodType(lambda opt: add_noise_across_ranks(opt, world=world), optimizer)


def add_noise_across_ranks(optimizer: Any, *, world: World) -> None:
    """``p.grad = Σ_ranks p.summed_grad + N(0, σ²C²)``, the noise drawn once, on rank 0; identical on every rank.

    One flattened all-reduce for all parameters. The noise is Opacus' ``_generate_noise`` (the
    floating-point-safe recipe when the optimizer's ``secure_mode`` is set, as
    :func:`auditml_core.privacy.dp_sgd.make_private` sets it) with the optimizer's generator: rank 0's
    secret noise generator.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    params = optimizer.params
    sums = [p.summed_grad for p in params]
    for s in sums:
        _check_processed_flag(s)
    sizes = [s.numel() for s in sums]
    flat = torch.cat([s.reshape(-1).to(sums[0].dtype) for s in sums])
    if world.leader:
        sigma = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        flat += _generate_noise(
            std=sigma * optimizer.max_grad_norm,
            reference=flat,  # only its shape, device and dtype are read
            generator=optimizer.generator,
            secure_mode=optimizer.secure_mode,
        )
    world.all_reduce_(flat)
    for p, s, g in zip(params, sums, flat.split(sizes)):
        p.grad = g.view_as(p).to(p.dtype)
        _mark_as_processed(s)
