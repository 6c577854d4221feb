"""Acceptance 1: the sparse layers' gradients equal the dense reference, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft
from tests.tiny_models import Holder


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Identity(nn.Module):
    """The EfficientNet ports' own identity, used as ``static_padding`` where no padding is needed."""

    def forward(self, input):
        return input


def padded_conv(stock: type, *args, static_padding: nn.Module, **kwargs) -> nn.Module:
    """A ``stock`` convolution subclass that runs ``static_padding`` before itself."""

    class PaddedConv(stock):
        def forward(self, x):
            return self._conv_forward(self.static_padding(x), self.weight, self.bias)

    conv = PaddedConv(*args, **kwargs)
    conv.static_padding = static_padding
    return conv


LAYERS = {
    "linear": lambda: nn.Linear(12, 7),
    "conv1d": lambda: nn.Conv1d(6, 5, 3, stride=2, padding=1),
    "conv2d": lambda: nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2),
    "conv2d_grouped": lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2),
    "conv2d_depthwise": lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False),
    "conv2d_same_reflect": lambda: nn.Conv2d(6, 5, 4, padding="same", padding_mode="reflect"),
    "hf_conv1d": lambda: Conv1D(7, 12),
    "static_zero_pad_stride2": lambda: padded_conv(
        nn.Conv2d, 6, 5, 3, stride=2, static_padding=nn.ZeroPad2d((0, 1, 0, 1))
    ),
    "static_zero_pad_then_same": lambda: padded_conv(
        nn.Conv2d, 6, 5, 4, padding="same", static_padding=nn.ZeroPad2d((1, 0, 2, 0))
    ),
    "static_reflect_then_zeros": lambda: padded_conv(
        nn.Conv2d, 6, 4, 3, padding=1, groups=2, static_padding=nn.ReflectionPad2d((1, 2, 0, 1))
    ),
    "static_constant_dilated": lambda: padded_conv(
        nn.Conv2d, 6, 6, 3, dilation=2, groups=6, static_padding=nn.ConstantPad2d((1, 0, 2, 1), 0.5)
    ),
    "static_port_identity": lambda: padded_conv(nn.Conv2d, 6, 5, 3, padding=1, static_padding=Identity()),
    "static_replicate_conv1d": lambda: padded_conv(
        nn.Conv1d, 6, 5, 3, stride=2, padding_mode="reflect", static_padding=nn.ReplicationPad1d(2)
    ),
}
INPUTS = {
    "linear": (3, 4, 12),
    "conv1d": (2, 6, 9),
    "conv2d": (2, 6, 9, 8),
    "conv2d_grouped": (2, 6, 7, 7),
    "conv2d_depthwise": (2, 6, 7, 7),
    "conv2d_same_reflect": (2, 6, 7, 6),
    "hf_conv1d": (3, 4, 12),
    "static_zero_pad_stride2": (2, 6, 8, 7),
    "static_zero_pad_then_same": (2, 6, 7, 6),
    "static_reflect_then_zeros": (2, 6, 5, 6),
    "static_constant_dilated": (2, 6, 4, 5),
    "static_port_identity": (2, 6, 5, 5),
    "static_replicate_conv1d": (2, 6, 9),
}


def reference_output(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's own computation with ``weight`` in place of its weight."""
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    static_padding = getattr(base, "static_padding", None)
    if static_padding is not None:
        x = static_padding(x)
    return base._conv_forward(x, weight, base.bias)


def channel_slices(base: nn.Module, dense: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The rows/columns/slices of a dense weight-shaped tensor owned by ``channels``, written
    out independently of the library: ``[k, *slice_shape]``."""
    if isinstance(base, Conv1D):
        return dense[channels]
    if isinstance(base, nn.Linear):
        return dense[:, channels].t()
    groups = base.groups
    og, ig = base.out_channels // groups, base.in_channels // groups
    return torch.stack([dense[(c // ig) * og : (c // ig + 1) * og, c % ig] for c in channels.tolist()])


def dense_from_slices(base: nn.Module, channels: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`channel_slices`: a zero weight-shaped tensor holding ``slices``."""
    dense = torch.zeros_like(base.weight)
    for c, s in zip(channels.tolist(), slices.to(dense.dtype)):
        if isinstance(base, Conv1D):
            dense[c] += s
        elif isinstance(base, nn.Linear):
            dense[:, c] += s
        else:
            og, ig = base.out_channels // base.groups, base.in_channels // base.groups
            dense[(c // ig) * og : (c // ig + 1) * og, c % ig] += s
    return dense


def dense_reference(layer, base, reference_base, x, probe, reference=None):
    """The layer's full effective weight (base + accumulated store + current delta) as a leaf, run
    through the stock layer: returns (input leaf, weight leaf, output), after the backward of ``probe``."""
    channels = layer.trady_idx["default"].long()
    w_eff = (
        reference_base.weight.detach()
        + dense_from_slices(base, layer.trady_indices["default"].long(), layer.trady_values["default"])
        + dense_from_slices(base, channels, layer.trady_delta["default"]().detach())
    ).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = (reference or reference_output)(reference_base, x_ref, w_eff)
    (out_ref * probe).sum().backward()
    return x_ref, w_eff, out_ref


@pytest.mark.parametrize("kind", list(LAYERS))
def test_delta_and_input_gradients_match_dense_reference(kind):
    torch.manual_seed(0)
    base = LAYERS[kind]()
    reference_base = LAYERS[kind]()
    reference_base.load_state_dict(base.state_dict())
    model = get_peft_model(
        Holder(base), trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=0.5, init_weights=False)
    )
    tuner, layer = model.base_model, model.base_model.model.layer
    # Train one period so the accumulated store is non-empty, then draw a new selection.
    tuner.next_period()
    with torch.no_grad():
        tuner.trady_bank["default"].weight.normal_()
    channels = layer.trady_idx["default"].long()
    assert 0 < channels.numel() < layer.in_features
    assert layer.trady_indices["default"].numel() > 0

    x = torch.randn(INPUTS[kind], requires_grad=True)
    out = model(x)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()

    view = layer.trady_delta["default"]
    x_ref, w_eff, out_ref = dense_reference(layer, base, reference_base, x, probe)

    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    delta_grad = tuner.trady_bank["default"].weight.grad
    got = delta_grad[view.offset : view.offset + view.numel].view(channels.numel(), *view.slice_shape)
    torch.testing.assert_close(got, channel_slices(reference_base, w_eff.grad, channels), rtol=0, atol=1e-10)
    # The base weight is frozen and receives no gradient.
    assert layer.base_layer.weight.grad is None


class StaticSamePaddingConv(nn.Conv2d):
    """Like the EfficientNet ports: a padding module runs before an unpadded convolution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, 1, self.groups)


class UnknownConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x * 2)


def test_static_padding_conv_subclass_matches_its_own_forward():
    torch.manual_seed(0)
    base = StaticSamePaddingConv(4, 6, 3, stride=2, groups=2)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    expected = base(x)
    model = get_peft_model(Holder(base), trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=2))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_conv_subclass_with_unknown_forward_is_refused():
    with pytest.raises(TypeError, match="UnknownConv.*exclude_modules"):
        get_peft_model(Holder(UnknownConv(4, 4, 3)), trady_peft.TraDyConfig(target_modules=["layer"]))


@pytest.mark.parametrize(
    "static_padding, conv_kwargs, message",
    [
        (nn.Upsample(scale_factor=2), {}, "static_padding is a Upsample"),
        (nn.ZeroPad3d(1), {}, "static_padding is a ZeroPad3d"),
        (nn.ZeroPad2d(1), {"padding": 1, "padding_mode": "reflect"}, "pads twice"),
        (nn.ReflectionPad2d(1), {"padding": (1, 2), "padding_mode": "zeros"}, None),
    ],
)
def test_static_padding_that_cannot_be_reproduced_is_refused(static_padding, conv_kwargs, message):
    base = padded_conv(nn.Conv2d, 4, 4, 3, static_padding=static_padding, **conv_kwargs)
    config = trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=2)
    if message is None:  # a reflection, then an (asymmetric-free) zero padding: understood
        x = torch.randn(1, 4, 6, 6)
        torch.testing.assert_close(get_peft_model(Holder(base), config)(x), base(x), rtol=0, atol=1e-12)
        return
    with pytest.raises(TypeError, match=f"{message}.*exclude_modules"):
        get_peft_model(Holder(base), config)


def test_static_padding_conv_with_trainable_base_weight_is_padded_once():
    torch.manual_seed(0)
    base = StaticSamePaddingConv(4, 6, 3, stride=1)
    x = torch.randn(1, 4, 8, 8)
    expected = base(x)
    model = get_peft_model(Holder(base), trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=2))
    model.base_model.model.layer.base_layer.weight.requires_grad_(True)  # as during Det-RGN scoring
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
