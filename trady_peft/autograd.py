"""Custom autograd functions that decide exactly what is kept for the backward pass.

* :class:`SparseChannelDelta` adds the contribution of a few input channels of a layer (the
  channels trained this period, and the accumulated deltas of channels trained earlier). For the
  weight gradient it keeps ``x[:, idx]`` and nothing else of the input ``x``: that is where
  TraDy's activation memory saving comes from. The input gradient is exact.
* :class:`FrozenConv` is a convolution whose weight is frozen. PyTorch's own convolution keeps
  its input for the backward pass even when no weight gradient is needed
  (pytorch/pytorch#133566); this one keeps only the (resident) weight.
"""

from __future__ import annotations

import torch

from .geometry import ChannelGeometry


def _gather(x: torch.Tensor, dim: int, channels: torch.Tensor) -> torch.Tensor:
    return x.index_select(dim, channels)


def _scatter_grad(
    grad_x: torch.Tensor | None, shape: torch.Size, like: torch.Tensor, dim: int, channels, grad_sel
) -> torch.Tensor:
    if grad_x is None:
        grad_x = like.new_zeros(shape)
    return grad_x.index_add_(dim, channels, grad_sel.to(grad_x.dtype))


class SparseChannelDelta(torch.autograd.Function):
    """``y = apply(x[idx], delta) + apply(x[acc_idx], acc)`` with only ``x[idx]`` saved.

    Args (of ``apply``):
        x: layer input.
        delta: ``[k, *slice_shape]`` trainable slices of the channels ``idx`` (a view of the bank).
        idx: the k channels trained this period (int tensor).
        acc_idx: channels updated in earlier periods (may be empty).
        acc: ``[m, *slice_shape]`` their accumulated deltas (a frozen buffer).
        geometry: the layer's :class:`~trady_peft.geometry.ChannelGeometry`.
    """

    @staticmethod
    def forward(ctx, x, delta, idx, acc_idx, acc, geometry: ChannelGeometry):
        dim = geometry.channel_dim % x.dim()
        out = None
        x_sel = None
        if idx.numel():
            x_sel = _gather(x, dim, idx)
            out = geometry.apply(x_sel, delta.to(x.dtype), idx)
        acc_cast = None
        if acc_idx.numel():
            acc_cast = acc.to(x.dtype)
            y = geometry.apply(_gather(x, dim, acc_idx), acc_cast, acc_idx)
            out = y if out is None else out + y
        ctx.geometry, ctx.dim, ctx.x_shape = geometry, dim, x.shape
        # Keep x[idx] only if the delta needs a gradient; the slices are resident (bank / buffer).
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[1] else None, delta, idx, acc_idx, acc)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_sel, delta, idx, acc_idx, acc = ctx.saved_tensors
        geometry, dim = ctx.geometry, ctx.dim
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            if idx.numel():
                sel_shape = list(ctx.x_shape)
                sel_shape[dim] = idx.numel()
                g = geometry.input_grad(grad_out, torch.Size(sel_shape), delta.to(grad_out.dtype), idx)
                grad_x = _scatter_grad(grad_x, ctx.x_shape, grad_out, dim, idx, g)
            if acc_idx.numel():
                sel_shape = list(ctx.x_shape)
                sel_shape[dim] = acc_idx.numel()
                g = geometry.input_grad(grad_out, torch.Size(sel_shape), acc.to(grad_out.dtype), acc_idx)
                grad_x = _scatter_grad(grad_x, ctx.x_shape, grad_out, dim, acc_idx, g)
        if ctx.needs_input_grad[1] and idx.numel():
            grad_delta = geometry.slice_grad(grad_out, x_sel, delta.to(grad_out.dtype), idx).to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None


class FrozenConv(torch.autograd.Function):
    """Convolution with a frozen weight that keeps no activation for the backward pass.

    The input gradient of a convolution needs only the weight, which is resident anyway, and the
    bias gradient (if the bias trains) only the output gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: ChannelGeometry):
        y = geometry._conv(geometry.pad(x), weight, geometry.groups)
        if bias is not None:
            y = y + bias.to(y.dtype).view(1, -1, *([1] * len(geometry.kernel_size)))
        ctx.geometry, ctx.x_shape = geometry, x.shape
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        geometry = ctx.geometry
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            padded = geometry.padded_shape(ctx.x_shape)
            g, _ = geometry._conv_backward(grad_out, padded, weight, geometry.groups, True, False)
            grad_x = geometry.unpad_grad(g, ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
        return grad_x, None, grad_bias, None


def frozen_conv(x: torch.Tensor, conv: torch.nn.Module, geometry: ChannelGeometry) -> torch.Tensor:
    """Run a frozen ``nn.Conv1d``/``nn.Conv2d`` without keeping its input for backward.

    Falls back to a plain autograd convolution when its weight trains (then the input is
    needed). Both pad as the geometry says, ``static_padding`` module included: pass ``x`` unpadded.
    """
    if conv.weight.requires_grad:
        return geometry.conv_forward(x, conv.weight, conv.bias)
    return FrozenConv.apply(x, conv.weight, conv.bias, geometry)
