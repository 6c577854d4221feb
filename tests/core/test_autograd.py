"""The custom autograd functions: `SparseChannelDelta`, `FrozenConv` and `ChannelGradientProbe`
against a dense stock-torch reference (property tests), and what a sparse layer keeps for backward
(only its selected input channels; LoRA on the same layer keeps the whole input).

Over random layer shapes, groups, kernel sizes, strides, paddings (incl. padding modes and
``"same"``), dilations, channel selections and dtypes, the output, the input gradient and the
delta gradient of `SparseChannelDelta` (and of `FrozenConv`) must equal those of a stock module run
in float64 on a dense weight holding the same slices, with gradients by autograd.

Errors are bounded elementwise: ``|got - ref| <= tol * bound``, where ``bound`` is the same
computation on absolute values (|x|, |w|, |grad_out|). That bound is what rounding to a dtype's
resolution can move a sum of products by, so it holds for float64, float32 and bf16 alike and does
not loosen where terms cancel nothing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft
from tests.references import PROPERTY_MODES, PROPERTY_SETTINGS, assert_bounded, dense_from_slices, seeded_randn
from tests.tiny_models import Holder
from trady_peft.core.autograd import ChannelProbe, FrozenConv, SparseChannelDelta
from trady_peft.core.geometry import ChannelGeometry


@st.composite
def conv_modules(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans())
    stride = (1,) * dims if same else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(dims))
    module = (nn.Conv1d if dims == 1 else nn.Conv2d)(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
    )
    spatial = tuple(draw(st.integers(5, 7)) for _ in range(dims))  # > any padding, >= any dilated kernel
    return module, (draw(st.integers(1, 2)), in_channels, *spatial)


@st.composite
def linear_modules(draw):
    in_features, out_features = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    module = Conv1D(out_features, in_features) if draw(st.booleans()) else nn.Linear(in_features, out_features)
    return module, (*lead, in_features)


@st.composite
def cases(draw):
    module, x_shape = draw(st.one_of(conv_modules(), linear_modules()))
    geometry = ChannelGeometry.of(module)
    c = geometry.in_channels
    idx = draw(st.lists(st.integers(0, c - 1), unique=True, max_size=c))  # any order
    acc_idx = sorted(draw(st.lists(st.integers(0, c - 1), unique=True, max_size=c)))  # as the store keeps it
    if not idx and not acc_idx:
        idx = [draw(st.integers(0, c - 1))]
    mode = draw(st.sampled_from(list(PROPERTY_MODES)))
    return module, x_shape, geometry, idx, acc_idx, mode, draw(st.integers(0, 2**31))


def _reference_module(module):
    """A float64, bias-free stock module computing ``module``'s arithmetic on a given weight."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return None
    ref = type(module)(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=False,
        padding_mode=module.padding_mode,
    )
    return ref.double()


def _dense(module, ref, channels, slices):
    if ref is not None:
        return dense_from_slices(ref, torch.tensor(channels, dtype=torch.long), slices)
    in_f = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
    dense = slices.new_zeros(in_f, slices.shape[1])  # [in, out]: x @ dense
    for c, s in zip(channels, slices):
        dense[c] += s
    return dense


def _reference(module, ref, x, idx, delta, acc_idx, acc):
    weight = _dense(module, ref, idx, delta) + _dense(module, ref, acc_idx, acc)
    return x @ weight if ref is None else ref._conv_forward(x, weight, None)


@PROPERTY_SETTINGS
@given(cases())
def test_sparse_channel_delta_matches_dense_reference(case):
    module, x_shape, geometry, idx, acc_idx, mode, seed = case
    dtype, autocast, tol = PROPERTY_MODES[mode]
    delta_dtype = torch.promote_types(torch.float32, dtype)  # as TraDyLayer.delta_dtype
    k, m = len(idx), len(acc_idx)
    x = seeded_randn(x_shape, seed, dtype).requires_grad_(True)
    delta = seeded_randn((k, *geometry.slice_shape), seed + 1, delta_dtype).requires_grad_(True)
    acc = seeded_randn((m, *geometry.slice_shape), seed + 2, delta_dtype)
    idx_t, acc_t = torch.tensor(idx, dtype=torch.int32), torch.tensor(acc_idx, dtype=torch.int32)

    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = SparseChannelDelta.apply(x, delta, idx_t, acc_t, acc, geometry)
    expected_dtype = autocast or dtype
    assert out.dtype == expected_dtype
    probe = seeded_randn(out.shape, seed + 3, expected_dtype)
    (out * probe).sum().backward()
    assert x.grad.dtype == dtype and (delta.grad is None if k == 0 else delta.grad.dtype == delta_dtype)

    ref = _reference_module(module)
    results = []
    for absolute in (False, True):  # the reference, then its bound on absolute values
        f = torch.abs if absolute else (lambda t: t)
        xr = f(x.detach().double()).requires_grad_(True)
        dr = f(delta.detach().double()).requires_grad_(True)
        yr = _reference(module, ref, xr, idx, dr, acc_idx, f(acc.double()))
        (yr * f(probe.double())).sum().backward()
        results.append((yr.detach(), xr.grad, dr.grad))
    (y_ref, gx_ref, gd_ref), (y_bound, gx_bound, gd_bound) = results
    assert_bounded(out, y_ref, y_bound, tol, "output")
    assert_bounded(x.grad, gx_ref, gx_bound, tol, "input gradient")
    if k:
        assert_bounded(delta.grad, gd_ref, gd_bound, tol, "delta gradient")


@PROPERTY_SETTINGS
@given(cases())
def test_channel_probe_adds_nothing_and_sums_the_dense_weight_gradient_of_its_channels(case):
    module, x_shape, geometry, idx, _, mode, seed = case
    idx = idx or [0]
    dtype, autocast, tol = PROPERTY_MODES[mode]
    delta_dtype = torch.promote_types(torch.float32, dtype)  # the accumulator's, as TraDyLayer.delta_dtype
    k, ref = len(idx), _reference_module(module)
    x = seeded_randn(x_shape, seed, dtype)
    empty = torch.zeros(0, *geometry.slice_shape, dtype=torch.float64)
    shape = _reference(module, ref, x.double(), idx, empty.new_zeros(k, *geometry.slice_shape), [], empty).shape
    output = seeded_randn(shape, seed + 1, autocast or dtype)  # stands in for the layer's output
    anchor = torch.zeros((), requires_grad=True)
    probe = ChannelProbe(torch.tensor(idx), torch.zeros(k, *geometry.slice_shape, dtype=delta_dtype), anchor)
    upstream = [seeded_randn(shape, seed + 2 + i, autocast or dtype) for i in range(2)]
    for grad in upstream:  # two backwards: the accumulator sums them, as a dense .grad does
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = probe(x, output, geometry)
        assert out.dtype == output.dtype and torch.equal(out, output)
        (out * grad).sum().backward()
    assert probe.backwards == 2 and probe.accumulator.dtype == delta_dtype

    results = []
    for absolute in (False, True):  # the dense weight gradient of the channels, then its bound
        f = torch.abs if absolute else (lambda t: t)
        slices = empty.new_zeros(k, *geometry.slice_shape).requires_grad_(True)
        for grad in upstream:
            (_reference(module, ref, f(x.double()), idx, slices, [], empty) * f(grad.double())).sum().backward()
        results.append(slices.grad)
    assert_bounded(probe.accumulator, results[0], results[1], tol, "weight-slice gradient")


@PROPERTY_SETTINGS
@given(conv_modules(), st.sampled_from(list(PROPERTY_MODES)), st.booleans(), st.integers(0, 2**31))
def test_frozen_conv_matches_stock_conv(conv, mode, bias_trains, seed):
    module, x_shape = conv
    dtype, autocast, tol = PROPERTY_MODES[mode]
    module = module.to(dtype).requires_grad_(False)  # a bf16 model, or an fp32 one under autocast
    module.bias.requires_grad_(bias_trains)
    x = seeded_randn(x_shape, seed, dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = FrozenConv.apply(x, module.weight, module.bias, ChannelGeometry.of(module))
    assert out.dtype == (autocast or dtype)
    probe = seeded_randn(out.shape, seed + 1, out.dtype)
    (out * probe).sum().backward()
    assert x.grad.dtype == dtype
    assert (module.bias.grad is not None) == bias_trains

    results = []
    for absolute in (False, True):
        f = torch.abs if absolute else (lambda t: t)
        ref = _reference_module(module)
        xr = f(x.detach().double()).requires_grad_(True)
        br = f(module.bias.detach().double()).requires_grad_(True)
        yr = ref._conv_forward(xr, f(module.weight.double()), br)
        (yr * f(probe.double())).sum().backward()
        results.append((yr.detach(), xr.grad, br.grad))
    (y_ref, gx_ref, gb_ref), (y_bound, gx_bound, gb_bound) = results
    assert_bounded(out, y_ref, y_bound, tol, "output")
    assert_bounded(x.grad, gx_ref, gx_bound, tol, "input gradient")
    if bias_trains:
        assert module.bias.grad.dtype == module.bias.dtype
        assert_bounded(module.bias.grad, gb_ref, gb_bound, tol, "bias gradient")


def test_padding_mode_strategies_reach_every_branch():
    """Guards the generators: the shapes above cover what the properties claim to cover."""
    seen = set()

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(conv_modules())
    def collect(conv):
        module, _ = conv
        geometry = ChannelGeometry.of(module)
        seen.add(
            (module.padding_mode, geometry.pre_pad is not None, module.groups > 1, isinstance(module.padding, str))
        )

    collect()
    modes = {s[0] for s in seen}
    assert modes == {"zeros", "reflect", "replicate", "circular"}
    assert any(s[1] for s in seen) and any(not s[1] for s in seen)
    assert any(s[2] for s in seen) and any(s[3] for s in seen)


SPARSE_LAYERS = {
    # name: (layer factory, input shape, k channels)
    "linear": (lambda: nn.Linear(64, 32), (8, 16, 64), 8),
    "conv2d": (lambda: nn.Conv2d(32, 16, 3, padding=1), (4, 32, 12, 12), 4),
    "conv2d_depthwise": (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32), (4, 32, 12, 12), 4),
    "hf_conv1d": (lambda: Conv1D(32, 64), (8, 16, 64), 8),
}


def saved_by_layer(model, x) -> int:
    mem = trady_peft.measure_training_step(model, x)
    return sum(v for k, v in mem.saved_by_module.items() if k.endswith("layer") or ".layer." in k)


@pytest.mark.parametrize("kind", list(SPARSE_LAYERS))
def test_sparse_layer_keeps_only_selected_input_channels(kind):
    factory, shape, k = SPARSE_LAYERS[kind]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)  # as if the layer sat inside a network
    model = get_peft_model(Holder(factory()), trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=k))
    channels = x.shape[-1] if kind in ("linear", "hf_conv1d") else x.shape[1]
    full_input_bytes = x.numel() * x.element_size()

    saved = saved_by_layer(model, x)

    # The index tensor is a resident buffer of the layer, so it is not part of the saved bytes.
    assert saved == full_input_bytes * k // channels


@pytest.mark.parametrize("kind", list(SPARSE_LAYERS))
def test_lora_on_the_same_layer_keeps_the_full_input(kind):
    factory, shape, _ = SPARSE_LAYERS[kind]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    # peft LoRA needs a rank divisible by the groups of a grouped conv.
    rank = 32 if kind == "conv2d_depthwise" else 4
    model = get_peft_model(Holder(factory()), LoraConfig(target_modules=["layer"], r=rank))
    assert saved_by_layer(model, x) >= x.numel() * x.element_size()
