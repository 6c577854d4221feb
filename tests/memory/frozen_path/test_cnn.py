"""The twins of frozen CNN modules (convolutions, batch norms, piecewise-linear activations) equal the
stock modules and keep less: exactly in float64, within a rounding bound in every dtype (property
tests) and under autocast; the tuner swaps them in and ``unload`` restores them."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import trady_peft
from tests.references import (
    AUTOCAST_DTYPES,
    AUTOCAST_TOL,
    PROPERTY_MODES,
    PROPERTY_SETTINGS,
    assert_bounded,
    assert_close_rel,
    seeded_randn,
)
from tests.tiny_models import Holder, tiny_cnn
from trady_peft.memory import frozen_path
from trady_peft.memory.frozen_path import apply_memory_saving, restore

MODULES = {
    "relu": (lambda: nn.ReLU(), (4, 6, 5, 5)),
    "relu6": (lambda: nn.ReLU6(), (4, 6, 5, 5)),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 1.5), (4, 6, 5, 5)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), (4, 6, 5, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(6), (4, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (4, 6, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (4, 6, 9, 9)),
    "conv1d_grouped": (lambda: nn.Conv1d(6, 4, 3, groups=2), (4, 6, 11)),
}


@pytest.mark.parametrize("kind", list(MODULES))
def test_replacement_matches_the_original_and_keeps_fewer_bytes(kind):
    torch.manual_seed(0)
    factory, shape = MODULES[kind]
    original = factory().double()
    if isinstance(original, nn.modules.batchnorm._BatchNorm):
        original.running_mean.normal_()
        original.running_var.uniform_(0.5, 2.0)
        original.weight.data.normal_()
        original.bias.data.normal_()
    original.requires_grad_(False).eval()
    twin = copy.deepcopy(original)
    assert apply_memory_saving(twin) == [""]
    assert type(twin) is not type(original) and isinstance(twin, type(original))

    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    probe = torch.randn_like(original(x_ref))
    (original(x_ref) * probe).sum().backward()
    (twin(x) * probe).sum().backward()
    torch.testing.assert_close(twin(x), original(x_ref), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)

    kept = trady_peft.measure_training_step(Holder(twin), x.detach().requires_grad_(True))
    kept = kept.saved_by_module.get("layer", 0)
    kept_ref = trady_peft.measure_training_step(Holder(original), x_ref.detach().requires_grad_(True))
    kept_ref = kept_ref.saved_by_module.get("layer", 0)
    assert kept < kept_ref, (kept, kept_ref)
    if "relu" in kind or kind == "hardtanh":
        assert kept == (x.numel() + 7) // 8  # one bit per element
    else:
        assert kept == 0

    assert restore(twin) == 1 and type(twin) is type(original)


def test_tuner_swaps_frozen_path_modules_and_unload_restores_them():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(target_modules=["pw"], channels_per_layer=2))
    inner = model.base_model.model
    assert type(inner.bn1).__name__ == "FrozenPathBatchNorm2d" and type(inner.act2).__name__ == "FrozenPathReLU6"
    assert type(inner.stem).__name__ == "FrozenPathConv2d"  # not a target: frozen
    assert type(inner.classifier) is nn.Linear
    base = model.unload()
    assert type(base.bn1) is nn.BatchNorm2d and type(base.stem) is nn.Conv2d and type(base.act2) is nn.ReLU6
    off = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, memory_saving_frozen_path=False))
    assert type(off.base_model.model.bn1) is nn.BatchNorm2d


def test_nothing_is_saved_below_the_lowest_trained_layer():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(target_modules=["pw"], channels_per_layer=2))
    model.train()
    mem = trady_peft.measure_training_step(model, torch.randn(4, 3, 16, 16))
    below = [
        k for k in mem.saved_by_module if any(k.endswith(n) for n in ("stem", "bn1", "act1", "dw", "bn2", "act2"))
    ]
    assert below == [], mem.saved_by_module


def test_frozen_conv_keeps_the_autocast_dtype():
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    twin = copy.deepcopy(conv)
    apply_memory_saving(twin)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin(x).dtype == conv(x).dtype == torch.bfloat16


AUTOCAST_TWINS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4, bias=False), (2, 4, 7, 7)),
    "conv2d_same_reflect": (lambda: nn.Conv2d(4, 5, 4, padding="same", padding_mode="reflect"), (2, 4, 7, 6)),
    "conv1d_circular": (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2), (2, 4, 9)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (2, 4, 5, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "relu": (lambda: nn.ReLU(), (2, 4, 5)),
    "relu6": (lambda: nn.ReLU6(), (2, 4, 5)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), (2, 4, 5)),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.5), (2, 4, 5)),
}


def _randomise_bn(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.normal_()
            module.bias.normal_()


@pytest.mark.parametrize("narrow_input", [False, True], ids=["fp32_input", "narrow_input"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("kind", list(AUTOCAST_TWINS))
def test_frozen_path_twin_backward_under_autocast(kind, dtype, narrow_input):
    """Each twin alone, fed an fp32 input or the narrow output of an autocast layer before it."""
    torch.manual_seed(0)
    make, shape = AUTOCAST_TWINS[kind]
    twin = make().eval()
    _randomise_bn(twin)
    twin.requires_grad_(False)
    reference = make().eval()
    reference.load_state_dict(twin.state_dict())
    holder = Holder(twin)
    assert frozen_path.apply_memory_saving(holder) == ["layer"]

    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        inp = x.to(dtype) if narrow_input else x
        out = holder(inp)
        probe = torch.randn(out.shape)
    (out.float() * probe).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = reference(x_ref.to(dtype).float() if narrow_input else x_ref)
    (out_ref * probe).sum().backward()
    tol = AUTOCAST_TOL[dtype]
    assert_close_rel(out, out_ref, tol, "output")
    assert x.grad.dtype == torch.float32
    assert_close_rel(x.grad, x_ref.grad, tol, "input gradient")


def test_frozen_path_cnn_with_trady_backward_under_autocast():
    """The whole SmallCNN (TraDy convs + frozen BN/ReLU6 twins) under bf16 autocast vs fp32."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=0.5, init_weights=False, strategy="d-full-random")
    )
    for module in model.modules():
        _randomise_bn(module)
    bank = model.base_model.trady_bank["default"].weight
    with torch.no_grad():
        bank.normal_(0, 0.3)
    x = torch.randn(4, 3, 16, 16)
    out_ref = model(pixel_values=x)["logits"]
    grad_ref = torch.autograd.grad(out_ref.square().sum(), bank)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=x)["logits"]
    (grad,) = torch.autograd.grad(out.float().square().sum(), bank)
    assert grad.dtype == torch.float32
    assert_close_rel(out, out_ref, 5e-2, "logits")
    assert_close_rel(grad, grad_ref, 1e-1, "bank gradient")


PROPERTY_TWINS = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.25),
    "hardtanh": lambda: nn.Hardtanh(-0.75, 0.5),  # bends exactly representable in bf16
    "batchnorm": None,
}


@PROPERTY_SETTINGS
@given(
    st.sampled_from(list(PROPERTY_TWINS)),
    st.lists(st.integers(1, 4), min_size=2, max_size=4),
    st.sampled_from(list(PROPERTY_MODES)),
    st.integers(0, 2**31),
)
def test_frozen_path_twins_match_stock_modules(kind, shape, mode, seed):
    dtype, autocast, tol = PROPERTY_MODES[mode]
    if kind == "batchnorm":
        stock = (nn.BatchNorm1d if len(shape) in (2, 3) else nn.BatchNorm2d)(shape[1]).double().eval()
        with torch.no_grad():
            for t in (stock.running_mean, stock.weight, stock.bias):
                t.copy_(seeded_randn(t.shape, seed + 5, torch.float64))
            stock.running_var.copy_(seeded_randn(shape[1], seed + 6, torch.float64).abs() + 0.1)
    else:
        stock = PROPERTY_TWINS[kind]()
    stock = stock.double().requires_grad_(False)
    twin = nn.Sequential(copy.deepcopy(stock)).to(torch.promote_types(torch.float32, dtype))
    assert len(frozen_path.apply_memory_saving(twin)) == 1
    x = (3 * seeded_randn(shape, seed, dtype)).requires_grad_(True)  # reaches ReLU6's and Hardtanh's upper bends
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = twin(x)
    probe = seeded_randn(out.shape, seed + 1, out.dtype)
    (out * probe).sum().backward()
    assert x.grad.dtype == dtype

    xr = x.detach().double().requires_grad_(True)
    yr = stock(xr)
    (yr * probe.double()).sum().backward()
    if kind == "batchnorm":  # y = x * scale + (bias - mean * scale): bound by the terms' magnitudes
        view = (1, -1) + (1,) * (len(shape) - 2)
        scale = (stock.weight / torch.sqrt(stock.running_var + stock.eps)).abs().view(view)
        y_bound = (xr.detach().abs() + stock.running_mean.abs().view(view)) * scale + stock.bias.abs().view(view)
        g_bound = probe.double().abs() * scale
    else:  # exact up to the output's rounding
        y_bound, g_bound = yr.detach().abs(), xr.grad.abs()
    assert_bounded(out, yr.detach(), y_bound, tol, "output")
    assert_bounded(x.grad, xr.grad, g_bound, tol, "input gradient")
