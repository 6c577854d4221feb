"""Frozen modules on the backprop path that keep only what the input gradient needs.

Between the loss and the lowest trained channel, gradients flow through frozen layers. PyTorch
keeps, for their backward pass, far more than the input gradient needs (pytorch/pytorch#133566):

* a frozen convolution keeps its whole input, though its input gradient needs only the weight;
* a batch norm keeps its input;
* a ReLU/ReLU6 keeps a float copy of its output, though its gradient needs one bit per element.

On a MobileNetV2 that is nearly all of full fine-tuning's activation memory. The classes below
are drop-in subclasses of the torch modules (same parameters, buffers and state-dict keys; the
swap is a change of ``__class__``, undone by ``restore``) whose autograd keeps only that:

* ``FrozenPathConv1d/2d``: nothing but the (resident) weight;
* ``FrozenPathBatchNorm1d/2d``: nothing. Their statistics are frozen: in training they normalise
  with the running statistics, as a batch norm fused into its conv on a device does. (Batch
  statistics would need the input kept.) Outputs and gradients equal the original in eval mode;
* ``FrozenPathReLU``, ``ReLU6``, ``LeakyReLU``, ``Hardtanh``: a bit-packed mask, 1 bit per element.

Transformers' frozen path (gated MLPs, formula GELUs, dropout) has its twins in
`trady_peft.memory.frozen_path.transformers`, and a causal LM's frozen head with its cross-entropy in
`trady_peft.memory.frozen_path.loss`; `apply_memory_saving` and `restore` handle all of them.

The tuner applies them (``TraDyConfig(memory_saving_frozen_path=True)``, the default) to frozen
modules only; a module whose own parameters train keeps PyTorch's behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.autograd import FrozenConv
from ...core.geometry import ChannelGeometry
from .common import needs_grad, pack_bits, unpack_bits


class _PiecewiseLinear(torch.autograd.Function):
    """y = f(x) for a piecewise-linear f with slope 1 where ``mask`` and ``negative_slope`` elsewhere."""

    @staticmethod
    def forward(ctx, x, fn, mask_fn, negative_slope: float):
        y = fn(x)
        ctx.shape, ctx.negative_slope = x.shape, negative_slope
        ctx.save_for_backward(pack_bits(mask_fn(x)))
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        if ctx.negative_slope:
            return torch.where(mask, grad, grad * ctx.negative_slope), None, None, None
        return grad * mask, None, None, None


class FrozenPathReLU(nn.ReLU):
    def forward(self, x):
        if not needs_grad(x):
            return super().forward(x)
        return _PiecewiseLinear.apply(x, F.relu, lambda t: t > 0, 0.0)


class FrozenPathReLU6(nn.ReLU6):
    def forward(self, x):
        if not needs_grad(x):
            return super().forward(x)
        return _PiecewiseLinear.apply(x, F.relu6, lambda t: (t > 0) & (t < 6), 0.0)


class FrozenPathHardtanh(nn.Hardtanh):
    def forward(self, x):
        if not needs_grad(x):
            return super().forward(x)
        lo, hi = self.min_val, self.max_val
        return _PiecewiseLinear.apply(x, lambda t: F.hardtanh(t, lo, hi), lambda t: (t > lo) & (t < hi), 0.0)


class FrozenPathLeakyReLU(nn.LeakyReLU):
    def forward(self, x):
        if not needs_grad(x) or self.negative_slope == 0:
            return super().forward(x)
        slope = self.negative_slope
        return _PiecewiseLinear.apply(x, lambda t: F.leaky_relu(t, slope), lambda t: t > 0, slope)


def _bn_scale_shift(mean, var, weight, bias, eps, dtype):
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale.to(dtype), shift.to(dtype)


class _FrozenBatchNorm(torch.autograd.Function):
    """Batch norm with frozen statistics and affine: ``y = x * scale + shift`` per channel.

    Saves only the resident running variance and weight, from which backward recomputes ``scale``.
    """

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps: float):
        scale, shift = _bn_scale_shift(mean, var, weight, bias, eps, x.dtype)
        view = (1, -1) + (1,) * (x.dim() - 2)
        ctx.view, ctx.eps = view, eps
        ctx.save_for_backward(var, weight)
        return x * scale.view(view) + shift.view(view)

    @staticmethod
    def backward(ctx, grad):
        var, weight = ctx.saved_tensors
        scale = torch.rsqrt(var + ctx.eps)
        if weight is not None:
            scale = scale * weight
        return grad * scale.to(grad.dtype).view(ctx.view), None, None, None, None, None


class _FrozenPathBatchNorm:
    def forward(self, x):
        trains = (self.weight is not None and self.weight.requires_grad) or (
            self.bias is not None and self.bias.requires_grad
        )
        if trains or not self.track_running_stats or self.running_mean is None:
            return super().forward(x)
        if not needs_grad(x):
            scale, shift = _bn_scale_shift(
                self.running_mean, self.running_var, self.weight, self.bias, self.eps, x.dtype
            )
            view = (1, -1) + (1,) * (x.dim() - 2)
            return x * scale.view(view) + shift.view(view)
        return _FrozenBatchNorm.apply(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class FrozenPathBatchNorm1d(_FrozenPathBatchNorm, nn.BatchNorm1d):
    pass


class FrozenPathBatchNorm2d(_FrozenPathBatchNorm, nn.BatchNorm2d):
    pass


class _FrozenPathConv:
    _computes_stock_conv = True  # same arithmetic as nn.Conv (ChannelGeometry may wrap it)

    def forward(self, x):
        if self.weight.requires_grad or not needs_grad(x):
            return super().forward(x)
        geometry = self.__dict__.get("_trady_geometry")
        if geometry is None:
            geometry = self.__dict__["_trady_geometry"] = ChannelGeometry.of(self)
        return FrozenConv.apply(x, self.weight, self.bias, geometry)


class FrozenPathConv1d(_FrozenPathConv, nn.Conv1d):
    pass


class FrozenPathConv2d(_FrozenPathConv, nn.Conv2d):
    pass


#: original class -> memory-saving class. Exact types only: a subclass may compute something else.
REPLACEMENTS: dict[type, type] = {
    nn.ReLU: FrozenPathReLU,
    nn.ReLU6: FrozenPathReLU6,
    nn.Hardtanh: FrozenPathHardtanh,
    nn.LeakyReLU: FrozenPathLeakyReLU,
    nn.BatchNorm1d: FrozenPathBatchNorm1d,
    nn.BatchNorm2d: FrozenPathBatchNorm2d,
    nn.Conv1d: FrozenPathConv1d,
    nn.Conv2d: FrozenPathConv2d,
}
ORIGINALS = {v: k for k, v in REPLACEMENTS.items()}
