"""Custom autograd functions that decide exactly what is kept for the backward pass.

* `SparseChannelDelta` adds the contribution of a few input channels of a layer (the
  channels trained this period, and the accumulated deltas of channels trained earlier). For the
  weight gradient it keeps ``x[:, idx]`` and nothing else of the input ``x``: that is where
  TraDy's activation memory saving comes from. The input gradient is exact.
* `ChannelGradientProbe` adds nothing to a layer's output; its backward adds the gradient that
  the weight slices of a few input channels would get (``dL/dW[:, c]``) into an accumulator, from
  ``x[:, channels]`` (all it keeps) and the output gradient. Channel scoring
  (`trady_peft.selection.statistics.gradient_norms`) runs it on frozen base weights.
* `FrozenConv` is a convolution whose weight is frozen. PyTorch's own convolution keeps
  its input for the backward pass even when no weight gradient is needed
  (pytorch/pytorch#133566); this one keeps only the (resident) weight.

Mixed precision: under ``torch.autocast`` all three compute in the dtype autocast gives a
convolution or matmul (`compute_dtype`), with autocast switched off inside and every
operand cast explicitly, in forward and in backward. So the saved ``x[idx]`` is kept in that
(narrow) dtype, the input gradient comes back in the input's dtype and the delta gradient in the
delta's (fp32 bank). The casts touch only selected channels, the slices and the output gradient;
FrozenConv's backward re-casts the frozen weight, as autocast's forward did, instead of keeping
the cast copy alive between forward and backward.
"""

from __future__ import annotations

import torch

from .geometry import ChannelGeometry

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul/convolution on ``x`` runs in: autocast's where it is on (and would cast
    ``x``: floating, not float64), else ``x``'s own."""
    if x.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _no_autocast(device_type: str):
    """Autocast off for ``device_type``: the functions below cast every operand themselves (and a
    CPU backward runs in the caller's thread, possibly still inside an autocast region)."""
    return torch.autocast(device_type, enabled=False)


def _gather(x: torch.Tensor, dim: int, channels: torch.Tensor) -> torch.Tensor:
    return x.index_select(dim, channels)


def _scatter_grad(
    grad_x: torch.Tensor | None,
    shape: torch.Size,
    dtype: torch.dtype,
    like: torch.Tensor,
    dim: int,
    channels,
    grad_sel,
) -> torch.Tensor:
    if grad_x is None:
        grad_x = like.new_zeros(shape, dtype=dtype)
    return grad_x.index_add_(dim, channels, grad_sel.to(grad_x.dtype))


class SparseChannelDelta(torch.autograd.Function):
    """``y = apply(x[idx], delta) + apply(x[acc_idx], acc)`` with only ``x[idx]`` saved.

    Args (of ``apply``):
        x: layer input.
        delta: ``[k, *slice_shape]`` trainable slices of the channels ``idx`` (a view of the bank).
        idx: the k channels trained this period (int tensor).
        acc_idx: channels updated in earlier periods (may be empty).
        acc: ``[m, *slice_shape]`` their accumulated deltas (a frozen buffer).
        geometry: the layer's `trady_peft.core.geometry.ChannelGeometry`.
    """

    @staticmethod
    def forward(ctx, x, delta, idx, acc_idx, acc, geometry: ChannelGeometry):
        dim = geometry.channel_dim % x.dim()
        dtype = compute_dtype(x)
        out = None
        x_sel = None
        with _no_autocast(x.device.type):
            if idx.numel():
                x_sel = _gather(x, dim, idx).to(dtype)
                out = geometry.apply(x_sel, delta.to(dtype), idx)
            if acc_idx.numel():
                y = geometry.apply(_gather(x, dim, acc_idx).to(dtype), acc.to(dtype), acc_idx)
                out = y if out is None else out + y
        ctx.geometry, ctx.dim, ctx.x_shape, ctx.x_dtype, ctx.dtype = geometry, dim, x.shape, x.dtype, dtype
        # Keep x[idx] only if the delta needs a gradient; the slices are resident (bank / buffer).
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[1] else None, delta, idx, acc_idx, acc)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_sel, delta, idx, acc_idx, acc = ctx.saved_tensors
        geometry, dim, dtype = ctx.geometry, ctx.dim, ctx.dtype
        grad_x = grad_delta = None
        with _no_autocast(grad_out.device.type):
            grad_out = grad_out.to(dtype)
            if ctx.needs_input_grad[0]:
                for channels, slices in ((idx, delta), (acc_idx, acc)):
                    if not channels.numel():
                        continue
                    sel_shape = list(ctx.x_shape)
                    sel_shape[dim] = channels.numel()
                    g = geometry.input_grad(grad_out, torch.Size(sel_shape), slices.to(dtype), channels)
                    grad_x = _scatter_grad(grad_x, ctx.x_shape, ctx.x_dtype, grad_out, dim, channels, g)
            if ctx.needs_input_grad[1] and idx.numel():
                grad_delta = geometry.slice_grad(grad_out, x_sel, delta.to(dtype), idx).to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None


class ChannelGradientProbe(torch.autograd.Function):
    """``y = 0`` (shaped like the layer's output), whose backward adds ``dL/dW`` of the weight slices
    of ``channels`` into ``probe.accumulator``, with only ``x[:, channels]`` saved.

    Adding ``y`` to the layer's output changes nothing, and the output gradient reaches the backward
    unchanged: the slices' gradient is `ChannelGeometry.slice_grad` of that gradient and the
    selected inputs, as for a trained delta (`SparseChannelDelta`) at zero. Successive backwards sum
    into the accumulator, as a dense ``.grad`` does. ``anchor`` (a scalar leaf that requires grad)
    makes the output require grad when nothing before the layer does.

    Args (of ``apply``):
        x: layer input.
        anchor: scalar leaf with ``requires_grad=True``; it gets a zero gradient.
        probe: the `ChannelProbe` (its ``channels``, ``accumulator`` ``[k, *slice_shape]``, and the
            count of backwards that reached it).
        geometry: the layer's `trady_peft.core.geometry.ChannelGeometry`.
        out_shape, out_dtype: the layer output's shape and dtype.
    """

    @staticmethod
    def forward(ctx, x, anchor, probe, geometry: ChannelGeometry, out_shape, out_dtype):
        dim = geometry.channel_dim % x.dim()
        dtype = compute_dtype(x)
        with _no_autocast(x.device.type):
            x_sel = _gather(x, dim, probe.channels).to(dtype)
        ctx.geometry, ctx.dtype, ctx.probe = geometry, dtype, probe
        ctx.save_for_backward(x_sel)
        return x.new_zeros((), dtype=out_dtype).expand(out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        (x_sel,) = ctx.saved_tensors
        probe, dtype = ctx.probe, ctx.dtype
        accumulator = probe.accumulator
        with _no_autocast(grad_out.device.type):
            # Only the shape of the slices matters to the weight gradient: a zero-stride stand-in.
            shape_of_slices = x_sel.new_zeros(()).expand(accumulator.shape)
            grad = ctx.geometry.slice_grad(grad_out.to(dtype), x_sel, shape_of_slices, probe.channels)
            accumulator += grad.reshape(accumulator.shape).to(accumulator.dtype)
        probe.backwards += 1
        return None, torch.zeros_like(probe.anchor), None, None, None, None


class ChannelProbe:
    """What channel scoring asks of one TraDy layer: the gradient of the weight slices of
    ``channels``, summed into ``accumulator`` (``[k, *slice_shape]``, zero to start) by every
    backward (`ChannelGradientProbe`). ``anchor`` is the scalar leaf shared by a scoring pass's
    probes; ``backwards`` counts the backwards that reached this one."""

    def __init__(self, channels: torch.Tensor, accumulator: torch.Tensor, anchor: torch.Tensor):
        self.channels, self.accumulator, self.anchor = channels, accumulator, anchor
        self.backwards = 0

    def __call__(self, x: torch.Tensor, output: torch.Tensor, geometry: ChannelGeometry) -> torch.Tensor:
        """``output`` plus the probe's zero: the layer's output, unchanged, seen by the probe's backward."""
        return output + ChannelGradientProbe.apply(x, self.anchor, self, geometry, output.shape, output.dtype)


class FrozenConv(torch.autograd.Function):
    """Convolution with a frozen weight that keeps no activation for the backward pass.

    The input gradient of a convolution needs only the weight, which is resident anyway, and the
    bias gradient (if the bias trains) only the output gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: ChannelGeometry):
        dtype = compute_dtype(x)
        with _no_autocast(x.device.type):
            # The bias goes into the convolution, as in nn.Conv: the same rounding, so that a
            # disabled (or zero) adapter gives the base layer's output bit for bit.
            y = geometry.conv_forward(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.geometry, ctx.x_shape, ctx.x_dtype, ctx.dtype = geometry, x.shape, x.dtype, dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        geometry, dtype = ctx.geometry, ctx.dtype
        grad_x = grad_bias = None
        with _no_autocast(grad_out.device.type):
            grad_out = grad_out.to(dtype)
            if ctx.needs_input_grad[0]:
                padded = geometry.padded_shape(ctx.x_shape)
                g, _ = geometry._conv_backward(grad_out, padded, weight.to(dtype), geometry.groups, True, False)
                grad_x = geometry.unpad_grad(g, ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1]).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def frozen_conv(x: torch.Tensor, conv: torch.nn.Module, geometry: ChannelGeometry) -> torch.Tensor:
    """Run a frozen ``nn.Conv1d``/``nn.Conv2d`` without keeping its input for backward.

    Falls back to a plain autograd convolution when its weight trains (then the input is
    needed). Both pad as the geometry says, ``static_padding`` module included: pass ``x`` unpadded.
    """
    if conv.weight.requires_grad:
        return geometry.conv_forward(x, conv.weight, conv.bias)
    return FrozenConv.apply(x, conv.weight, conv.bias, geometry)
