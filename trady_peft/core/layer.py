"""The channel-sparse layer: a frozen base layer plus deltas on a few input channels.

For each adapter a `TraDyLayer` holds

* ``trady_delta[adapter]`` -- a `ChannelDeltaView` onto this layer's segment of the
  adapter's flat trainable bank (see `trady_peft.model`): the slices of the channels that
  train this period, ``[k, *slice_shape]``;
* ``trady_idx[adapter]`` -- those k channel indices (not in a state dict: the tuner's selection
  state carries them);
* ``trady_indices[adapter]`` / ``trady_values[adapter]`` -- every channel updated in earlier
  periods and its accumulated delta, in fp32 (their size grows with the union of touched
  channels, so they resize on load). A state dict holds them with the current period folded in
  (`trady_peft.checkpoint`).

Forward: ``base(x) + delta(x[idx]) + acc(x[acc_idx])``. The delta path keeps ``x[idx]`` for the
backward pass and nothing else of ``x``; a convolution's frozen base path keeps no input at all.
While channels are scored (`trady_peft.selection.statistics.gradient_norms`), a layer's
``channel_probe`` (a `trady_peft.core.autograd.ChannelProbe`) adds nothing to the output and
collects the gradient of a few channels' weight slices.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..compat import BufferDict
from ..files.format import check_layer_state
from .autograd import ChannelProbe, SparseChannelDelta, frozen_conv
from .bank import keeping_precision
from .geometry import ChannelGeometry
from .quantized import (
    RoundingError,
    dequantize,
    frozen_quantized_linear,
    prepare_quantized_layer,
    quantization_of,
    requantize,
    restore_weight,
    rounding_error,
    weight_snapshot,
)


class QuantizedMergeWarning(UserWarning):
    """A merge into a quantized base weight was rounded: the merged layer differs from base + delta."""


class ResizableBufferDict(BufferDict):
    """A persistent ``BufferDict`` whose entries take the checkpoint's shape on load.

    The accumulated store grows with every period, so a checkpoint rarely has the shape of a
    freshly created layer; ``nn.Module.load_state_dict`` would report a size mismatch. Casting the
    model to a narrower dtype keeps the store's precision (`trady_peft.core.bank.keeping_precision`).
    """

    def __init__(self, buffers=None):
        super().__init__(buffers, persistent=True)

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(keeping_precision(fn), recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in list(self._buffers):
            incoming = state_dict.get(prefix + key)
            current = self._buffers[key]
            if incoming is not None and current is not None and incoming.shape != current.shape:
                self._buffers[key] = current.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ChannelDeltaView(nn.Module):
    """The trainable slices of one layer: a view onto its segment of the adapter's bank.

    Holds no parameter of its own (the bank owns it), so the optimizer and DDP see one fixed-size
    tensor per adapter whatever the number of channels each layer draws. FSDP2 must leave the bank
    out of its sharding (`trady_peft.fsdp_ignored_params`; docs/distributed.md).
    """

    def __init__(self, slice_shape: tuple[int, ...]):
        super().__init__()
        self.slice_shape = tuple(slice_shape)
        self.offset = 0
        self.count = 0
        self.__dict__["bank"] = None  # set by the model; a plain reference, not a submodule

    @property
    def numel(self) -> int:
        n = self.count
        for s in self.slice_shape:
            n *= s
        return n

    def forward(self) -> torch.Tensor:
        bank = self.__dict__["bank"]
        if bank is None or self.count == 0:
            raise RuntimeError("This TraDy layer has no channel selection installed.")
        segment = getattr(bank, "segment", None)  # a DeltaBank: one split per bank (see DeltaBank.segment)
        flat = segment(self.offset, self.numel) if segment else bank.weight.narrow(0, self.offset, self.numel)
        return flat.view(self.count, *self.slice_shape)

    def extra_repr(self) -> str:
        return f"channels={self.count}, slice_shape={self.slice_shape}, offset={self.offset}"


class TraDyLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or transformers ``Conv1D``."""

    adapter_layer_names = ("trady_delta",)
    other_param_names = ("trady_idx", "trady_indices", "trady_values")
    #: set only while channels are scored: the probe that collects weight-slice gradients
    channel_probe: ChannelProbe | None = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        prepare_quantized_layer(base_layer)
        self.geometry = ChannelGeometry.of(base_layer)
        self.in_features = self.geometry.in_channels
        self.out_features = self.geometry.out_channels
        self.trady_delta = nn.ModuleDict()
        self.trady_idx = BufferDict(persistent=False)
        self.trady_indices = ResizableBufferDict()
        self.trady_values = ResizableBufferDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged_originals: dict[str, tuple[Any, Any]] = {}
        #: adapter -> `RoundingError` of its merge into a quantized base weight (while merged)
        self.merge_rounding_errors: dict[str, RoundingError] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------------------ adapters
    @property
    def quantization(self) -> str | None:
        """The base weight's quantization backend (see `trady_peft.core.quantized`), or None."""
        return quantization_of(self.base_layer)

    @property
    def delta_dtype(self) -> torch.dtype:
        """Deltas are kept in fp32, or in the base dtype when it is wider (float64)."""
        return torch.promote_types(torch.float32, self.base_layer.weight.dtype)

    def update_layer(self, adapter_name: str, config) -> None:
        """Create the (empty) state of a new adapter on this layer."""
        device = self.base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        geom = self.geometry
        self.trady_delta[adapter_name] = ChannelDeltaView(geom.slice_shape)
        self.trady_idx[adapter_name] = torch.zeros(0, dtype=torch.int32, device=device)
        self.trady_indices[adapter_name] = torch.zeros(0, dtype=torch.int32, device=device)
        self.trady_values[adapter_name] = torch.zeros(0, *geom.slice_shape, dtype=self.delta_dtype, device=device)
        self.set_adapter(self.active_adapters)

    def install_channels(self, adapter_name: str, channels: torch.Tensor, bank: nn.Module, offset: int) -> None:
        """Make ``channels`` this layer's trainable channels, backed by ``bank`` at ``offset``."""
        view = self.trady_delta[adapter_name]
        view.__dict__["bank"] = bank
        view.offset, view.count = int(offset), int(channels.numel())
        # Direct assignment: the current selection is runtime state (the tuner's selection state
        # carries it) and must never land on the meta device.
        self.trady_idx._buffers[adapter_name] = channels.to(device=bank.weight.device, dtype=torch.int32)

    def _current_idx(self, adapter_name: str) -> torch.Tensor:
        """Channels trained this period (empty when nothing is selected)."""
        idx = self.trady_idx[adapter_name]
        return idx if self.current_delta_installed(adapter_name) else idx[:0]

    def current_delta_installed(self, adapter_name: str) -> bool:
        """Whether this layer has channels to train this period (a selection backed by the bank)."""
        view = self.trady_delta[adapter_name]
        return bool(view.count) and view.__dict__["bank"] is not None

    def current_delta(self, adapter_name: str) -> torch.Tensor | None:
        """Slices ``[k, *slice_shape]`` trained this period, or None when nothing is selected."""
        return self.trady_delta[adapter_name]() if self.current_delta_installed(adapter_name) else None

    def fold(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulated store with the current period's delta added: ``(indices, values)``.

        Indices are sorted and unique (int32); values are fp32. Nothing is modified.
        """
        acc_idx, acc_val = self.trady_indices[adapter_name], self.trady_values[adapter_name]
        delta = self.current_delta(adapter_name)
        if delta is None:
            return acc_idx, acc_val
        idx = self.trady_idx[adapter_name]
        union = torch.unique(torch.cat([acc_idx, idx]))  # sorted
        values = acc_val.new_zeros(union.numel(), *self.geometry.slice_shape)
        if acc_idx.numel():
            values.index_add_(0, torch.searchsorted(union, acc_idx), acc_val)
        values.index_add_(0, torch.searchsorted(union, idx), delta.detach().to(values.dtype))
        return union.to(torch.int32), values

    def commit(self, adapter_name: str) -> None:
        """Move the current delta into the accumulated store (the caller zeroes the bank)."""
        indices, values = self.fold(adapter_name)
        self.trady_indices[adapter_name] = indices
        self.trady_values[adapter_name] = values

    def touched_channels(self, adapter_name: str) -> int:
        """Number of channels of this layer updated so far (stored + current)."""
        return torch.unique(torch.cat([self.trady_indices[adapter_name], self._current_idx(adapter_name)])).numel()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Refuse a store that does not fit this layer before anything is copied (adapter_file.py).
        check_layer_state(state_dict, prefix, self.trady_delta.keys(), self.geometry)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's whole update as a dense tensor shaped like the base weight.

        Only for merging/conversion; training never materialises it.
        """
        weight = self.base_layer.weight
        shape = weight.shape if self.quantization is None else (self.out_features, self.in_features)
        indices, values = self.fold(adapter_name)
        dense = torch.zeros(shape, dtype=self.delta_dtype, device=weight.device)
        return self.geometry.scatter_into(dense, indices, values)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base weight; only the touched channels change.

        The touched slices' original values are kept, so `unmerge` restores the base
        weight bit for bit.

        A quantized base weight (bitsandbytes 4/8-bit, torchao int8) is dequantized, merged in
        fp32 and quantized again in its own format, which rounds the merged weight (and, through
        shared block statistics, untouched values near it): the error against the exact merge is
        kept in ``merge_rounding_errors[adapter]`` and reported in a `QuantizedMergeWarning`. The
        original quantized weight is kept until `unmerge`, which puts it back bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.trady_delta:
                continue
            indices, values = self.fold(name)
            if self.quantization is not None:
                self._merge_quantized(name, indices, values, safe_merge)
                continue
            weight = self.base_layer.weight
            original = self.geometry.read_slices(weight.data, indices)
            merged = original.to(self.delta_dtype) + values
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs found while merging adapter {name!r}; it was not merged.")
            self.geometry.write_slices(weight.data, indices, merged)
            self._merged_originals[name] = (indices, original)
            self.merged_adapters.append(name)

    def _merge_quantized(self, name: str, indices: torch.Tensor, values: torch.Tensor, safe_merge: bool) -> None:
        """Dequantize, merge in fp32, requantize (see `merge`)."""
        exact = dequantize(self.base_layer)
        self.geometry.scatter_into(exact, indices, values.to(device=exact.device))
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError(f"NaNs or infs found while merging adapter {name!r}; it was not merged.")
        snapshot = weight_snapshot(self.base_layer)
        requantize(self.base_layer, exact)
        error = rounding_error(dequantize(self.base_layer), exact)
        self._merged_originals[name] = (None, snapshot)
        self.merge_rounding_errors[name] = error
        self.merged_adapters.append(name)
        warnings.warn(
            QuantizedMergeWarning(
                f"Adapter {name!r} was merged into a {self.quantization} base weight "
                f"[{self.out_features}, {self.in_features}] by dequantizing, adding the delta in fp32 and "
                f"quantizing again: {error} against the exact merge. Keep the adapter unmerged for exact "
                "outputs, or export it with trady_peft.export_lora."
            ),
            stacklevel=3,
        )

    def unmerge(self) -> None:
        """Restore the slices `merge` changed (a quantized base: the original weight), newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            indices, original = self._merged_originals.pop(name)
            if indices is None:  # a quantized base: put the quantized weight back as it was
                restore_weight(self.base_layer, original)
                self.merge_rounding_errors.pop(name, None)
                continue
            self.geometry.write_slices(self.base_layer.weight.data, indices, original)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    # ------------------------------------------------------------------------------- forward
    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.geometry.kind == "conv":  # the geometry pads (own padding and any static_padding)
            return frozen_conv(x, self.base_layer, self.geometry)
        if not args and not kwargs:
            return frozen_quantized_linear(x, self.base_layer)
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._adapted_forward(x, *args, **kwargs)
        probe = self.channel_probe
        return result if probe is None else probe(x, result, self.geometry)

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # A conv's `static_padding` module (EfficientNet ports) is part of its geometry: both paths
        # below pad inside their autograd functions, so only the unpadded input is ever kept.
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.trady_delta:
                continue
            view = self.trady_delta[name]
            has_current = self.current_delta_installed(name)
            acc_idx = self.trady_indices[name]
            if not has_current and not acc_idx.numel():
                continue
            idx = self.trady_idx[name] if has_current else acc_idx[:0]
            delta = view() if has_current else self.trady_values[name][:0]
            update = SparseChannelDelta.apply(x, delta, idx, acc_idx, self.trady_values[name], self.geometry)
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "trady." + super().__repr__()


def trady_layers(module: nn.Module, adapter_name: str | None = None) -> list[tuple[str, TraDyLayer]]:
    """The TraDy layers inside ``module`` carrying ``adapter_name`` (default: every TraDy layer), with
    their names relative to ``module``, in module order."""
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, TraDyLayer) and (adapter_name is None or adapter_name in m.trady_delta)
    ]
