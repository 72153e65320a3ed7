"""Book-keeping (BK) clipping: DP-SGD with one forward and one backward pass (``dp.grad_sample_mode="bk"``).

Bu et al. 2023, "Differentially private optimization on large model at small cost". Ghost
clipping (Opacus' ``grad_sample_mode="ghost"``) gets the per-sample gradient norms from
the layers' activations ``A`` and output gradients ``B`` without materialising per-sample
gradients, but then runs a *second* backward pass on the loss re-weighted by the clipping
coefficients. BK keeps ``A`` and ``B`` ("book-keeping") and assembles the clipped gradient
sum from them directly:

- ``nn.Linear``: ``Σ_i c_i B_iᵀ A_i`` (one matmul, the smaller of ``A``, ``B`` scaled by ``c``); bias ``Σ_i c_i Σ_t B_i[t]``;
- ``nn.Conv2d``: per layer, the cheaper of two routes by FLOP count (:func:`auditml_core.privacy.ghost_conv.use_ghost`):
  the per-sample gradients ``G_i`` materialised (one grouped convolution-weight gradient per block
  of samples) give both the norm and the clipped sum ``Σ_i c_i G_i`` (one matrix-vector product);
  or the Gram-matrix ("ghost") norm, then the convolution weight gradient of ``A`` with ``B``
  re-weighted by ``c`` (``torch.nn.grad.conv2d_weight``, the smaller of the two scaled);

with ``c_i = min(1, C / (‖g_i‖ + 1e-6))`` exactly as Opacus' ``DPOptimizer.clip_and_accumulate``.
During the forward pass the trainable weights are switched to ``requires_grad=False`` and the output
of a clipped layer whose input needs no gradient (the first) is cut from the graph as a fresh leaf,
so autograd computes only the activation gradients the hooks need: none of the discarded, unclipped
weight gradients. (A model that modifies that output in place, which autograd refuses on a leaf, falls
back to letting the first layer's weights require a gradient.) The records are the gradients of the
batch-mean loss; the per-sample scale ``n`` is applied to the (B,) norms and weights, not to ``B``.

The division by the expected batch size, the accountant's step and Poisson sampling are Opacus'
own, and so is the noise function (called once for all parameters, as for every engine:
``auditml_core.privacy.dp_sgd.make_private``): :class:`BKOptimizer` subclasses ``DPOptimizer`` and only replaces
where the clipped sum ``p.summed_grad`` comes from.

Supported trainable layers: ``nn.Linear`` and ``nn.Conv2d`` (zero padding). Layers without
trainable parameters pass through; any other layer with trainable parameters is refused.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.grad
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers.optimizer import DPOptimizer
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from auditml_core.privacy import ghost_conv


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def check_supported(model: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    """The layers BK clips (every module with own trainable parameters); refuse anything else.

    Raises
    ------
    ValueError
        Naming every module with trainable parameters that is not an ``nn.Linear`` or a
        zero-padded ``nn.Conv2d``.
    """
    layers: list[nn.Linear | nn.Conv2d] = []
    bad: list[str] = []
    for name, m in model.named_modules():
        if not _trainable(m):
            continue
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or m.padding == "same"):
            bad.append(f"{name or '<root>'} (Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            layers.append(m)
        else:
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
    if bad:
        raise ValueError(
            "dp.grad_sample_mode='bk' supports trainable nn.Linear and zero-padded nn.Conv2d layers only; "
            f"unsupported trainable layers: {', '.join(bad)}. Freeze them, or use dp.grad_sample_mode='hooks'"
        )
    if not layers:
        raise ValueError("dp.grad_sample_mode='bk': the model has no trainable parameters")
    return layers


class BKModule(nn.Module):
    """Wraps a model; records each supported layer's input ``A`` and output gradient ``B`` for one step.

    The wrapped model is ``self._module`` (as Opacus' GradSampleModule, so state-dict keys carry
    the same ``_module.`` prefix and :func:`auditml_core.privacy.dp_sgd.unwrap` works).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module
        self._layers = check_supported(module)
        self._own: dict[nn.Module, list[nn.Parameter]] = {m: _trainable(m) for m in self._layers}
        self._params = [p for m in self._layers for p in self._own[m]]
        self._acts: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, _Record] = {}
        self._scratch = _ScratchBuffers()  # per-sample gradient buffers, reused from step to step
        # A clipped layer whose input needs no gradient (the first) gets its output cut from the graph
        # as a fresh leaf, so backward stops there. If the model modifies that output in place (which
        # autograd refuses on a leaf), BK falls back to letting that layer's weights require a gradient.
        self._leaf_first = True
        self._rows: int | None = None  # real rows of the last batch when it was padded (_pad_batch)
        self._pad = any(isinstance(m, nn.Conv2d) for m in self._layers)  # only oneDNN's convolutions JIT per shape
        self._handles = []
        for m in self._layers:
            self._handles.append(m.register_forward_hook(self._fwd_hook))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        if self._grads:
            raise RuntimeError(
                "dp.grad_sample_mode='bk': a second forward/backward before optimizer.step(); gradient "
                "accumulation is not supported (call optimizer.zero_grad() and step once per batch)"
            )
        rows, args = _pad_batch(args, kwargs) if self._pad else (None, args)
        try:
            out = self._forward(*args, **kwargs)
        except RuntimeError as exc:
            if not (self._leaf_first and "leaf Variable that requires grad" in str(exc)):
                raise
            self._leaf_first = False  # an in-place op on the first layer's output: the weights route
            for m in self._layers:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            out = self._forward(*args, **kwargs)
        self._rows = rows
        if rows is None:
            return out
        if not isinstance(out, torch.Tensor) or out.shape[0] != args[0].shape[0]:
            raise RuntimeError(
                "dp.grad_sample_mode='bk' needs a model whose output is one (batch, ...) tensor; "
                "use dp.grad_sample_mode='hooks'"
            )
        return out[:rows]

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        self._acts.clear()
        # Autograd then computes activation gradients only; BK assembles the weight gradients itself.
        for p in self._params:
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self._params:
                p.requires_grad_(True)

    def _pre_hook(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled() and not inputs[0].requires_grad:
            # Fallback route for a first layer: its weights give its output a gradient (autograd then
            # also computes this layer's unclipped weight gradient, which is discarded).
            for p in self._own[layer]:
                p.requires_grad_(True)

    def _fwd_hook(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
        if not torch.is_grad_enabled():
            return None
        if layer in self._acts:
            raise RuntimeError(
                f"dp.grad_sample_mode='bk': layer {type(layer).__name__} ran twice in one forward pass "
                "(shared weights); use dp.grad_sample_mode='hooks'"
            )
        self._acts[layer] = inputs[0].detach()
        replaced = None
        if not output.requires_grad:  # the input needs no gradient: the output becomes a leaf of the graph
            output = replaced = output.detach().requires_grad_(True)
        output.register_hook(lambda g, layer=layer: self._store_grad(layer, g))
        return replaced

    def _store_grad(self, layer: nn.Module, grad: torch.Tensor) -> None:
        if layer in self._grads:
            raise RuntimeError(
                "dp.grad_sample_mode='bk': backward ran twice through the same graph before optimizer.step(); "
                "gradient accumulation is not supported"
            )
        # The norm's work is done here, during the backward pass: where the per-sample gradients are
        # materialised, A and B are dropped at once (B of a first layer is often the largest tensor of
        # the step; holding it to the end left more memory for the allocator to give back to the OS
        # and fault in again). A and B are kept only where the clipped sum needs them.
        assert isinstance(layer, (nn.Linear, nn.Conv2d))
        a = self._acts.pop(layer)
        b = grad.detach()
        sq, bias_g, weight_g = _layer_sq_norms(layer, a.to(b.dtype), b, self._scratch)
        keep = weight_g is None
        self._grads[layer] = _Record(sq, bias_g, weight_g, a if keep else None, b if keep else None)

    def clear(self) -> None:
        """Forget the recorded activations and gradients."""
        self._acts.clear()
        self._grads.clear()

    def has_batch(self) -> bool:
        """True when a backward pass has recorded gradients not yet consumed by a step."""
        return bool(self._grads)

    def clipped_sums(self, max_grad_norm: float) -> dict[torch.Tensor, torch.Tensor]:
        """``Σ_i c_i g_i`` per trainable parameter, ``c_i = min(1, C / (‖g_i‖ + 1e-6))`` (Opacus' factor).

        The recorded gradients ``B`` are those of the batch-mean loss (Opacus' ``loss_reduction="mean"``):
        the per-sample gradients are ``n·(B_i, A_i)`` for a batch of ``n``, as Opacus' hooks take them.
        The factor ``n`` is applied to the (B,) norms and clipping weights, not to the tensors.
        """
        if self._acts or len(self._grads) != len(self._layers):
            raise RuntimeError(
                "dp.grad_sample_mode='bk': not every trainable layer received a gradient in the last backward "
                f"pass ({len(self._grads)} of {len(self._layers)}); every trainable layer must be used in the loss"
            )
        records = [self._grads[m] for m in self._layers]
        w = _clip_weights(records, rows=self._rows, max_grad_norm=max_grad_norm)
        out: dict[torch.Tensor, torch.Tensor] = {}
        for m, r in zip(self._layers, records):
            out.update(_clipped_layer_sum(m, r, w.to(r.sq.dtype)))
        self.clear()
        return out

    def _close(self) -> None:
        """Remove the hooks (the plain module is ``self._module`` again)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        self._scratch.clear()


class _ScratchBuffers:
    """One (shape) tensor per layer for its per-sample gradients, reused from step to step.

    The largest tensor of a step; a fresh one each step came back from the OS as new pages (~5k
    page faults a step for the 28x28 CNN's second conv at batch 256). Sized with headroom for the
    Poisson batch's spread; its contents are consumed by :meth:`BKModule.clipped_sums` within the step.
    """

    def __init__(self) -> None:
        self.buffers: dict[nn.Module, torch.Tensor] = {}  # layer -> its buffer

    def __call__(self, layer: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(layer)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[layer] = like.new_empty(numel + numel // 4)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Free every buffer."""
        self.buffers.clear()


def _clip_weights(records: list[_Record], *, rows: int | None, max_grad_norm: float) -> torch.Tensor:
    """(B,) ``c_i·n``: Opacus' clipping factor ``min(1, C / (‖n·g_i‖ + 1e-6))`` times the batch size ``n``.

    ``records`` hold the per-layer squared norms of the batch-mean-loss gradients ``g_i``; ``rows`` is the
    number of real rows when the batch was padded (:func:`_pad_batch`), else None.
    """
    sq = torch.stack([r.sq for r in records]).sum(dim=0)  # (B,) squared norm of the mean-loss gradient
    # the loss averages the real rows only; the padding rows' (see _pad_batch) gradients are exactly 0
    n = sq.shape[0] if rows is None else rows
    sample_norms = sq.sqrt() * n  # (B,): ‖n·g_i‖
    return (max_grad_norm / (sample_norms + 1e-6)).clamp(max=1.0) * n  # c_i·n (per-sample grads are n·g_i)


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm (B,) of ``x`` (B, ...)."""
    # a vectorised reduction: ~10x faster on the CPU than einsum("ni,ni->n"), which runs as a batched matmul
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


def _layer_sq_norms(
    layer: nn.Linear | nn.Conv2d,
    a: torch.Tensor,
    b: torch.Tensor,
    scratch: Optional[Callable[..., torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Squared per-sample gradient norm (B,) of one layer's trainable parameters, from ``A`` and ``B``.

    Also returns what the clipped sum can reuse: the per-sample bias gradients (B, p) and, where the
    per-sample weight gradients were materialised for the norm (the cheaper route), those (B, p, d).
    """
    n = a.shape[0]
    w_on = layer.weight.requires_grad
    bias_on = layer.bias is not None and layer.bias.requires_grad
    if isinstance(layer, nn.Linear):
        if b.dim() == 2:  # ‖b_i a_iᵀ‖² = ‖b_i‖² ‖a_i‖²
            bsq = _sq(b)
            total = bsq * _sq(a) if w_on else torch.zeros_like(bsq)
            return (total + bsq if bias_on else total), (b if bias_on else None), None
        norms = compute_linear_norm_sample(layer, [a], b)  # sequences: Opacus' Gram identity
        return torch.stack(list(norms.values()), dim=1).square().sum(dim=1), None, None
    t, d = b.shape[2] * b.shape[3], _patch_size(layer)
    own_route = n > 0 and layer.groups == 1 and w_on  # else Opacus' conv norm sampler
    if own_route and not ghost_conv.use_ghost(layer, t) and d <= _UNFOLD_MAX_PATCH:
        g = _per_sample_conv_grads_unfolded(layer, a, b, bias_on)  # (B, d [+ 1], p)
        return _sq(g), (g[:, d] if bias_on else None), g[:, :d].transpose(1, 2)
    bias_g = b.sum(dim=(2, 3)) if bias_on else None  # (B, p)
    if not own_route:
        norms = ghost_conv.conv2d_norm_sample(layer, [a], b)
        return torch.stack(list(norms.values()), dim=1).square().sum(dim=1), bias_g, None
    if ghost_conv.use_ghost(layer, t):
        total = ghost_conv.conv_ghost_sq_norm(layer, a, b.reshape(n, layer.out_channels, t))
        return (total + _sq(bias_g) if bias_g is not None else total), bias_g, None
    g = _per_sample_conv_grads(layer, a, b, scratch)  # (B, p, d)
    total = _sq(g)
    return (total + _sq(bias_g) if bias_g is not None else total), bias_g, g


def _patch_size(layer: nn.Conv2d) -> int:
    """``d``: the weights one output channel of a ``groups=1`` Conv2d applies to one patch."""
    return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]


# Conv2d layers with small patches (d = C_in·k_h·k_w at most this, e.g. a first layer on 1-3 colour channels)
# get their per-sample gradients from the unfolded input, one batched matmul, with a row of ones for the bias:
# ~30 % faster on this machine's CPU than the grouped convolution-weight gradient below for d = 9 and 27, and
# slower from d = 72 on (oneDNN's grouped kernel wins once each group has several input channels).
_UNFOLD_MAX_PATCH = 32


def _per_sample_conv_grads_unfolded(layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-sample gradients (B, d [+ 1], p) of a ``groups=1`` Conv2d: ``U_i B_iᵀ`` with ``U_i`` the unfolded
    input (d, T) (Opacus' ``unfold2d``), and, when ``bias``, a last row ``Σ_t B_i[t]`` (the bias gradient,
    from a row of ones appended to U)."""
    n = a.shape[0]
    u = unfold2d(
        a,
        kernel_size=layer.kernel_size,
        padding=ghost_conv.numeric_padding(layer),
        stride=layer.stride,
        dilation=layer.dilation,
    )  # (B, d, T), rows in the weight's (C_in, k_h, k_w) order
    if bias:
        u = torch.cat([u, u.new_ones(n, 1, u.shape[2])], dim=1)
    return torch.bmm(u, b.reshape(n, b.shape[1], -1).transpose(1, 2))


# Per-sample convolution weight gradients are computed a block of samples at a time, as one grouped
# convolution-weight gradient (one group per sample): faster on this machine's CPU than unfold + bmm,
# whose im2col copy does not stay in cache. oneDNN's grouped kernel slows down when a block has many
# input channels in all; a block holds about this many (samples × input channels).
_PER_SAMPLE_CHANNELS = 2048


def _per_sample_conv_grads(
    layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, scratch: Optional[Callable[..., torch.Tensor]] = None
) -> torch.Tensor:
    """Per-sample weight gradients (B, p, d) of a ``groups=1`` Conv2d from its input and output gradient.

    ``scratch(layer, shape, like)``, when given, supplies the output tensor (a reused buffer).
    """
    n, c_in = a.shape[:2]
    p = layer.out_channels
    padding = ghost_conv.numeric_padding(layer)
    block = max(1, _PER_SAMPLE_CHANNELS // c_in)
    shape = (n, p, c_in * layer.kernel_size[0] * layer.kernel_size[1])
    out = scratch(layer, shape, b) if scratch is not None else b.new_empty(shape)
    for s in range(0, n, block):
        ab, bb = a[s : s + block], b[s : s + block]
        m = ab.shape[0]
        g = torch.nn.grad.conv2d_weight(
            ab.reshape(1, m * c_in, *ab.shape[2:]),
            (m * p, c_in, *layer.kernel_size),
            bb.reshape(1, m * p, *bb.shape[2:]),
            layer.stride,
            padding,
            layer.dilation,
            groups=m,
        )  # (m·p, C_in, kh, kw)
        out[s : s + m] = g.reshape(m, p, -1)
    return out


# Poisson sampling gives nearly every step a batch size of its own, and oneDNN builds (JIT-compiles)
# new convolution kernels for each new shape. The grouped per-sample route above (one group per sample)
# took ~4 ms a new size on the digits CNN, against ~13 ms for the whole DP step, paid by most steps of a
# short run. (Since its first layer takes the unfolded route, a new size costs the digits CNN ~1 ms, as
# much as without DP, and padding neither helps nor hurts it measurably; the grouped route still serves
# convolutions with d > _UNFOLD_MAX_PATCH.) In a model with a Conv2d the batch is padded with zero rows
# to a multiple of _BATCH_BUCKET, so a run sees a handful of shapes (±4σ of a Poisson batch of 256 spans
# ~8 buckets) at ~3 % extra rows. (Linear layers run on BLAS, which compiles nothing: padding only cost
# the diabetes MLP time.) The padding rows' outputs are cut off before the loss, so their output
# gradients, per-sample gradients, norms and clipped-sum terms are exactly zero.
_BATCH_BUCKET = 16


def _pad_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | None, tuple[Any, ...]]:
    """``(real rows, args)`` with the batch ``args[0]`` zero-padded to a multiple of ``_BATCH_BUCKET``.

    Only a lone tensor argument is padded (the models here take ``x`` alone); anything else, or a
    batch already a multiple, is passed through with ``None`` rows.
    """
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        return None, args
    x = args[0]
    pad = -x.shape[0] % _BATCH_BUCKET
    if pad == 0 or x.shape[0] == 0:
        return None, args
    return x.shape[0], (torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]),)


class _Record(NamedTuple):
    """What one layer's backward left for the step: its squared per-sample norms and what the clipped
    sum needs (the per-sample gradients where materialised, else the layer's ``A`` and ``B``)."""

    sq: torch.Tensor  # (B,) squared per-sample gradient norm (batch-mean loss), the layer's parameters
    bias_g: torch.Tensor | None  # (B, p) per-sample bias gradients, or None
    weight_g: torch.Tensor | None  # (B, p, d) per-sample weight gradients, or None
    a: torch.Tensor | None  # the layer's input, kept when weight_g is None
    b: torch.Tensor | None  # the gradient of its output, kept when weight_g is None


def _clipped_layer_sum(layer: nn.Linear | nn.Conv2d, r: _Record, w: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """``Σ_i w_i g_i`` for each trainable parameter of one layer (``g_i`` its gradient from ``A_i``, ``B_i``)."""
    out: dict[torch.Tensor, torch.Tensor] = {}
    weight, bias = layer.weight, layer.bias
    n = w.shape[0]
    bias_g = r.bias_g
    if bias is not None and bias.requires_grad:
        if bias_g is None:  # Linear on sequences (B, ..., p)
            assert r.b is not None
            bias_g = r.b.reshape(n, -1, r.b.shape[-1]).sum(dim=1)
        out[bias] = w @ bias_g
    if weight.requires_grad:
        if r.weight_g is not None:
            out[weight] = (w @ r.weight_g.reshape(n, -1)).reshape(weight.shape)
        else:
            assert r.a is not None and r.b is not None
            a, b = r.a.to(r.b.dtype), r.b
            # the weight gradient is bilinear in (A_i, B_i): weight the smaller of the two per sample
            scale_a = a.numel() < b.numel()
            if scale_a:
                a = a * w.reshape(-1, *([1] * (a.dim() - 1)))
            else:
                b = b * w.reshape(-1, *([1] * (b.dim() - 1)))
            if isinstance(layer, nn.Conv2d):
                out[weight] = torch.nn.grad.conv2d_weight(
                    a, weight.shape, b, layer.stride, ghost_conv.numeric_padding(layer), layer.dilation, layer.groups
                )
            else:  # nn.Linear: A (B, ..., d), B (B, ..., p)
                out[weight] = b.reshape(-1, b.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    return {p: g.to(p.dtype) for p, g in out.items()}


class BKOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose clipped sum comes from a :class:`BKModule` instead of ``p.grad_sample``.

    The mean-reduction scaling (``scale_grad``, by ``expected_batch_size``), the skip-step logic and
    the accountant's step hook are inherited unchanged (``add_noise`` is replaced for every engine by
    ``auditml_core.privacy.dp_sgd.make_private``, with the same Opacus noise function).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BKModule, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self._bk = module
        managed = set(module._params)
        stray = [p for p in self.params if p not in managed]
        if stray:
            raise ValueError(
                f"dp.grad_sample_mode='bk': {len(stray)} optimized parameter(s) are not in a clipped layer of the model"
            )

    @property
    def accumulated_iterations(self) -> int:
        return 1  # BK refuses gradient accumulation (BKModule raises on a second backward)

    def clip_and_accumulate(self) -> None:
        if self._bk.has_batch():
            sums = self._bk.clipped_sums(self.max_grad_norm)
        elif all(getattr(p, "grad_sample", None) is not None and len(p.grad_sample) == 0 for p in self.params):
            sums = {}  # an empty Poisson batch (auditml_core.privacy.dp_sgd.noise_only_step): the clipped sum is zero
        else:
            raise RuntimeError("dp.grad_sample_mode='bk': optimizer.step() without a backward pass since the last step")
        for p in self.params:
            grad = sums[p] if p in sums else torch.zeros_like(p)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        # DPOptimizer.pre_step, without its look at p.grad_sample (BK keeps none)
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self._bk.clear()


def make_private(
    engine: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Any,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator,
) -> tuple[BKModule, BKOptimizer, Any]:
    """The BK counterpart of ``PrivacyEngine.make_private`` (flat clipping, mean loss, no Poisson re-wrap).

    ``data_loader`` must already Poisson-sample (a ``DPDataLoader``). Sample rate and expected batch
    size are computed as Opacus does (``1 / len(loader)``, ``int(len(dataset) * sample_rate)``) and the
    engine's accountant is attached to the optimizer's step, as in ``PrivacyEngine.make_private``.
    """
    params = {id(p) for p in module.parameters()}
    if any(id(p) not in params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("Module parameters are different than optimizer Parameters")
    engine.validate(module=module, optimizer=None, data_loader=None)  # Opacus' checks (BatchNorm, ...)
    wrapped = BKModule(module)
    sample_rate = 1 / len(data_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)
    dp_opt = BKOptimizer(
        optimizer,
        module=wrapped,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=False,
    )
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return wrapped, dp_opt, data_loader


__all__ = ["BKModule", "BKOptimizer", "check_supported", "make_private"]
