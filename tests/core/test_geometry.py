"""How a layer is cut into input channels: convolution subclasses with a padding module before them
(the EfficientNet ports) are reproduced exactly, and what cannot be reproduced is refused."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import trady_peft
from tests.tiny_models import Holder, StaticSamePaddingConv, padded_conv

pytestmark = pytest.mark.usefixtures("float64_default")


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
