"""How a layer's weight is cut into input channels.

TraDy's unit of update is one *input* channel: a column of a Linear weight, the row of a
transformers ``Conv1D`` weight (it stores ``[in, out]``), the slice ``W[:, c]`` of a convolution.
For a grouped or depthwise convolution an input channel only reaches the output channels of its
group, so its slice is ``W[g * og:(g + 1) * og, c % ig]``.

A `ChannelGeometry` knows, for one layer:

* the shape of one channel's slice (``slice_shape``) and how many values it holds;
* how to apply the slices of some channels to the matching input channels (``apply``) and the
  two backward products (``input_grad``, ``slice_grad``), which is all the custom autograd
  functions in `trady_peft.core.autograd` need;
* how to add slices into the dense weight (``scatter_into``), used by merge and by
  ``get_delta_weight``.

Everything here works on the *selected* channels only; nothing allocates a dense ``[out, in]``
tensor except ``scatter_into``, which writes into a weight it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)

_CONV_FN = {1: F.conv1d, 2: F.conv2d}


@dataclass(frozen=True)
class ChannelGeometry:
    """Shape facts of one target layer, seen as a set of input channels.

    Attributes:
        kind: ``"linear"`` (``nn.Linear``), ``"transposed_linear"`` (transformers ``Conv1D``) or ``"conv"``.
        in_channels: number of input channels (``in_features`` for a Linear).
        out_channels: number of output channels.
        groups: convolution groups (1 for linear layers).
        kernel_size: spatial kernel size (empty for linear layers).
        stride, dilation: convolution stride and dilation.
        padding: integer padding passed to the convolution.
        pre_pad: explicit ``F.pad`` amounts when the layer pads asymmetrically, with a mode other
            than zeros, or with a padding module run before the convolution (``static_padding``,
            as in the EfficientNet ports), else ``None``. The layer's input is padded inside the
            autograd functions, so what is kept for backward is the *unpadded* input.
        pad_mode: ``F.pad`` mode for ``pre_pad``.
        pad_value: fill value of a ``"constant"`` ``pre_pad``.
    """

    kind: str
    in_channels: int
    out_channels: int
    groups: int = 1
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pre_pad: tuple[int, ...] | None = None
    pad_mode: str = "constant"
    pad_value: float = 0.0

    @classmethod
    def of(cls, layer: nn.Module) -> ChannelGeometry:
        """Read the geometry of a supported layer; raise a clear error for anything else."""
        if isinstance(layer, nn.Linear):
            return cls("linear", layer.in_features, layer.out_features)
        if isinstance(layer, Conv1D):
            return cls("transposed_linear", layer.weight.shape[0], layer.weight.shape[1])
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            stock = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Conv1d
            same_math = type(layer).forward is stock.forward or getattr(type(layer), "_computes_stock_conv", False)
            if not same_math and not isinstance(getattr(layer, "static_padding", None), nn.Module):
                raise TypeError(
                    f"{type(layer).__name__} subclasses {stock.__name__} with its own forward, which TraDy cannot "
                    "reproduce (only a `static_padding` module applied before the convolution is understood). "
                    "Add it to exclude_modules."
                )
            if layer.transposed:
                raise TypeError(f"Transposed convolutions are not supported by TraDy (got {layer}).")
            pre_pad, pad_mode, pad_value, padding = _conv_padding(layer, with_static_padding=not same_math)
            return cls(
                "conv",
                layer.in_channels,
                layer.out_channels,
                groups=layer.groups,
                kernel_size=tuple(layer.kernel_size),
                stride=tuple(layer.stride),
                padding=padding,
                dilation=tuple(layer.dilation),
                pre_pad=pre_pad,
                pad_mode=pad_mode,
                pad_value=pad_value,
            )
        raise TypeError(
            f"TraDy cannot wrap a {type(layer).__name__}: supported layers are nn.Linear, nn.Conv1d, "
            "nn.Conv2d and transformers' Conv1D. Remove it from target_modules or add it to exclude_modules."
        )

    # ----------------------------------------------------------------------------------- shapes
    @property
    def channel_dim(self) -> int:
        """Dimension of the layer input that indexes channels."""
        return 1 if self.kind == "conv" else -1

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """Shape of the weight values one input channel owns."""
        return (self.out_per_group, *self.kernel_size)

    @property
    def slice_numel(self) -> int:
        n = self.out_per_group
        for k in self.kernel_size:
            n *= k
        return n

    # ------------------------------------------------------------------------- conv helpers
    def _output_channels(self, channels: torch.Tensor) -> torch.Tensor:
        """Output channels reached by each selected input channel of a grouped conv, flattened."""
        og = self.out_per_group
        group = torch.div(channels.long(), self.in_per_group, rounding_mode="floor")
        return (group[:, None] * og + torch.arange(og, device=channels.device)).reshape(-1)

    def _conv_weight(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices ``[k, og, *kernel]`` as a convolution weight over the k selected channels."""
        if self.groups == 1:
            return slices.transpose(0, 1)  # [out, k, *kernel]
        return slices.reshape(-1, 1, *self.kernel_size)  # one group per selected channel

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is None:
            return x
        if self.pad_mode == "constant":
            return F.pad(x, self.pre_pad, value=self.pad_value)
        return F.pad(x, self.pre_pad, mode=self.pad_mode)

    def padded_shape(self, shape: torch.Size) -> torch.Size:
        if self.pre_pad is None:
            return shape
        dims = list(shape)
        for i in range(len(self.pre_pad) // 2):
            dims[-1 - i] += self.pre_pad[2 * i] + self.pre_pad[2 * i + 1]
        return torch.Size(dims)

    def unpad_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Adjoint of `pad`: padding is linear, so its adjoint does not depend on values."""
        if self.pre_pad is None:
            return grad
        with torch.enable_grad():
            z = torch.zeros(shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.pad(z), z, grad)
        return g

    def conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The whole layer on its unpadded input with plain autograd ops (padding included)."""
        return _CONV_FN[len(self.kernel_size)](
            self.pad(x), weight, bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return _CONV_FN[len(self.kernel_size)](x, weight, None, self.stride, self.padding, self.dilation, groups)

    def _conv_backward(self, grad_out, x_or_shape, weight, groups, need_input, need_weight):
        if isinstance(x_or_shape, torch.Tensor):
            x = x_or_shape
        else:  # only the shape is known: the input gradient needs no input values
            x = grad_out.new_empty(1).expand(x_or_shape)
        g_in, g_w, _ = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * len(self.kernel_size),
            groups,
            [need_input, need_weight, False],
        )
        return g_in, g_w

    # ------------------------------------------------------------------- forward / backward
    def apply(self, x_sel: torch.Tensor, slices: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """Contribution to the layer output of the selected input channels ``x_sel`` through ``slices``.

        ``x_sel`` holds the selected channels of the (unpadded) layer input, ``slices`` is
        ``[k, *slice_shape]`` and ``channels`` the k channel indices.
        """
        if self.kind != "conv":
            return x_sel @ slices  # [..., k] @ [k, out]
        x_sel = self.pad(x_sel)
        if self.groups == 1:
            return self._conv(x_sel, self._conv_weight(slices), 1)
        y = self._conv(x_sel, self._conv_weight(slices), x_sel.shape[1])
        out = y.new_zeros(y.shape[0], self.out_channels, *y.shape[2:])
        return out.index_add_(1, self._output_channels(channels), y)

    def input_grad(
        self, grad_out: torch.Tensor, sel_shape: torch.Size, slices: torch.Tensor, channels: torch.Tensor
    ) -> torch.Tensor:
        """Gradient w.r.t. the selected input channels (shape ``sel_shape``) of `apply`."""
        if self.kind != "conv":
            return grad_out @ slices.t()
        padded = self.padded_shape(sel_shape)
        if self.groups == 1:
            g, _ = self._conv_backward(grad_out, padded, self._conv_weight(slices), 1, True, False)
        else:
            g_sel = grad_out.index_select(1, self._output_channels(channels))
            g, _ = self._conv_backward(g_sel, padded, self._conv_weight(slices), sel_shape[1], True, False)
        return self.unpad_grad(g, sel_shape)

    def slice_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, slices: torch.Tensor, channels: torch.Tensor
    ) -> torch.Tensor:
        """Gradient w.r.t. ``slices`` of `apply`, computed from the selected inputs only."""
        if self.kind != "conv":
            k = x_sel.shape[-1]
            return x_sel.reshape(-1, k).t() @ grad_out.reshape(-1, grad_out.shape[-1])
        x_sel = self.pad(x_sel)
        weight = self._conv_weight(slices)
        if self.groups == 1:
            _, g = self._conv_backward(grad_out, x_sel, weight, 1, False, True)
            return g.transpose(0, 1)
        g_sel = grad_out.index_select(1, self._output_channels(channels))
        _, g = self._conv_backward(g_sel, x_sel, weight, x_sel.shape[1], False, True)
        return g.reshape(slices.shape)

    # ------------------------------------------------------------------------------ weights
    def _slice_index(self, channels: torch.Tensor):
        """Advanced index into the dense weight selecting ``[k, *slice_shape]`` (channels unique)."""
        channels = channels.long()
        if self.kind == "linear":  # weight [out, in]: channel = column
            return (slice(None), channels), lambda t: t.t(), lambda s: s.t()
        if self.kind == "transposed_linear":  # weight [in, out]: channel = row
            return (channels,), lambda t: t, lambda s: s
        if self.groups == 1:  # weight [out, in, *kernel]
            return (slice(None), channels), lambda t: t.transpose(0, 1), lambda s: s.transpose(0, 1)
        rows = self._output_channels(channels).view(-1, self.out_per_group)  # weight [out, in/groups, *kernel]
        cols = (channels % self.in_per_group)[:, None].expand_as(rows)
        return (rows, cols), lambda t: t, lambda s: s

    def read_slices(self, weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """The slices ``[k, *slice_shape]`` of ``channels`` in a dense weight (a copy)."""
        index, to_slices, _ = self._slice_index(channels)
        return to_slices(weight[index]).clone()

    def write_slices(self, weight: torch.Tensor, channels: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """Overwrite the slices of ``channels`` (unique) in ``weight`` in place."""
        index, _, to_weight = self._slice_index(channels)
        weight[index] = to_weight(slices.to(weight.dtype))
        return weight

    def scatter_into(self, weight: torch.Tensor, channels: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """Add ``slices`` of ``channels`` (unique) into the dense ``weight`` in place."""
        current = self.read_slices(weight, channels)
        return self.write_slices(weight, channels, current + slices.to(current.dtype))


# ------------------------------------------------------------------------------- padding
#: padding modules a convolution subclass may run before itself (``static_padding``), by F.pad mode.
_PAD_MODULES: dict[type, str] = {
    nn.ZeroPad1d: "constant",
    nn.ZeroPad2d: "constant",
    nn.ConstantPad1d: "constant",
    nn.ConstantPad2d: "constant",
    nn.ReflectionPad1d: "reflect",
    nn.ReflectionPad2d: "reflect",
    nn.ReplicationPad1d: "replicate",
    nn.ReplicationPad2d: "replicate",
    nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular",
}


def _is_identity(module: nn.Module) -> bool:
    """nn.Identity, or a stateless module named ``Identity`` (the EfficientNet ports ship their own)."""
    if type(module) is nn.Identity:
        return True
    if type(module).__name__ != "Identity" or any(True for _ in module.children()):
        return False
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    probe = torch.arange(6.0).view(1, 1, 2, 3)
    with torch.no_grad():
        out = module(probe)
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.equal(out, probe)


def _static_padding(layer: nn.Module, ndim: int) -> tuple[tuple[int, ...], str, float] | None:
    """``(F.pad amounts, mode, value)`` of the layer's ``static_padding`` module; None if it pads nothing."""
    module = getattr(layer, "static_padding", None)
    if not isinstance(module, nn.Module) or _is_identity(module):
        return None
    mode = _PAD_MODULES.get(type(module))
    amounts = tuple(int(a) for a in getattr(module, "padding", ()))
    if mode is None or len(amounts) > 2 * ndim:
        raise TypeError(
            f"{type(layer).__name__}.static_padding is a {type(module).__name__}, which TraDy cannot reproduce "
            f"for a {ndim}-d convolution (understood: nn.Identity and 1d/2d ZeroPad, ConstantPad, ReflectionPad, "
            "ReplicationPad, CircularPad modules). Add the layer to exclude_modules."
        )
    if not any(amounts):
        return None
    value = float(getattr(module, "value", 0.0)) if mode == "constant" else 0.0
    return amounts + (0,) * (2 * ndim - len(amounts)), mode, value


def _conv_padding(
    layer: nn.Module, with_static_padding: bool
) -> tuple[tuple[int, ...] | None, str, float, tuple[int, ...]]:
    """``(pre_pad, pad_mode, pad_value, padding)`` computing ``conv(static_padding(x))`` with stock padding.

    The convolution's own padding follows ``nn.Conv._conv_forward``: an integer zero padding is
    done by the convolution, anything else (``padding="same"``, a ``padding_mode`` other than
    zeros) by ``F.pad`` first. A ``static_padding`` module runs before it; both are folded into
    one ``F.pad`` (plus the convolution's zero padding) so that the layer can save its
    *unpadded* input and pad inside its autograd functions.
    """
    ndim = len(layer.kernel_size)
    no_padding = (0,) * ndim
    own = tuple(int(a) for a in layer._reversed_padding_repeated_twice)  # F.pad order, also for "same"
    own_mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    static = _static_padding(layer, ndim) if with_static_padding else None
    if static is None:
        if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            return None, "constant", 0.0, tuple(layer.padding)
        return (own if any(own) else None), own_mode, 0.0, no_padding
    amounts, mode, value = static
    if not any(own):  # the convolution pads nothing itself
        return amounts, mode, value, no_padding
    if own_mode == "constant" and mode == "constant" and value == 0.0:  # zeros, then zeros: one F.pad
        return tuple(a + b for a, b in zip(amounts, own)), "constant", 0.0, no_padding
    if own_mode == "constant" and all(own[i] == own[i + 1] for i in range(0, len(own), 2)):
        # the module's padding, then a symmetric zero padding the convolution does itself
        return amounts, mode, value, tuple(own[2 * (ndim - 1 - d)] for d in range(ndim))
    raise TypeError(
        f"{type(layer).__name__} pads twice ({type(layer.static_padding).__name__} before the convolution, then "
        f"padding={layer.padding!r} with padding_mode={layer.padding_mode!r}), which TraDy cannot reproduce. "
        "Add the layer to exclude_modules."
    )
