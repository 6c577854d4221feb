"""What a state dict of a TraDy model holds, and how loading one resumes the adapter.

A state dict (``model.state_dict()``, accelerate's ``save_state``, and the adapter file
``save_pretrained`` writes from it) is the whole adapter, in one form:

* each layer's ``trady_indices.<adapter>`` / ``trady_values.<adapter>``: its accumulated store with
  the current period's delta folded in (`TraDyLayer.fold`), written by the layer's state-dict
  hook `write_folded_stores`;
* ``trady_bank.<adapter>.weight``: an empty placeholder, the bank's values being in the stores
  (`trady_peft.core.bank.DeltaBank`);
* ``trady_state.<adapter>``: the adapter's live selection state (period, prices, statistics,
  channels: `trady_peft.selection.state`), written by the tuner's hook `write_selection_states`.

Loading one (`before_load`, then `after_load`) restarts each bank from zero, so that the folded
delta counts once, and installs the selection again: the outputs and the next draws are those of
the model the dict was taken from, and the loaded model's state dict equals the loaded one. A
bank that ``low_cpu_mem_usage=True`` left on the meta device becomes real (zeros) at the load.

A raw dict (the live stores and a full-size bank entry, such as DeepSpeed's ZeRO-3 consolidated
one) is folded with that bank when an adapter file is written from it (`adapter_file_entries`).

A dict that cannot say where the adapter stands is refused before anything is loaded
(`AdapterFileError`): stores without a selection state (what ``model.state_dict()`` held in
trady-peft 0.1.0) for an adapter that trains, a raw bank whose channels it does not name, or a
selection this adapter cannot install.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
from torch import nn

from .config import TraDyConfig
from .core.distributed import bank_for_saving, bank_numel, gathered, refuse_sharded_bank, unwrapped_name, zero_bank
from .core.layer import TraDyLayer, trady_layers
from .files.format import INDICES, PREFIX, VALUES, check_model_state, refuse_adapter
from .periods import Periods
from .selection.state import SelectionState
from .selection.statistics import ChannelNormStatistics

#: State-dict names of the tuner's containers: each adapter's bank and selection state.
BANK = PREFIX + "bank"
STATE = PREFIX + "state"
#: The bank's name in trady-peft 0.1.0 (raw state dicts of that version use it).
LEGACY_BANK = "channel_bank"
#: tuner -> (its key prefix, the selection states `before_load` parsed), for `after_load`.
_INCOMING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CheckpointHost(Protocol):
    """What this module needs of the tuner (`trady_peft.TraDyModel`)."""

    model: nn.Module
    peft_config: dict[str, TraDyConfig]
    periods: Periods
    trady_bank: nn.ModuleDict  # adapter name -> `trady_peft.core.bank.DeltaBank`
    trady_state: nn.Module  # adapter name -> an empty uint8 placeholder buffer

    def trady_layers(self, adapter_name: str | None = None) -> list[tuple[str, TraDyLayer]]: ...

    def check_placement(self, when: str) -> None: ...


# ------------------------------------------------------------------------------------ saving
def write_folded_stores(layer: TraDyLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook of a TraDy layer: each adapter's store with the current period folded in.

    The entries are new tensors, also under ``keep_vars=True``. Under ZeRO-3 the bank is gathered,
    a collective: every rank must take the state dict (as for any ZeRO-3 save).
    """
    for name in layer.trady_delta:
        key_idx, key_val = f"{prefix}{INDICES}.{name}", f"{prefix}{VALUES}.{name}"
        if key_idx not in state_dict or key_val not in state_dict:
            continue
        if layer.current_delta_installed(name):
            bank = layer.trady_delta[name].__dict__["bank"].weight
            refuse_sharded_bank(name, bank, "while taking a state dict")
            with gathered(bank):
                indices, values = layer.fold(name)
            state_dict[key_idx], state_dict[key_val] = indices.to(torch.int32), values.detach()


def write_selection_states(tuner: CheckpointHost, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook of the tuner: ``trady_state.<adapter>`` is the adapter's live selection state.

    (The buffer itself stays an empty placeholder: serialising on every change would re-encode
    MeDyate's statistics at each backward pass, and DDP would broadcast a growing buffer.)
    """
    for name, state in tuner.periods.states.items():
        key = f"{prefix}{STATE}.{name}"
        if key in state_dict:
            state_dict[key] = state.to_tensor().to(state_dict[key].device)


def adapter_file_entries(
    tuner: CheckpointHost, model: nn.Module, adapter_name: str, state_dict: dict, out: dict
) -> dict:
    """The adapter file's tensors, from ``out`` (peft's selection of ``state_dict`` for the adapter).

    The bank never goes in. A dict taken by ``state_dict()`` is already folded (its bank entry is
    an empty placeholder); a raw one (a full-size bank entry) is folded here with that bank, and
    an empty selection state is filled in with the live one.
    """
    tuner.check_placement("while saving")
    tuner.periods.steps.check_finite(adapter_name, "saved")  # a file that saves also loads
    bank_keys = (f"{BANK}.{adapter_name}.weight", f"{LEGACY_BANK}.{adapter_name}.weight")
    bank_entry = next((v for k, v in state_dict.items() if k.endswith(bank_keys)), None)
    out = {k: v for k, v in out.items() if f".{BANK}." not in f".{k}" and f".{LEGACY_BANK}." not in f".{k}"}
    for key in [k for k in out if k.endswith(f"{STATE}.{adapter_name}") and not out[k].numel()]:
        out[key] = tuner.periods.states[adapter_name].to_tensor()
    if bank_entry is not None and bank_entry.numel():
        with bank_for_saving(tuner.trady_bank[adapter_name].weight, bank_entry):  # ZeRO-3: the whole bank
            _fold_into(model, adapter_name, out)
    return out


def _fold_into(model: nn.Module, adapter_name: str, out: dict) -> None:
    """Write each layer's store with the current period folded in into ``out`` (a raw dict's entries)."""
    for name, module in trady_layers(model, adapter_name):
        name = unwrapped_name(name)
        key_idx, key_val = f"{name}.{INDICES}.{adapter_name}", f"{name}.{VALUES}.{adapter_name}"
        if key_idx not in out:
            if module.current_delta(adapter_name) is not None:
                raise RuntimeError(
                    f"Could not find {key_idx!r} in the state dict being saved; refusing to save an adapter "
                    "that would silently drop the current period's delta."
                )
            continue
        indices, values = module.fold(adapter_name)
        out[key_idx], out[key_val] = indices.to(torch.int32), values


# ----------------------------------------------------------------------------------- loading
def before_load(tuner: CheckpointHost, state_dict: dict, prefix: str) -> None:
    """Check the dict and prepare the banks, before any child of the tuner loads.

    Runs in the tuner's ``_load_from_state_dict`` (``state_dict`` holds the tuner's keys, with
    ``prefix``): a refused dict leaves the model exactly as it was. The parsed selection states
    wait for `after_load`.
    """
    check_model_state(tuner.trady_layers(), state_dict, f"{prefix}model.")
    incoming: dict[str, SelectionState] = {}
    for name, bank in tuner.trady_bank.items():
        key, legacy = f"{prefix}{BANK}.{name}.weight", f"{prefix}{LEGACY_BANK}.{name}.weight"
        if legacy in state_dict and key not in state_dict:
            state_dict[key] = state_dict.pop(legacy)
        stored = state_dict.get(f"{prefix}{STATE}.{name}")
        stores = (f".{INDICES}.{name}", f".{VALUES}.{name}")
        if stored is None and not any(k.startswith(prefix) and k.endswith(stores) for k in state_dict):
            continue  # the dict does not hold this adapter
        raw_bank = state_dict.get(key)
        raw = raw_bank is not None and raw_bank.numel() > 0
        if stored is None or not stored.numel():
            _refuse_without_state(tuner, name, raw_bank if raw else None)
        else:
            incoming[name] = _parse_state(tuner, name, stored)
        if not raw and bank.weight.device.type != "meta":
            zero_bank(bank.weight)  # the folded stores hold its values (and DeepSpeed's master copy)
    _INCOMING[tuner] = (prefix, incoming)


def after_load(tuner: CheckpointHost, incompatible_keys=None) -> None:
    """Load post hook of the tuner: make meta banks real, take over the selection states the dict
    carried and install their channels (an adapter waiting to draw draws when it is ready)."""
    periods = tuner.periods
    prefix, incoming = _INCOMING.pop(tuner, ("", {}))
    _absent_means_empty(tuner, prefix, incoming, incompatible_keys)
    materialized = []
    for name, bank in tuner.trady_bank.items():
        if bank.materialize(_layers_device(tuner, name)):
            periods.bank_replaced(name)
            materialized.append(name)
    for name, stored in list(tuner.trady_state.items()):
        if stored is not None and stored.numel():
            tuner.trady_state[name] = stored.new_zeros(0)  # back to the placeholder
    for name, state in incoming.items():
        periods.states[name] = state
        if tuner.peft_config[name].inference_mode:
            continue  # nothing trains: the stores are the whole adapter
        periods.install(name, state.selection or {})
        if state.selection is None:
            periods.draw_if_ready(name)
    for name in materialized:
        if name not in incoming and not tuner.peft_config[name].inference_mode:
            periods.draw_if_ready(name)


def _absent_means_empty(tuner: CheckpointHost, prefix: str, adapters, incompatible_keys) -> None:
    """Empty the stores an adapter's dict lacks, instead of reporting them missing.

    Every empty tensor reports the same (null) storage, and accelerate's ``save_state`` keeps only
    one entry of a storage it finds shared: the other empty stores are not in its checkpoint.
    """
    missing = incompatible_keys.missing_keys if incompatible_keys is not None else []
    for name in adapters:
        for layer_name, layer in tuner.trady_layers(name):
            for kind, store in ((INDICES, layer.trady_indices), (VALUES, layer.trady_values)):
                key = f"{prefix}model.{layer_name}.{kind}.{name}"
                if key in missing:
                    missing.remove(key)
                    store[name] = store[name].new_empty((0, *store[name].shape[1:]))


def _layers_device(tuner: CheckpointHost, name: str) -> torch.device:
    layers = tuner.trady_layers(name)
    device = layers[0][1].base_layer.weight.device if layers else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


_SAVE_AGAIN = (
    "Save the adapter with this trady-peft version (model.state_dict(), accelerate's save_state or "
    "save_pretrained all carry the state) and load that"
)


def _refuse_without_state(tuner: CheckpointHost, name: str, raw_bank: torch.Tensor | None) -> None:
    """A dict with the adapter's stores and no selection state: refused where it would mislead."""
    if raw_bank is not None and bool(raw_bank.any()):
        refuse_adapter(
            name,
            f"it holds this period's trained values in a raw bank ({BANK}.{name}.weight, {raw_bank.numel()} values) "
            "but no selection state naming the channels they belong to",
            _SAVE_AGAIN + ".",
        )
    if not tuner.peft_config[name].inference_mode:
        refuse_adapter(
            name,
            "it holds the adapter's stores but not its selection state (period, prices, channels), as "
            "model.state_dict() of trady-peft 0.1.0 did; training from it would resume on other channels than "
            "the run it was taken from",
            _SAVE_AGAIN + ", or load this one for inference only (is_trainable=False, or inference_mode=True).",
        )


def _parse_state(tuner: CheckpointHost, name: str, stored: torch.Tensor) -> SelectionState:
    """The selection state a dict carries for adapter ``name``; refused if this adapter cannot install it."""
    old = tuner.periods.states[name].statistics
    statistics = ChannelNormStatistics(old.sizes) if old is not None else None  # receives the saved norms
    state = SelectionState.from_dict(SelectionState.parse_tensor(stored), statistics)
    if state.selection is None or tuner.peft_config[name].inference_mode:
        return state
    layers = dict(tuner.trady_layers(name))
    unknown = [n for n in state.selection if n not in layers]
    if unknown:
        refuse_adapter(
            name,
            f"its selection state trains channels of {unknown[:3]}, which are not TraDy layers of this adapter "
            f"(e.g. {list(layers)[:3]})",
            _SAME_MODEL,
        )
    needed = 0
    for n, channels in state.selection.items():
        width = layers[n].geometry.in_channels
        if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= width):
            refuse_adapter(
                name,
                f"its selection state trains input channel {int(channels.max())} of layer {n!r}, which has "
                f"{width} input channels",
                _SAME_MODEL,
            )
        needed += channels.numel() * layers[n].geometry.slice_numel
    capacity = bank_numel(tuner.trady_bank[name].weight)
    if (
        needed > capacity
        and tuner.peft_config[name].step_memory is not None
        and name not in tuner.periods.prices.sized
    ):
        # step_memory: the bank is sized by the probe, not yet run here; it holds the saved selection
        # until the first forward measures the step again (and resizes it to the share).
        tuner.trady_bank[name].resize(needed)
        capacity = needed
    if needed > capacity:
        refuse_adapter(
            name,
            f"its selection state trains {needed} values, but this adapter's bank holds {capacity}",
            _SAME_MODEL,
        )
    return state


_SAME_MODEL = (
    "Load it into the base model and with the TraDyConfig it was saved with (same target_modules and "
    "memory_budget or channels_per_layer)."
)
