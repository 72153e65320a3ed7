"""Ghost clipping for ``nn.Conv2d``: per-sample gradient norms without per-sample gradients.

Opacus 1.6's fast gradient clipping (``grad_sample_mode="ghost"``) ships norm samplers for
``nn.Linear`` and ``nn.Embedding`` only; for any other layer it materialises the per-sample
gradients and takes their norm. This module registers a norm sampler for ``nn.Conv2d``
through Opacus' own extension point (:func:`opacus.grad_sample.register_norm_sampler`);
importing it is all it takes.

The identity (Li et al. 2021; Bu et al. 2022, "mixed ghost clipping"): a convolution is a
linear map on unfolded patches. For sample ``i`` with unfolded activations ``A_i`` (T, d)
(``T`` output positions, ``d = C_in/groups · k_h · k_w``) and output gradients ``B_i``
(T, p) (``p = C_out``), the weight gradient is ``G_i = B_iᵀ A_i`` (p, d) and

    ||G_i||_F² = ⟨A_i A_iᵀ, B_i B_iᵀ⟩   (two T×T Gram matrices: "ghost"),

which costs ``O(T² (d + p))`` per sample against ``O(T d p)`` for materialising ``G_i``.
Per layer we take the cheaper of the two (``T² < d p`` → ghost), as Bu et al. do.
The bias gradient is ``Σ_t B_i[t]`` (p,), cheap either way.

Grouped convolutions fall back to materialising (through Opacus' own conv grad sampler).
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

# The "ghost" path's T×T Gram matrices are formed in blocks of this many samples at most,
# so its peak memory stays bounded whatever the batch size.
_GHOST_BLOCK_ELEMENTS = 1 << 25  # float elements per block (128 MiB in float32)


def use_ghost(layer: nn.Conv2d, out_positions: int) -> bool:
    """True when the Gram-matrix ("ghost") norm is cheaper than materialising for ``layer``.

    Parameters
    ----------
    layer : the convolution.
    out_positions : ``T``, the number of output positions (H_out · W_out).
    """
    d = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return out_positions * out_positions < d * layer.out_channels


def conv2d_norm_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms of a ``Conv2d``'s weight and bias, shape (B,) each.

    Parameters
    ----------
    layer : the convolution (any padding, stride, dilation; groups > 1 materialise).
    activations : ``[input]``, the layer's input (B, C_in, H, W) captured in the forward pass.
    backprops : gradient of the loss w.r.t. the layer's output (B, C_out, H_out, W_out),
        already scaled by Opacus for the loss reduction.

    Returns
    -------
    dict
        ``{parameter: (B,) tensor of per-sample gradient L2 norms}`` for each trainable parameter.
    """
    x = activations[0].to(backprops.dtype)  # (B, C_in, H, W)
    n = x.shape[0]
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if n == 0:
        for p in (layer.weight, layer.bias):
            if p is not None and p.requires_grad:
                ret[p] = torch.zeros(0, device=backprops.device, dtype=backprops.dtype)
        return ret
    b = backprops.reshape(n, layer.out_channels, -1)  # (B, p, T)
    if layer.weight.requires_grad:
        if layer.groups != 1 or isinstance(layer.padding, str):
            # Rare shapes: let Opacus' per-sample conv gradient do the unfolding, then take norms.
            grads = compute_conv_grad_sample(layer, [x], backprops)
            ret[layer.weight] = grads[layer.weight].reshape(n, -1).norm(2, dim=1)
        elif use_ghost(layer, b.shape[-1]):
            ret[layer.weight] = conv_ghost_sq_norm(layer, x, b).sqrt()
        else:
            a = unfold2d(
                x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation
            )  # (B, d, T)
            g = torch.bmm(b, a.transpose(1, 2))  # (B, p, d): the per-sample gradients
            ret[layer.weight] = g.reshape(n, -1).norm(2, dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=2).norm(2, dim=1)  # (B,)
    return ret


def numeric_padding(layer: nn.Conv2d) -> tuple[int, int]:
    """The layer's padding as numbers: ``"valid"`` is zero. (``"same"`` is refused by the callers.)"""
    if isinstance(layer.padding, str):
        if layer.padding != "valid":
            raise ValueError(f"padding={layer.padding!r} has no numeric form here; use explicit padding numbers")
        return (0, 0)
    return (int(layer.padding[0]), int(layer.padding[1]))


def uses_pixel_gram(layer: nn.Conv2d, input_shape: tuple[int, ...], out_positions: int) -> bool:
    """True when :func:`conv_ghost_sq_norm` takes the pixel Gram: ``(H_p W_p)² ≤ d·T``, the padded
    input's pixel Gram no larger than the unfolded patches (both are read and written a few times;
    on this machine's CPU the smaller one was the faster route in each shape measured)."""
    ph, pw = numeric_padding(layer)
    hp, wp = input_shape[-2] + 2 * ph, input_shape[-1] + 2 * pw
    d = input_shape[-3] * layer.kernel_size[0] * layer.kernel_size[1]
    return (hp * wp) ** 2 <= d * out_positions


def conv_ghost_sq_norm(layer: nn.Conv2d, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖G_i‖_F² per sample (B,) of a ``groups=1`` Conv2d's weight gradient by the Gram identity.

    Parameters
    ----------
    layer : the convolution (numeric padding, any stride and dilation, ``groups=1``).
    x : its input (B, C_in, H, W).
    b : the gradient of its output, (B, p, T).

    The patch Gram ``A_i A_iᵀ`` (T×T) comes from the unfolded patches (d×T a sample), or, when
    smaller (:func:`uses_pixel_gram`), from the Gram of the padded input's *pixels* ``P = X_iᵀ X_i``
    ((H_p W_p)² a sample, no unfold copy): ``(A_i A_iᵀ)[t, t'] = Σ_k P[t + k, t' + k]`` over the
    kernel's offsets ``k`` (summed over column offsets, then row offsets).
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ph, pw = numeric_padding(layer)
    n, c, h, w = x.shape
    t = b.shape[-1]
    if not uses_pixel_gram(layer, x.shape, t):
        a = unfold2d(x, kernel_size=layer.kernel_size, padding=(ph, pw), stride=layer.stride, dilation=layer.dilation)
        return ghost_sq_norm(a, b)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xf = x.reshape(n, c, h * w)  # (B, C, H W)
    block = max(1, _GHOST_BLOCK_ELEMENTS // max(1, 2 * (h * w) ** 2))
    out = []
    for s in range(0, n, block):
        xb, bb = xf[s : s + block], b[s : s + block]
        m = xb.shape[0]
        pix = torch.bmm(xb.transpose(1, 2), xb).view(m, h, w, h, w)
        # the kernel's offsets are a product of row and column offsets: sum over columns, then rows
        by_row = _offset_sum(pix, 2, wo, kw, sw, dw, pw)  # (b, H, W_o, H, W_o)
        gram = _offset_sum(by_row, 1, ho, kh, sh, dh, ph).reshape(m, t, t)  # (b, H_o, W_o, H_o, W_o)
        bgram = torch.bmm(bb.transpose(1, 2), bb)  # (b, T, T)
        out.append(bgram.mul_(gram).sum(dim=(1, 2)))
    # The inner product of two PSD Gram matrices is ≥ 0; rounding can make it a hair negative.
    return torch.cat(out).clamp(min=0)  # (B,)


def _offset_sum(pix: torch.Tensor, axis: int, n_out: int, k: int, stride: int, dilation: int, pad: int) -> torch.Tensor:
    """``G[o, o'] = Σ_j P[stride·o + dilation·j − pad, stride·o' + dilation·j − pad]`` along one pixel axis pair.

    ``pix`` is (b, H, W, H, W) (or partly summed already); the pair is axes ``axis`` and ``axis + 2``,
    which become ``n_out`` output positions. Pixels outside the input are the padding's zeros: each
    offset ``j`` adds only the window of outputs whose pixels lie inside, so nothing is padded.
    """
    size = pix.shape[axis]
    shape = list(pix.shape)
    shape[axis] = shape[axis + 2] = n_out
    total = pix.new_zeros(shape)
    for j in range(k):
        first = dilation * j - pad  # input pixel of output position 0
        lo = max(0, -(first // stride))  # first o with stride·o + first >= 0
        hi = min(n_out - 1, (size - 1 - first) // stride)  # last o with stride·o + first <= size - 1
        if lo > hi:
            continue
        ix_src: list[slice] = [slice(None)] * pix.dim()
        ix_dst: list[slice] = [slice(None)] * pix.dim()
        ix_src[axis] = ix_src[axis + 2] = slice(stride * lo + first, stride * hi + first + 1, stride)
        ix_dst[axis] = ix_dst[axis + 2] = slice(lo, hi + 1)
        total[tuple(ix_dst)].add_(pix[tuple(ix_src)])
    return total


def ghost_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨AᵀA, BᵀB⟩ = ‖B_i A_iᵀ‖_F² per sample for ``a`` (B, d, T) and ``b`` (B, p, T), in bounded blocks."""
    n, _, t = a.shape
    block = max(1, _GHOST_BLOCK_ELEMENTS // max(1, 2 * t * t))
    out = []
    for s in range(0, n, block):
        aa = torch.bmm(a[s : s + block].transpose(1, 2), a[s : s + block])  # (b, T, T)
        bb = torch.bmm(b[s : s + block].transpose(1, 2), b[s : s + block])  # (b, T, T)
        out.append(aa.mul_(bb).sum(dim=(1, 2)))
    # The inner product of two PSD Gram matrices is ≥ 0; rounding can make it a hair negative.
    return torch.cat(out).clamp(min=0)  # (B,)


register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)

__all__ = [
    "conv2d_norm_sample",
    "conv_ghost_sq_norm",
    "ghost_sq_norm",
    "numeric_padding",
    "use_ghost",
    "uses_pixel_gram",
]
