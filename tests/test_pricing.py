"""The price of a channel is what its layer really keeps for backward.

For each drawn layer, the activation bytes the budget charges (``LayerCost.activations`` x batch x
element size x selected channels) must equal the bytes autograd saves inside that layer, measured
independently with ``saved_tensors_hooks``: padded or unpadded convolutions, a padding module run
before the convolution (EfficientNet ports), strides, dilations, depthwise kernels larger than the map.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from pricing_check import priced_inputs  # benchmarks/, on pytest's pythonpath
from torch import nn

import trady_peft
from tests.tiny_models import Holder
from trady_peft.core.layer import TraDyLayer


class StaticPaddingConv(nn.Conv2d):
    """Like the EfficientNet-Lite ports: a padding module, then an unpadded convolution."""

    def __init__(self, *args, static_padding: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = static_padding

    def forward(self, x):
        return F.conv2d(
            self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _same_pad(k: int, stride: int = 1) -> nn.Module:
    """TF 'SAME' padding for a fixed 8x8 image, as the ports compute it at construction."""
    pad = max((-(-8 // stride) - 1) * stride + k - 8, 0)
    return nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


CASES = {
    # name: (layer factory, channels per layer)
    "unpadded": (lambda: nn.Conv2d(8, 6, 3), 3),
    "zeros_padding": (lambda: nn.Conv2d(8, 6, 3, padding=1), 3),
    "reflect_padding": (lambda: nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), 3),
    "same_padding": (lambda: nn.Conv2d(8, 6, 4, padding="same"), 3),
    "stride2": (lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1), 3),
    "dilation2": (lambda: nn.Conv2d(8, 6, 3, padding=2, dilation=2), 3),
    "static_zero_pad": (lambda: StaticPaddingConv(8, 6, 3, static_padding=_same_pad(3)), 3),
    "static_zero_pad_stride2": (lambda: StaticPaddingConv(8, 6, 3, stride=2, static_padding=_same_pad(3, 2)), 3),
    "static_reflect_pad": (lambda: StaticPaddingConv(8, 6, 3, static_padding=nn.ReflectionPad2d(1)), 3),
    "static_identity": (lambda: StaticPaddingConv(8, 6, 1, static_padding=nn.Identity()), 3),
    "static_pad_plus_own_padding": (
        lambda: StaticPaddingConv(8, 6, 3, padding=1, static_padding=nn.ZeroPad2d((0, 1, 0, 1))),
        3,
    ),
    "depthwise5x5": (lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), 3),
    "static_depthwise5x5": (
        lambda: StaticPaddingConv(8, 8, 5, groups=8, bias=False, static_padding=nn.ZeroPad2d(2)),
        3,
    ),
}
#: spatial sizes: the 5x5 depthwise cases also on a 1x1 and a 3x3 map (kernel larger than the map).
SIZES = {name: (1, 3) if "depthwise" in name else (6, 11) for name in CASES}
SIZES["reflect_padding"] = SIZES["static_reflect_pad"] = (3, 11)  # reflection needs a map wider than the pad


def saved_bytes_by_layer(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes of distinct non-resident storages autograd packs while each TraDy layer runs (the
    independent instrument, `measure_training_step`)."""
    mem = trady_peft.measure_training_step(model, x)
    layers = {n for n, m in model.base_model.model.named_modules() if isinstance(m, TraDyLayer)}
    by_name = {n.removeprefix("base_model.model."): b for n, b in mem.saved_by_module.items()}
    return {n: b for n, b in by_name.items() if n in layers and b}


def priced_bytes_by_layer(model) -> dict[str, int]:
    """Activation bytes the budget charges for the channels drawn in each layer."""
    return priced_inputs(model.base_model)


@pytest.mark.parametrize("size_index", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_priced_activation_bytes_equal_measured(case, size_index):
    factory, k = CASES[case]
    size = SIZES[case][size_index]
    torch.manual_seed(0)
    base = factory()
    x = torch.randn(4, base.in_channels, size, size, requires_grad=True)  # as inside a network
    expected = base(x).detach()
    config = trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=k, strategy="d-full-random")
    model = get_peft_model(Holder(base), config)
    model.base_model.probe(x)
    model.train()

    saved = saved_bytes_by_layer(model, x)
    priced = priced_bytes_by_layer(model)

    assert set(priced) == {"layer"}
    assert saved == priced, f"{case} at {size}x{size}: measured {saved} != priced {priced}"
    torch.testing.assert_close(model(x), expected)  # and the layer still computes what it wraps


class PaddedNet(nn.Module):
    """EfficientNet-like: static 'same' padding modules before strided and depthwise convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = StaticPaddingConv(3, 8, 3, stride=2, bias=False, static_padding=nn.ZeroPad2d((0, 1, 0, 1)))
        self.dw = StaticPaddingConv(8, 8, 5, groups=8, bias=False, static_padding=nn.ZeroPad2d(2))
        self.down = StaticPaddingConv(
            8, 8, 3, stride=2, groups=8, bias=False, static_padding=nn.ZeroPad2d((0, 1, 0, 1))
        )
        self.tiny = StaticPaddingConv(8, 8, 5, groups=8, bias=False, static_padding=nn.ZeroPad2d(2))
        self.project = nn.Conv2d(8, 6, 1)
        self.pool_to = 1

    def forward(self, x):
        x = F.relu(self.dw(F.relu(self.stem(x))))
        x = self.tiny(F.adaptive_avg_pool2d(self.down(x), self.pool_to))
        return self.project(x)


@pytest.mark.parametrize("size", [8, 16])
def test_byte_budget_prices_what_a_padded_network_keeps(size):
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size)
    config = trady_peft.TraDyConfig(
        target_modules=["stem", "dw", "down", "tiny", "project"], memory_budget="8KiB", strategy="d-full-random"
    )
    model = get_peft_model(PaddedNet(), config)
    model.train()
    model(x)  # the first training forward probes and draws (new index buffers)
    saved = saved_bytes_by_layer(model, x)
    priced = priced_bytes_by_layer(model)
    assert priced, "nothing was drawn"
    assert saved == priced
