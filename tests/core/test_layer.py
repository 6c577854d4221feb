"""The channel-sparse layer: its output, input gradient and delta gradient equal a dense reference,
exactly in float64 for every layer kind and within the narrow dtype's tolerance under autocast; the
bank, its gradient and the accumulated store stay in fp32, also over a half-precision base."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft
from tests.references import (
    AUTOCAST_DTYPES,
    AUTOCAST_TOL,
    assert_close_rel,
    channel_slices,
    dense_reference,
)
from tests.references import reference_output as _reference_output
from tests.tiny_models import Holder, StaticSamePaddingConv, padded_conv, tiny_llama


class Identity(nn.Module):
    """The EfficientNet ports' own identity, used as ``static_padding`` where no padding is needed."""

    def forward(self, input):
        return input


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


@pytest.mark.usefixtures("float64_default")
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


KINDS = {**LAYERS, "static_padding_conv": lambda: StaticSamePaddingConv(4, 6, 3, stride=2, groups=2)}


SHAPES = {**INPUTS, "static_padding_conv": (2, 4, 8, 8)}


def reference_output(base, x, weight):
    if isinstance(base, StaticSamePaddingConv):
        return torch.nn.functional.conv2d(base.static_padding(x), weight, base.bias, base.stride, 0, 1, base.groups)
    return _reference_output(base, x, weight)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_trady_layer_backward_under_autocast_matches_fp32_reference(kind, dtype, backward_inside):
    torch.manual_seed(0)
    base = KINDS[kind]()
    reference_base = KINDS[kind]()
    reference_base.load_state_dict(base.state_dict())
    model = get_peft_model(
        Holder(base),
        trady_peft.TraDyConfig(
            target_modules=["layer"], channels_per_layer=0.5, init_weights=False, strategy="d-full-random"
        ),
    )
    tuner, layer = model.base_model, model.base_model.model.layer
    tuner.next_period()  # non-empty accumulated store, then a new selection
    bank = tuner.trady_bank["default"].weight
    with torch.no_grad():
        bank.normal_(0, 0.3)
    channels = layer.trady_idx["default"].long()
    assert channels.numel() > 0 and layer.trady_indices["default"].numel() > 0

    x = torch.randn(SHAPES[kind], requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        assert out.dtype == dtype
        probe = torch.randn(out.shape)
        if backward_inside:
            (out.float() * probe).sum().backward()
    if not backward_inside:
        (out.float() * probe).sum().backward()

    view = layer.trady_delta["default"]
    x_ref, w_eff, out_ref = dense_reference(layer, base, reference_base, x, probe, reference_output)  # fp32

    tol = AUTOCAST_TOL[dtype]
    assert_close_rel(out, out_ref, tol, "output")
    assert x.grad.dtype == torch.float32
    assert_close_rel(x.grad, x_ref.grad, tol, "input gradient")
    assert bank.dtype == torch.float32 and bank.grad.dtype == torch.float32
    got = bank.grad[view.offset : view.offset + view.numel].view(channels.numel(), *view.slice_shape)
    assert_close_rel(got, channel_slices(reference_base, w_eff.grad, channels), tol, "delta gradient")
    assert layer.base_layer.weight.grad is None
    tuner.next_period()  # folding after a mixed-precision step keeps the store in fp32
    assert layer.trady_values["default"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward_keeps_fp32_deltas(dtype):
    model = get_peft_model(tiny_llama().to(dtype), trady_peft.TraDyConfig(channels_per_layer=4))
    bank = model.base_model.trady_bank["default"].weight
    assert bank.dtype == torch.float32
    out = model(input_ids=torch.arange(16).view(2, 8), labels=torch.arange(16).view(2, 8))
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert bank.grad is not None and bank.grad.dtype == torch.float32 and bank.grad.abs().sum() > 0
    for _, layer in model.base_model.trady_layers("default"):
        assert layer.trady_values["default"].dtype == torch.float32


def test_tiny_update_survives_folding_over_bf16_base():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), trady_peft.TraDyConfig(channels_per_layer=4))
    tuner = model.base_model
    with torch.no_grad():
        tuner.trady_bank["default"].weight.fill_(1e-6)  # far below bf16's resolution near 1
    tuner.next_period()
    stored = [layer.trady_values["default"] for _, layer in tuner.trady_layers("default")]
    assert all(torch.all(v == 1e-6) for v in stored)
