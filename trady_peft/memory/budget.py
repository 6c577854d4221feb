"""How memory is counted: per-channel costs, the budget and its units.

The paper (TraDy Eq. 3-4) charges one input channel ``c`` of layer ``i`` with

* its weights, ``C'·k·k`` values (for a grouped conv, the output channels of ``c``'s group
  only: ``C'/groups·k·k``; for a Linear, ``out_features``), and
* its slice of the layer input for one sample: ``H·W`` values for a convolution, the number of
  tokens (all dims but batch and channel) for a Linear. That is exactly what the layer keeps for
  backward, whatever its stride, dilation or padding: padding (the convolution's own, or a
  ``static_padding`` module run before it) is applied inside the autograd function, never saved.

A budget in **values** (an ``int``: the paper's "memory units", one scalar each, batch not
counted) reproduces the paper's numbers. A budget in **bytes** (a string with a unit:
``"256KiB"``, ``"2MB"``, ``"1500000B"``) is what a device really has: a trained weight value costs
its fp32 parameter, its gradient and ``optimizer_state_bytes`` of optimizer state, and an
activation value costs its dtype's size for every sample of the real batch.

The per-channel input sizes come from a *shape probe*: one forward pass without gradients on a
sample batch, with hooks recording each target layer's input shape.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from ..core.collectives import all_reduce_max
from ..core.geometry import SUPPORTED_LAYER_TYPES, ChannelGeometry
from ..core.layer import trady_layers
from ..core.targets import names_match
from .measure import call_model

#: Byte units, case-sensitive: a capital ``B`` is a byte, a lowercase ``b`` a bit (refused).
#: Decimal prefixes are powers of 1000 (``kB`` and ``KB`` both mean 1000 bytes), binary ones
#: (``KiB``, ``MiB``...) powers of 1024.
_BYTE_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
#: Lower-cased spellings of the units: what a miscased unit probably meant.
_MEANT = {
    "b": ("bits", "'B' (bytes)"),
    "kb": ("kilobits", "'KB' (10^3 bytes) or 'KiB' (2^10 bytes)"),
    "mb": ("megabits", "'MB' (10^6 bytes) or 'MiB' (2^20 bytes)"),
    "gb": ("gigabits", "'GB' (10^9 bytes) or 'GiB' (2^30 bytes)"),
    "tb": ("terabits", "'TB' (10^12 bytes) or 'TiB' (2^40 bytes)"),
    "kib": ("kibibits", "'KiB' (2^10 bytes)"),
    "mib": ("mebibits", "'MiB' (2^20 bytes)"),
    "gib": ("gibibits", "'GiB' (2^30 bytes)"),
    "tib": ("tebibits", "'TiB' (2^40 bytes)"),
}
_UNIT_LIST = "B, KB (or kB), MB, GB, TB, KiB, MiB, GiB, TiB"
_BUDGET_RE = re.compile(r"^\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
#: The largest byte budget (a torch int64 holds every count made from it).
MAX_BYTES = 2**62
#: bytes of one trained fp32 value: the parameter and its gradient (optimizer state comes on top).
PARAM_AND_GRAD_BYTES = 8
#: The LoRA rank whose trainable values size the default budget (`default_budget`).
DEFAULT_RANK = 8


@dataclass(frozen=True)
class Budget:
    """A parsed memory budget: an amount in ``unit`` (``"values"`` or ``"bytes"``)."""

    amount: int
    unit: str

    def __str__(self) -> str:
        return f"{self.amount:,} {self.unit}"


def parse_budget(value: int | str, name: str = "memory_budget") -> Budget:
    """Parse ``memory_budget``: an int is in the paper's units (values), a string with a unit in bytes.

    Any integer type is accepted (``numpy.int64`` too), ``bool`` is not. Units are case-sensitive:
    ``B``, ``KB`` (or ``kB``), ``MB``, ``GB``, ``TB`` are powers of 1000 bytes, ``KiB``, ``MiB``,
    ``GiB``, ``TiB`` powers of 1024; a lowercase ``b`` (``"2Mb"``, ``"512kb"``) reads as bits and is
    refused. ``name`` is the option's name in the error messages.

    >>> parse_budget(27946)
    Budget(amount=27946, unit='values')
    >>> parse_budget("256KiB")
    Budget(amount=262144, unit='bytes')
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a budget; pass an int (values) or e.g. '256KiB' (bytes).")
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise ValueError(f"{name}={value!r} must be positive: a number of values (the paper's units), e.g. 27946.")
        return Budget(int(value), "values")
    if isinstance(value, numbers.Real):
        hint = f"memory_budget={int(value)}" if math.isfinite(value) and value == int(value) and value > 0 else ""
        what = "is a float" if math.isfinite(value) else "is not a finite number"
        raise ValueError(
            f"{name}={value!r} {what}: pass a positive int for the paper's units"
            + (f" ({hint})" if hint else "")
            + " or a string with a byte unit (e.g. '2MB')."
        )
    if not isinstance(value, str):
        raise ValueError(
            f"{name}={value!r} ({type(value).__name__}) must be an int (the paper's units) or a string "
            "such as '2MB' (bytes)."
        )
    match = _BUDGET_RE.match(value)
    if not match:
        raise ValueError(
            f"{name}={value!r} is not understood: pass an int for the paper's units (scalar values per "
            f"sample), or a positive number of bytes with a unit: {_UNIT_LIST} (e.g. '256KiB')."
        )
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        text = match.group(1).strip()
        if number <= 0 or not math.isfinite(number):
            raise ValueError(
                f"{name}={value!r} must be a positive amount: an int for the paper's units (e.g. "
                f"memory_budget=27946) or bytes with a unit ({_UNIT_LIST}), e.g. '256KiB'."
            )
        as_int = f"memory_budget={int(number)}" if number == int(number) else "e.g. memory_budget=27946"
        raise ValueError(
            f"{name}={value!r} has no unit: pass an int for the paper's units ({as_int}) or add a byte "
            f"unit ({_UNIT_LIST}), e.g. '{text}KiB'."
        )
    if unit not in _BYTE_UNITS:
        meant = _MEANT.get(unit.lower())
        if meant is None:
            raise ValueError(
                f"{name}={value!r}: the unit {unit!r} is not understood; use one of {_UNIT_LIST} "
                "(case-sensitive, e.g. '256KiB'), or an int for the paper's units."
            )
        bits, use = meant
        if unit.endswith("b"):
            raise ValueError(f"{name}={value!r}: {unit!r} looks like {bits}; use {use}.")
        raise ValueError(f"{name}={value!r}: {unit!r} is not a byte unit (case matters); use {use}.")
    if number <= 0:
        raise ValueError(f"{name}={value!r} must be positive: at least one byte, e.g. '256KiB'.")
    if not math.isfinite(number) or number * _BYTE_UNITS[unit] > MAX_BYTES:
        raise ValueError(
            f"{name}={value!r} is too large (more than {MAX_BYTES:,} bytes): pass what the device has for "
            "the adapter, e.g. '256KiB' or '2GiB'."
        )
    exact = Fraction(match.group(1)) * _BYTE_UNITS[unit]
    if exact.denominator != 1:
        raise ValueError(
            f"{name}={value!r} is {float(exact):g} bytes, not a whole number of bytes: pass a whole "
            f"number, e.g. '{max(1, math.floor(exact))}B'."
        )
    return Budget(int(exact), "bytes")


def parse_step_memory(value: str) -> Budget:
    """Parse ``step_memory``: bytes with a unit, in `parse_budget`'s syntax (``"6GiB"``, ``"512MB"``).

    >>> parse_step_memory("6GiB")
    Budget(amount=6442450944, unit='bytes')
    """
    match = _BUDGET_RE.match(value) if isinstance(value, str) else None
    if isinstance(value, str) and not (match and not match.group(2)):
        return parse_budget(value, name="step_memory")
    amount = match.group(1).strip() if match else value
    positive = not isinstance(amount, bool) and isinstance(amount, (numbers.Integral, str)) and float(amount) > 0
    example = f"'{amount}B' or " if positive and float(amount) == int(float(amount)) else ""
    raise ValueError(
        f"step_memory={value!r} is not an amount of bytes: pass a string with a byte unit ({_UNIT_LIST}), e.g. "
        f"{example}'6GiB'."
    )


@dataclass(frozen=True)
class LayerCost:
    """Cost of one input channel of one layer.

    Attributes:
        name: the layer's qualified name.
        input_channels: number of input channels.
        weights: weight values one channel owns.
        activations: input values one channel holds for one sample (``H·W`` or tokens).
        batch_size: samples in the probed batch.
        activation_bytes: bytes per activation element (the probed input dtype).
    """

    name: str
    input_channels: int
    weights: int
    activations: int
    batch_size: int = 1
    activation_bytes: int = 4

    @property
    def saved_bytes(self) -> int:
        """Bytes of this channel's input slice kept for backward, for the whole batch."""
        return self.activations * self.batch_size * self.activation_bytes

    def channel_cost(self, unit: str, optimizer_state_bytes: int = 0) -> int:
        """Cost of one channel in ``unit``: weights + activations (values), or their bytes."""
        if unit == "values":
            return self.weights + self.activations
        return self.weights * (PARAM_AND_GRAD_BYTES + optimizer_state_bytes) + self.saved_bytes

    def draw_price(self, unit: str) -> tuple[int, ...]:
        """What drawing this channel spends of each part of the budget (see `draw_limits`):
        ``(weights + activations,)`` in values; ``(trainable values, saved input bytes)`` in bytes."""
        if unit == "values":
            return (self.weights + self.activations,)
        return (self.weights, self.saved_bytes)

    def larger(self, other: LayerCost) -> LayerCost:
        """A price covering both measurements of the same layer: the largest input per sample, batch and
        element size (so that a batch as long as one and as large as the other is covered too)."""
        return dataclasses.replace(
            self,
            activations=max(self.activations, other.activations),
            batch_size=max(self.batch_size, other.batch_size),
            activation_bytes=max(self.activation_bytes, other.activation_bytes),
        )


def bytes_per_trained_value(optimizer_state_bytes: int) -> int:
    """Bytes one trainable value costs: fp32 parameter + gradient + optimizer state."""
    return PARAM_AND_GRAD_BYTES + optimizer_state_bytes


def bank_capacity(budget: Budget, total_values: int, optimizer_state_bytes: int, bank_share: float) -> int:
    """Trainable values an adapter's bank holds under ``budget``.

    In values (the paper's units) a draw's weights never exceed the budget, so neither does the
    bank. In bytes the bank is a fixed cost, whatever a draw uses: its parameter, gradient and
    optimizer state are dense. It gets ``bank_share`` of the budget; the rest bounds the saved
    inputs of the selected channels, so that bank + saved inputs <= budget at every step.
    """
    if budget.unit == "values":
        return min(total_values, budget.amount)
    per_value = bytes_per_trained_value(optimizer_state_bytes)
    return min(total_values, int(budget.amount * bank_share) // per_value)


def low_rank_values(geometry: ChannelGeometry, rank: int) -> int:
    """Values a rank-``rank`` factorisation of a layer's weight trains (LoRA's A and B): ``rank * (rows +
    columns)`` of the weight seen as a matrix of ``out_channels`` rows and ``in_channels / groups * kernel``
    columns, at most the weight's own size.

    >>> low_rank_values(ChannelGeometry("linear", 576, 1536), rank=8)  # 8 * (576 + 1536)
    16896
    >>> low_rank_values(ChannelGeometry("conv", 32, 32, groups=32, kernel_size=(3, 3)), rank=8)  # the whole weight
    288
    """
    columns = geometry.in_per_group * math.prod(geometry.kernel_size)
    return min(rank * (geometry.out_channels + columns), geometry.in_channels * geometry.slice_numel)


def default_budget(
    geometries: Iterable[ChannelGeometry], optimizer_state_bytes: int, bank_share: float, rank: int = DEFAULT_RANK
) -> int:
    """The byte budget an adapter gets when its config sets no memory_budget, step_memory or channels_per_layer.

    Its bank (``bank_share`` of the budget) holds as many trainable values as LoRA of rank ``rank``
    would train on the same layers (`low_rank_values`), each at `bytes_per_trained_value`; the rest of
    the budget bounds the saved inputs of the selected channels. With the default ``bank_share`` (0.5)
    that is the trainable state of LoRA r=8 twice over, whatever the batch or the sequence length.
    """
    values = sum(low_rank_values(g, rank) for g in geometries)
    per_value = bytes_per_trained_value(optimizer_state_bytes)
    budget = math.ceil(values * per_value / bank_share)
    while int(budget * bank_share) // per_value < values:  # float rounding of the share
        budget += 1
    return budget


def draw_limits(budget: Budget, capacity: int, optimizer_state_bytes: int) -> tuple[int, ...]:
    """The limit of each part of `LayerCost.draw_price`: ``(budget,)`` in values;
    ``(bank capacity, budget - bank bytes)`` in bytes."""
    if budget.unit == "values":
        return (budget.amount,)
    return (capacity, budget.amount - capacity * bytes_per_trained_value(optimizer_state_bytes))


@dataclass
class Accounting:
    """Result of `memory_accounting`: per-layer rows and totals over the target layers."""

    rows: list[LayerCost]
    unit: str
    optimizer_state_bytes: int = 0

    def _scale(self, row: LayerCost, part: str) -> int:
        n = getattr(row, part) * row.input_channels
        if self.unit == "values":
            return n
        if part == "weights":
            return n * (PARAM_AND_GRAD_BYTES + self.optimizer_state_bytes)
        return n * row.batch_size * row.activation_bytes

    @property
    def total_weights(self) -> int:
        return sum(self._scale(r, "weights") for r in self.rows)

    @property
    def total_activations(self) -> int:
        return sum(self._scale(r, "activations") for r in self.rows)

    @property
    def total(self) -> int:
        return self.total_weights + self.total_activations

    def table(self) -> str:
        """A plain-text table, one row per layer, totals at the bottom. Every column names its unit:
        the per-channel columns are always values per sample (the paper's units); the layer columns
        and totals are in ``unit`` (bytes: with gradients, optimizer state and the batch)."""
        unit = self.unit
        head = f"{'layer':<48}{'in ch':>7}{'weights/ch':>12}{'acts/ch':>10}{'weights':>14}{'activations':>14}"
        units = f"{'':<48}{'':>7}{'(values)':>12}{'(values)':>10}{'(' + unit + ')':>14}{'(' + unit + ')':>14}"
        lines = [head, units, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name[-48:]:<48}{r.input_channels:>7}{r.weights:>12,}{r.activations:>10,}"
                f"{self._scale(r, 'weights'):>14,}{self._scale(r, 'activations'):>14,}"
            )
        lines.append("-" * len(head))
        lines.append(f"{'total (' + unit + ')':<77}{self.total_weights:>14,}{self.total_activations:>14,}")
        lines.append(f"{'weights + activations (' + unit + ')':<77}{self.total:>28,}")
        if unit == "bytes":
            lines.append(
                f"bytes: a weight value costs {PARAM_AND_GRAD_BYTES + self.optimizer_state_bytes} B (fp32 parameter, "
                f"gradient, {self.optimizer_state_bytes} B optimizer state), an activation value its dtype's size "
                "for every sample of the batch; per-channel columns stay in values per sample."
            )
        return "\n".join(lines)


class InputShapes:
    """Records the input shape and dtype of each of ``layers`` in the forwards that run until `stop`."""

    def __init__(self, layers: Iterable[tuple[str, nn.Module]]):
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers]

    def _hook(self, name: str):
        def hook(module, args):
            if name not in self.shapes and args and isinstance(args[0], torch.Tensor):
                self.shapes[name] = (args[0].shape, args[0].dtype)

        return hook

    def stop(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Remove the hooks; the shapes recorded (layer name -> (shape, dtype))."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self.shapes


def probe_input_shapes(
    model: nn.Module, inputs: Any, layers: Iterable[tuple[str, nn.Module]]
) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Run ``model`` once without gradients and record the input shape and dtype of ``layers``."""
    recording = InputShapes(layers)
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        shapes = recording.stop()
    return shapes


def layer_cost(name: str, geometry: ChannelGeometry, shape: torch.Size, dtype: torch.dtype) -> LayerCost:
    """Per-channel cost of a layer from the shape of its input (batch first)."""
    dims = list(shape)
    channel_dim = geometry.channel_dim % len(dims)
    per_sample = 1
    for d, size in enumerate(dims):
        if d not in (0, channel_dim):
            per_sample *= size
    batch = dims[0] if len(dims) > 1 else 1
    element = torch.empty(0, dtype=dtype).element_size()
    return LayerCost(name, geometry.in_channels, geometry.slice_numel, per_sample, batch, element)


def all_reduce_max_costs(costs: dict[str, LayerCost]) -> dict[str, LayerCost]:
    """Per-layer prices, each part the largest over the processes (same keys on every rank)."""
    if not costs:
        return costs
    names = sorted(costs)
    parts = torch.tensor(
        [[costs[n].activations, costs[n].batch_size, costs[n].activation_bytes] for n in names], dtype=torch.int64
    )
    all_reduce_max(parts)
    return {
        n: dataclasses.replace(costs[n], activations=int(a), batch_size=int(b), activation_bytes=int(e))
        for n, (a, b, e) in zip(names, parts.tolist())
    }


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer TraDy can train: TraDy layers if ``model`` has them, else every Linear/Conv/Conv1D."""
    tradys = trady_layers(model)
    if tradys:
        return tradys
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED_LAYER_TYPES):
            layers.append((name, module))
    return layers


def memory_accounting(
    model: nn.Module,
    example_inputs: Any,
    unit: str = "values",
    target_modules: Iterable[str] | None = None,
    optimizer_state_bytes: int = 8,
) -> Accounting:
    """Per-layer memory accounting of the layers TraDy may update, from a shape probe.

    Args:
        model: a plain model or a TraDy ``PeftModel`` (then its wrapped layers are counted).
        example_inputs: a tensor, a dict of keyword arguments or a tuple of positional
            arguments for one forward pass. Its batch size counts only for ``unit="bytes"``.
        unit: ``"values"`` (the paper's units, per sample) or ``"bytes"`` (real batch and dtype,
            weights as fp32 parameter + gradient + ``optimizer_state_bytes``).
        target_modules: qualified names to count (default: every Conv/Linear/Conv1D, or the
            TraDy layers of a ``PeftModel``).
        optimizer_state_bytes: optimizer state per trained value, for ``unit="bytes"``
            (8 for Adam/AdamW, 4 for SGD with momentum, 0 for plain SGD as in the paper).

    Returns:
        An `Accounting` with ``rows``, ``total_weights``, ``total_activations`` and ``table()``.

    Example:
        ```python
        acc = trady_peft.memory_accounting(model, torch.zeros(1, 3, 128, 128))
        print(acc.table())
        ```
    """
    if unit not in ("values", "bytes"):
        raise ValueError(f"unit={unit!r} must be 'values' (the paper's units) or 'bytes'.")
    layers = supported_layers(model)
    if target_modules is not None:
        wanted = set(target_modules)
        layers = [(n, m) for n, m in layers if any(names_match(n, w) for w in wanted)]
    if not layers:
        raise ValueError("No Linear, Conv1d, Conv2d or Conv1D layer to account for in this model.")
    shapes = probe_input_shapes(model, example_inputs, layers)
    rows = []
    for name, module in layers:
        if name not in shapes:
            continue  # not reached by this input
        base = getattr(module, "base_layer", module)
        rows.append(layer_cost(name, ChannelGeometry.of(base), *shapes[name]))
    return Accounting(rows, unit, optimizer_state_bytes if unit == "bytes" else 0)
