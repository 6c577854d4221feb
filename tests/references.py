"""Independent references that the tests hold TraDy against, and the tolerances they allow.

* the dense reference of a TraDy layer: a weight-shaped tensor built from channel slices (and back),
  run through the stock layer;
* error bounds for narrow dtypes and autocast: a relative tolerance per dtype, an elementwise bound
  on absolute values for property tests;
* what an adapter adds to a training step, measured by saved-tensor hooks, and its folded values.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft


# ------------------------------------------------------------------- the dense reference
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


# ------------------------------------------------------- narrow dtypes and autocast
def cpu_autocast_works(dtype: torch.dtype) -> bool:
    """Whether this torch runs ``torch.autocast("cpu", dtype=dtype)`` matmuls in ``dtype``."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            a = torch.randn(2, 2)
            return (a @ a).dtype == dtype
    except (RuntimeError, ValueError):
        return False


#: the autocast dtypes the mixed-precision tests run (fp16 where this torch has it on CPU)
AUTOCAST_DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(
        torch.float16,
        id="fp16",
        marks=pytest.mark.skipif(
            not cpu_autocast_works(torch.float16), reason="this torch has no float16 autocast on CPU"
        ),
    ),
]
#: relative tolerance (of the reference's largest magnitude) for one narrow-dtype layer
AUTOCAST_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str):
    """``got`` within ``tol`` times the largest magnitude of ``expected``, elementwise."""
    got, expected = got.float(), expected.float()
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    assert math.isfinite(err) and err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# ---------------------------------------------------------------------- property tests
#: hypothesis settings of the property tests: 200 derandomized examples, no deadline, no database
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


#: dtype mode -> (input dtype, autocast dtype or None, relative tolerance against the abs bound)
PROPERTY_MODES = {
    "float64": (torch.float64, None, 1e-12),
    "float32": (torch.float32, None, 1e-5),
    "bfloat16": (torch.bfloat16, None, 2**-5),
    "autocast_bf16": (torch.float32, torch.bfloat16, 2**-5),
}


def seeded_randn(shape, seed, dtype):
    """Normal values drawn in float64 from a generator seeded with ``seed``, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def assert_bounded(got, ref, bound, tol, what):
    """``|got - ref| <= tol * bound`` elementwise, ``bound`` being the computation on absolute values."""
    got = got.double()
    excess = (got - ref).abs() - tol * bound - 1e-12
    assert excess.max().item() <= 0, f"{what}: exceeds the bound by {excess.max().item():.3g}"


# ------------------------------------------------------------------ adapter footprints
def measured_footprint(model, batch, optimizer) -> tuple[int, int]:
    """What the adapter adds to one training step, measured independently of the tuner's prices:
    the saved inputs attributed to the TraDy layers (saved-tensor hooks), and the bank's parameter,
    gradient and per-value optimizer state. Returns (footprint bytes, saved-input bytes)."""
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    tuner = model.base_model
    layers = {n for n, _ in tuner.trady_layers("default")}
    saved = sum(b for name, b in mem.saved_by_module.items() if name.removeprefix("base_model.model.") in layers)
    bank = tuner.trady_bank["default"].weight
    state = optimizer.state.get(bank, {})
    per_value_state = sum(
        v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.shape == bank.shape
    )
    assert bank.grad is not None
    return saved + 2 * bank.numel() * bank.element_size() + per_value_state, saved


def folded_adapter(model) -> dict:
    """Each TraDy layer's folded ``(indices, values)`` of the default adapter, to compare two runs."""
    return {name: layer.fold("default") for name, layer in model.base_model.trady_layers("default")}


# ------------------------------------------------------------- Det-RGN scores, densely
def dense_gradient_norms(model, batches) -> dict[str, torch.Tensor]:
    """Det-RGN's scores the dense way: every TraDy layer's base weight made trainable, its ``.grad``
    summed over ``batches`` (model inputs with labels), each channel's slice (`channel_slices`)
    normed in float64. The gradients of every parameter are dropped afterwards."""
    tuner = model.base_model
    layers = dict(tuner.trady_layers("default"))
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
    try:
        for batch in batches:
            tuner.model(**batch)["loss"].backward()
        return {
            name: channel_slices(
                layer.base_layer, layer.base_layer.weight.grad, torch.arange(layer.geometry.in_channels)
            )
            .double()
            .flatten(1)
            .norm(dim=1)
            for name, layer in layers.items()
        }
    finally:
        for layer in layers.values():
            layer.base_layer.weight.requires_grad_(False)
        for p in [*model.parameters(), *(w.base_layer.weight for w in layers.values())]:
            p.grad = None


class _Packed:
    """A saved tensor as `SavedBytesPeak` packs it: released when autograd frees the saved tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedBytesPeak:
    """What autograd keeps, counted independently of the library: the bytes of the distinct storages
    that saved tensors (``saved_tensors_hooks``) hold alive at any moment, those of ``resident``
    tensors (parameters, buffers) left out. ``peak`` is the largest such total plus ``extra()`` (e.g.
    accumulators held meanwhile), taken at the start of each grad-enabled forward of ``root`` (a
    forward pre-hook, which also counts ``passes``)."""

    def __init__(self, root: nn.Module, resident=(), extra=lambda: 0):
        self.root, self.extra = root, extra
        self.resident = {t.untyped_storage().data_ptr() for t in resident}
        self.peak, self.passes = 0, 0
        self._live, self._extra = 0, 0
        self._holders: dict[int, int] = {}  # storage -> saved tensors alive on it
        self._sizes: dict[int, int] = {}

    def _start(self, *_):
        if torch.is_grad_enabled():  # not a probe's shape-only forward
            self._extra = self.extra()
            self.passes += 1

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.resident:
            return t
        self._holders[key] = self._holders.get(key, 0) + 1
        if self._holders[key] == 1:
            self._sizes[key] = t.untyped_storage().nbytes()
            self._live += self._sizes[key]
            self.peak = max(self.peak, self._live + self._extra)
        packed = _Packed(t)
        weakref.finalize(packed, self._release, key)
        return packed

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self._live -= self._sizes.pop(key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __enter__(self) -> SavedBytesPeak:
        self._handle = self.root.register_forward_pre_hook(self._start)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._handle.remove()
