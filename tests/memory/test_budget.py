"""How memory is counted: the paper's per-layer accounting, the budget's units, the bank's share of a
byte budget, and the price of a channel.

A channel's price is what its layer really keeps for backward: for each drawn layer, the activation
bytes the budget charges (``LayerCost.activations`` x batch x element size x selected channels) must
equal the bytes autograd saves inside that layer, measured independently with ``saved_tensors_hooks``:
padded or unpadded convolutions, a padding module run before the convolution (EfficientNet ports),
strides, dilations, depthwise kernels larger than the map.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paper_models import mcunet_in1, proxyless_w03  # benchmarks/, on pytest's pythonpath
from peft import get_peft_model
from pricing_check import priced_inputs  # benchmarks/, on pytest's pythonpath
from torch import nn

import trady_peft
from tests.tiny_models import Holder, conv_names, paper_mobilenet_v2, tiny_llama
from trady_peft.core.layer import TraDyLayer
from trady_peft.memory.budget import parse_budget

IMAGE = torch.zeros(1, 3, 128, 128)


# ------------------------------------------------------------- the paper's accounting
def test_mobilenet_v2_w035_accounting_matches_the_paper():
    model = paper_mobilenet_v2()
    acc = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    assert len(acc.rows) == 52
    assert (acc.total_weights, acc.total_activations, acc.total) == (288_864, 963_456, 1_252_320)


@pytest.mark.parametrize(
    "factory, convs, totals",
    [(mcunet_in1, 42, (463_216, 846_592, 1_309_808)), (proxyless_w03, 61, (357_680, 804_352, 1_162_032))],
)
def test_mcunet_in1_and_proxyless_w03_accounting_matches_the_paper(factory, convs, totals):
    model = factory().eval()
    acc = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    assert len(acc.rows) == convs
    assert (acc.total_weights, acc.total_activations, acc.total) == totals


def test_bytes_accounting_counts_batch_dtype_and_optimizer_state():
    model = paper_mobilenet_v2()
    values = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    batch = torch.zeros(8, 3, 128, 128, dtype=torch.float32)
    as_bytes = trady_peft.memory_accounting(model, batch, unit="bytes", target_modules=conv_names(model))
    assert as_bytes.total_activations == values.total_activations * 8 * 4
    assert as_bytes.total_weights == values.total_weights * (4 + 4 + 8)  # param + grad + AdamW moments


# -------------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    "raw, expected",
    [
        (27946, (27946, "values")),
        ("256KiB", (262144, "bytes")),
        ("2MB", (2_000_000, "bytes")),
        ("1500000B", (1_500_000, "bytes")),
        ("1.5 MiB", (1_572_864, "bytes")),
    ],
)
def test_parse_budget(raw, expected):
    b = parse_budget(raw)
    assert (b.amount, b.unit) == expected


@pytest.mark.parametrize(
    "text, amount",
    [
        ("2MB", 2_000_000),
        ("2 kB", 2_000),
        ("2KB", 2_000),
        ("1.5 MiB", 1_572_864),
        ("1GiB", 1024**3),
        ("1TB", 10**12),
        ("1e6B", 1_000_000),
        ("300B", 300),
    ],
)
def test_byte_units_are_case_sensitive_and_these_are_accepted(text, amount):
    assert parse_budget(text).amount == amount and parse_budget(text).unit == "bytes"


@pytest.mark.parametrize("raw", [0, -5, "256", "12 parsecs", True, 1.5, "0KiB"])
def test_bad_budgets_name_the_value_and_the_fix(raw):
    with pytest.raises(ValueError, match=r"memory_budget=.*(int|unit|positive|budget)"):
        trady_peft.TraDyConfig(memory_budget=raw)


def test_the_bank_is_a_share_of_the_byte_budget_not_all_of_it():
    for share in (0.25, 0.75):
        config = trady_peft.TraDyConfig(memory_budget="40KiB", bank_share=share, strategy="d-full-random")
        model = get_peft_model(tiny_llama(), config)
        bank = model.base_model.trady_bank["default"].weight
        # fp32 parameter + gradient + 8 B of AdamW state per value
        assert bank.numel() * 16 <= share * 40 * 1024 < (bank.numel() + 1) * 16


# ------------------------------------------------------- prices against what layers keep
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


@pytest.mark.parametrize("value", ["0", "-3", "0.0", "1.5", "12", "1e3"])
def test_every_fix_a_unitless_budget_error_suggests_works(value):
    """The suggestions of the error (an int for values, a string with a unit) are themselves accepted."""
    import re

    with pytest.raises(ValueError) as error:
        parse_budget(value)
    message = str(error.value)
    fixes = re.findall(r"memory_budget=(\d+)\)", message) + re.findall(r"'([^']*(?:B|KiB|MiB|GiB))'", message)
    fixes = [int(f) if f.isdigit() else f for f in fixes]
    assert fixes, message
    for fix in fixes:
        parse_budget(fix)  # raises if a suggested fix does not work
