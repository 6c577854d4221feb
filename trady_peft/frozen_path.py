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
`trady_peft.frozen_path_transformers`, and a causal LM's frozen head with its cross-entropy in
`trady_peft.frozen_path_loss`; `apply_memory_saving` and `restore` handle all of them.

The tuner applies them (``TraDyConfig(memory_saving_frozen_path=True)``, the default) to frozen
modules only; a module whose own parameters train keeps PyTorch's behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import FrozenConv
from .geometry import ChannelGeometry

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 elements per byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    bits = (packed[:, None] & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:n].view(shape)


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


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class FrozenPathReLU(nn.ReLU):
    def forward(self, x):
        if not _needs_grad(x):
            return super().forward(x)
        return _PiecewiseLinear.apply(x, F.relu, lambda t: t > 0, 0.0)


class FrozenPathReLU6(nn.ReLU6):
    def forward(self, x):
        if not _needs_grad(x):
            return super().forward(x)
        return _PiecewiseLinear.apply(x, F.relu6, lambda t: (t > 0) & (t < 6), 0.0)


class FrozenPathHardtanh(nn.Hardtanh):
    def forward(self, x):
        if not _needs_grad(x):
            return super().forward(x)
        lo, hi = self.min_val, self.max_val
        return _PiecewiseLinear.apply(x, lambda t: F.hardtanh(t, lo, hi), lambda t: (t > lo) & (t < hi), 0.0)


class FrozenPathLeakyReLU(nn.LeakyReLU):
    def forward(self, x):
        if not _needs_grad(x) or self.negative_slope == 0:
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
        if not _needs_grad(x):
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
        if self.weight.requires_grad or not _needs_grad(x):
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


def apply_memory_saving(model: nn.Module) -> list[str]:
    """Swap every frozen ReLU-family, batch-norm and convolution module of ``model``, and the
    transformers frozen-path modules of `trady_peft.frozen_path_transformers` (gated MLPs,
    formula activations, dropouts), for its memory-saving twin, in place; a causal LM's frozen
    output embedding and its cross-entropy get `trady_peft.frozen_path_loss`'s fused loss. Returns
    the names of the swapped modules."""
    from .frozen_path_loss import apply_fused_loss
    from .frozen_path_transformers import twin_class
    from .layer import TraDyLayer

    inside_tuner = {id(m) for layer in model.modules() if isinstance(layer, TraDyLayer) for m in layer.modules()}
    swapped = []
    for name, module in model.named_modules():
        new_cls = REPLACEMENTS.get(type(module))
        if new_cls is None and id(module) not in inside_tuner:
            new_cls = twin_class(module)  # None for a module whose own parameters train
        if new_cls is None or id(module) in inside_tuner:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # a module that trains keeps PyTorch's own backward
        module.__class__ = new_cls
        swapped.append(name)
    return swapped + apply_fused_loss(model, inside_tuner)


def restore(model: nn.Module) -> int:
    """Undo `apply_memory_saving`. Returns the number of modules restored."""
    from .frozen_path_loss import restore_loss
    from .frozen_path_transformers import original_class

    count = restore_loss(model)
    for module in model.modules():
        original = ORIGINALS.get(type(module)) or original_class(module)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_trady_geometry", None)
            count += 1
    return count
