"""`TraDyModel`: wraps the target layers, owns the trainable bank, and moves from period to period.

Trainable state (DESIGN.md §2.3-2.4). Each adapter owns one flat fp32 parameter, its *bank*;
each wrapped layer trains a view onto its own segment of it. The bank's size is fixed when the
adapter is created, so the optimizer and DDP see the same parameter for the whole run; a new
period only moves segment boundaries and index buffers, in place. No dense ``[out, in]`` tensor
is ever allocated for training.

Where the rest lives: what a period does (`trady_peft.periods`, mixed into `TraDyModel`), which
channels a strategy picks (`trady_peft.strategies`, `trady_peft.selection`), what a period's
state holds and what a checkpoint carries (`trady_peft.state`), how bytes are counted
(`trady_peft.budget`), the gradient statistics (`trady_peft.scoring`), the optimizer reset
(`trady_peft.optim`).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ._registration import PREFIX
from .adapter_file import check_model_state
from .backprop import BackpropStop
from .compat import has_zero_master, is_zero3_param, tensor_version
from .config import TraDyConfig
from .distributed import (
    average_gradient,
    bank_for_saving,
    bank_numel,
    check_bank_placement,
    register_zero3_bank,
)
from .frozen_path import apply_memory_saving, restore
from .geometry import SUPPORTED_LAYER_TYPES
from .layer import QuantizedMergeWarning, ResizableBufferDict, TraDyLayer
from .periods import PeriodLifecycle
from .quantized import requantize_refusal
from .scoring import ChannelNormStatistics
from .state import SelectionState
from .strategies import get_strategy
from .targets import default_targets

logger = logging.getLogger(__name__)


class DeltaBank(nn.Module):
    """One adapter's trainable values: a flat fp32 ``weight`` shared out among the layers.

    Its forward never runs (the layers read ``weight`` through views), so FSDP2 must not shard it:
    it stays whole on every rank (`trady_peft.fsdp_ignored_params`, docs/distributed.md).
    """

    def __init__(self, adapter_name: str, capacity: int, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.adapter_name = adapter_name
        # Assigned directly, not through register_parameter: peft builds tuners under
        # init_empty_weights when loading with low_cpu_mem_usage=True, which would put the bank
        # on the meta device, and the bank is runtime state that no checkpoint fills in.
        self._parameters["weight"] = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))

        self.layout: tuple[tuple[int, int], ...] = ()  # (offset, numel) of each installed layer segment
        self._slices = _SliceCache()

    def set_layout(self, segments) -> None:
        """Record the layers' segments ``(offset, numel)`` of this period (disjoint, set by `install`)."""
        self.layout = tuple(sorted((int(o), int(n)) for o, n in segments if n))
        self._slices.clear()

    def segment(self, offset: int, numel: int) -> torch.Tensor:
        """The flat segment ``weight[offset:offset + numel]`` as read by a layer's forward.

        With gradients enabled, every segment of the layout comes from one ``split_with_sizes`` of
        the bank, made once and reused until the bank changes in place (an optimizer step, a
        period change), so the backward pass builds the bank's gradient once (O(bank)) instead of
        once per layer through a ``narrow`` view each (O(layers x bank)). Otherwise, or for a
        segment outside the layout, a plain ``narrow`` view.
        """
        weight = self.weight
        if not torch.is_grad_enabled() or is_zero3_param(weight):
            return weight.narrow(0, offset, numel)
        slices = self._slices.get(weight, self.layout)
        piece = slices.get((offset, numel)) if slices is not None else None
        return piece if piece is not None else weight.narrow(0, offset, numel)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, capacity={self.weight.numel()}"


class _SliceCache:
    """One split of a bank into its layout's segments, valid while the bank is unchanged.

    The key is the bank tensor itself, its storage address, its in-place version counter
    (`trady_peft.compat.tensor_version`), whether it requires grad, and the layout. Reusing the
    split over several forwards is safe: ``split_with_sizes``'s backward keeps no saved tensor, so
    each backward pass (and a checkpoint's recomputation) can run through it again. Copies and
    pickles of a model start with an empty cache (the split outputs are not leaves).
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key, self.slices = None, None

    def get(self, weight: torch.Tensor, layout: tuple[tuple[int, int], ...]) -> dict | None:
        if not layout:
            return None
        key = (weight.data_ptr(), tensor_version(weight), weight.requires_grad, weight.numel(), layout)
        if self.slices is not None and self.key[0] is weight and self.key[1:] == key:
            return self.slices
        sizes, pieces, at = [], [], 0
        for offset, numel in layout:
            if offset < at or offset + numel > weight.numel():
                return None  # overlapping or out of range: the caller narrows
            if offset > at:
                sizes.append(offset - at)
                pieces.append(None)
            sizes.append(numel)
            pieces.append((offset, numel))
            at = offset + numel
        if at < weight.numel():
            sizes.append(weight.numel() - at)
            pieces.append(None)
        outputs = torch.split_with_sizes(weight, sizes)
        self.key = (weight, *key)
        self.slices = {p: t for p, t in zip(pieces, outputs) if p is not None}
        return self.slices

    def __reduce__(self):
        return (_SliceCache, ())


def find_tuner(model: nn.Module) -> TraDyModel:
    """The `TraDyModel` inside a ``PeftModel`` (also when wrapped by DDP/FSDP/accelerate)."""
    for module in model.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(
        f"No TraDy adapter found in this {type(model).__name__}: create it with "
        "peft.get_peft_model(model, trady_peft.TraDyConfig(...)) before training."
    )


class TraDyModel(PeriodLifecycle, BaseTuner):
    """Applies TraDy to a model. Created by ``peft.get_peft_model`` with a `TraDyConfig`.

    Besides the usual peft tuner API (merge, unload, add/set/delete adapter), it offers
    `advance`, the one way to move to a period: the deltas trained so far are folded into the
    accumulated store, the period's channels are drawn and the optimizer state of re-targeted
    entries is reset.
    """

    prefix: str = PREFIX
    tuner_layer_cls = TraDyLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.selection_states: dict[str, SelectionState] = {}
        self.layer_costs: dict = {}  # layer name -> LayerCost: the largest input seen (probe)
        self._input_dims: dict = {}  # largest size of each model input seen in training
        self._probing, self._forward_depth, self._optimizer, self._warned_stale = False, 0, None, False
        self._norm_hooks: dict = {}
        # FSDP2: the banks stay whole on every rank and TraDy averages their gradients (distributed.py).
        self._average_bank_grads, self._bank_grad_hooks, self._placement_checked = False, {}, False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._call_hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, always_call=True),
        ]
        self._backprop_stop = BackpropStop(self.model, self._module_trains)
        self.register_load_state_dict_post_hook(TraDyModel._restore_states)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        merging = kwargs.get("merge", args[0] if args else True)
        with self._one_quantized_merge_warning(refuse=merging):  # a refusal raises here, hooks intact
            for hook in self._call_hooks:
                hook.remove()  # the returned base model must not call back into this tuner
            self._backprop_stop.remove()
            model = super()._unload_and_optionally_merge(*args, **kwargs)
        restore(model)  # the plain torch modules again
        return model

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        with self._one_quantized_merge_warning():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    @contextmanager
    def _one_quantized_merge_warning(self, refuse: bool = True):
        """One `QuantizedMergeWarning` for the whole model instead of one per quantized layer, naming
        the layers with the largest rounding errors (each layer keeps its own in ``merge_rounding_errors``)."""
        layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TraDyLayer)]
        for n, m in layers if refuse else []:  # refuse before any layer is merged
            refusal = requantize_refusal(m.base_layer) if m.quantization is not None else None
            if refusal is not None:
                raise TypeError(f"Cannot merge into the quantized layer {n!r}: {refusal}. Nothing was merged.")
        before = {n: dict(m.merge_rounding_errors) for n, m in layers}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuantizedMergeWarning)
            yield
        rows = [
            (n, adapter, err, m.quantization)
            for n, m in layers
            for adapter, err in m.merge_rounding_errors.items()
            if before[n].get(adapter) is not err
        ]
        if not rows:
            return
        worst_abs = max(rows, key=lambda r: r[2].max_abs)
        worst_rel = max(rows, key=lambda r: r[2].relative)
        backends = ", ".join(sorted({r[3] for r in rows}))
        warnings.warn(
            QuantizedMergeWarning(
                f"Merged {len(rows)} quantized layer(s) ({backends}) by dequantizing, adding the delta in fp32 and "
                "quantizing again, so the merged model is rounded: largest max abs error "
                f"{worst_abs[2].max_abs:.3g} in {worst_abs[0]!r}, largest relative error {worst_rel[2].relative:.3g} "
                f"in {worst_rel[0]!r}, against the exact fp32 merge. Keep the adapter unmerged for exact outputs, "
                "or export it with trady_peft.export_lora."
            ),
            stacklevel=4,
        )

    # ----------------------------------------------------------------------------- wrapping
    def _prepare_adapter_config(self, peft_config: TraDyConfig, model_config: dict) -> TraDyConfig:
        return peft_config  # target_modules=None is resolved in _prepare_model, which sees the model

    def _prepare_model(self, peft_config: TraDyConfig, model: nn.Module) -> None:
        if peft_config.target_modules is not None:
            return
        names = default_targets(model, peft_config)
        if not names:
            raise ValueError(
                "TraDy found no nn.Linear, nn.Conv1d, nn.Conv2d or Conv1D layer to adapt in this model (after "
                "layers_to_transform / modules_to_save); pass target_modules explicitly."
            )
        peft_config.target_modules = set(names)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, TraDyLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, SUPPORTED_LAYER_TYPES):
            raise TypeError(
                f"Module {current_key!r} is a {type(target).__name__}, which TraDy cannot adapt: supported layers "
                "are nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D. Remove it from target_modules."
            )
        new_module = TraDyLayer(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, **kwargs):
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, **kwargs)
        self._create_bank(adapter_name)
        if self.peft_config[adapter_name].memory_saving_frozen_path:
            apply_memory_saving(self.model)

    def _create_bank(self, name: str) -> None:
        config = self.peft_config[name]
        self._use_importance_table(name)
        layers = self.trady_layers(name)
        device = layers[0][1].base_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        if not hasattr(self, "channel_bank"):
            self.channel_bank = nn.ModuleDict()
            self.trady_state = ResizableBufferDict()  # the selection state, filled in when saving
        bank = DeltaBank(name, 0 if config.inference_mode else self._capacity(name), device, layers[0][1].delta_dtype)
        if not config.init_weights:
            with torch.no_grad():
                bank.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(config.seed))
        self.channel_bank[name] = bank
        self.trady_state[name] = torch.zeros(0, dtype=torch.uint8, device=device)
        bank.weight.requires_grad_(name in self.active_adapters and not config.inference_mode)
        strategy = get_strategy(config.strategy)
        quantized = [f"{n} ({m.quantization})" for n, m in layers if m.quantization is not None]
        if strategy.needs_scores and quantized:
            raise ValueError(
                f"strategy={config.strategy!r} scores channels with the full gradient of every base weight, which a "
                f"quantized weight cannot have ({quantized[0]}{' and others' if len(quantized) > 1 else ''}). Use a "
                "strategy that needs no scores on a quantized base: 'trady', 'd-full-random' or 'medyate'."
            )
        statistics = None
        if strategy.channels == "weighted" and not config.inference_mode:
            statistics = ChannelNormStatistics({n: m.geometry.in_channels for n, m in layers})
            trains = bank.weight.requires_grad
            bank.weight.requires_grad_(True)  # a tensor hook needs a tensor that requires grad
            self._norm_hooks[name] = bank.weight.register_hook(lambda grad, name=name: self._record_norms(name, grad))
            bank.weight.requires_grad_(trains)
        # An adapter added after the probe starts from the prices measured so far.
        costs = {n: self.layer_costs[n] for n, _ in layers if n in self.layer_costs} if config.budget else {}
        self.selection_states[name] = SelectionState(costs=costs, statistics=statistics)
        if self._average_bank_grads:
            self._hook_bank_gradient(name)
        if not config.inference_mode:
            self._draw_if_ready(name)

    # ------------------------------------------------------------------------- distributed
    def average_bank_gradients(self) -> None:
        """Average every bank's gradient over the ranks after each backward pass (FSDP2 with the
        bank left unsharded; see `trady_peft.fsdp_ignored_params`). Idempotent."""
        self._average_bank_grads = True
        for name in self.channel_bank:
            self._hook_bank_gradient(name)

    def _hook_bank_gradient(self, name: str) -> None:
        if name not in self._bank_grad_hooks:
            weight = self.channel_bank[name].weight
            self._bank_grad_hooks[name] = weight.register_post_accumulate_grad_hook(average_gradient)

    def _check_placement(self, when: str) -> None:
        """Refuse a sharded bank (distributed.py), and follow FSDP's move of the model to its device."""
        check_bank_placement(self, when)
        for name, bank in self.channel_bank.items():
            register_zero3_bank(self, name)
            device = self.trady_state[name].device  # a buffer: FSDP moves it with the managed states
            if bank.weight.device != device and not has_zero_master(
                bank.weight
            ):  # an ignored parameter stays where it was
                with torch.no_grad():
                    bank.weight.data = bank.weight.data.to(device)  # same Parameter: the optimizer keeps it

    # ------------------------------------------------------------------------------- layers
    def _module_trains(self, module: nn.Module) -> bool:
        """Whether anything inside ``module`` trains now: selected channels of an active adapter whose
        bank trains, or a parameter that requires grad (`trady_peft.backprop`)."""
        banks = getattr(self, "channel_bank", {})
        for m in module.modules():
            if isinstance(m, TraDyLayer) and not m.disable_adapters and not m.merged:
                for name in m.active_adapters:
                    if name in banks and banks[name].weight.requires_grad and m.current_delta_installed(name):
                        return True
        return any(p.requires_grad for p in module.parameters())

    def trady_layers(self, adapter_name: str) -> list[tuple[str, TraDyLayer]]:
        """The wrapped layers carrying ``adapter_name``, in module order."""
        return [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, TraDyLayer) and adapter_name in m.trady_delta
        ]

    # ------------------------------------------------------------------ adapter housekeeping
    def _sync_bank_requires_grad(self, active, inference_mode: bool = False) -> None:
        for name, bank in getattr(self, "channel_bank", {}).items():
            bank.weight.requires_grad_(name in active and not inference_mode and bank_numel(bank.weight) > 0)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_bank_requires_grad(self.active_adapters, inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if name in getattr(self, "channel_bank", {}):
                self.channel_bank[name].weight.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for store in (getattr(self, "channel_bank", {}), getattr(self, "trady_state", {})):
            if adapter_name in store:
                del store[adapter_name]
        self.selection_states.pop(adapter_name, None)
        for hooks in (self._norm_hooks, self._bank_grad_hooks):
            hook = hooks.pop(adapter_name, None)
            if hook is not None:
                hook.remove()
        self._sync_bank_requires_grad(self.active_adapters)  # the remaining adapter trains, as with LoRA

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._sync_bank_requires_grad(self.active_adapters)

    # ------------------------------------------------------------------------------ saving
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An adapter file stores the current period's delta folded into `trady_values`, and no
        # bank. When such a store is loaded for an adapter, its live delta must restart from
        # zero or it would count twice. (Runs before the children load; torch hands each child
        # only its own keys, so the bank itself could not tell.)
        check_model_state(self, state_dict, prefix)  # refuse a bad file before anything changes
        for name, bank in getattr(self, "channel_bank", {}).items():
            suffix = f".trady_values.{name}"
            if prefix + f"channel_bank.{name}.weight" not in state_dict and any(
                k.endswith(suffix) for k in state_dict
            ):
                with torch.no_grad():
                    bank.weight.zero_()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _restore_states(tuner: TraDyModel, incompatible_keys) -> None:
        """After a load: take over the selection state a checkpoint carried (see `trady_peft.state`)."""
        for name, stored in list(getattr(tuner, "trady_state", {}).items()):
            if stored is None or not stored.numel():
                continue
            tuner.trady_state[name] = stored.new_zeros(0)
            old = tuner.selection_states[name].statistics
            statistics = ChannelNormStatistics(old.sizes) if old is not None else None  # filled from the file
            state = SelectionState.from_dict(SelectionState.parse_tensor(stored), statistics)
            tuner.selection_states[name] = state
            if tuner.peft_config[name].inference_mode:
                continue
            if state.selection is not None and tuner._install_fits(name, state.selection):
                tuner._install(name, state.selection)
            else:
                state.selection = None
                tuner._draw_if_ready(name)

    def _install_fits(self, name: str, selection: dict[str, torch.Tensor]) -> bool:
        sizes = {n: m.geometry.slice_numel for n, m in self.trady_layers(name)}
        needed = sum(sizes.get(n, 0) * c.numel() for n, c in selection.items())
        return set(selection) <= set(sizes) and needed <= bank_numel(self.channel_bank[name].weight)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save ``(indices, values)`` per layer with the current period folded in, and the selection
        state; never the bank."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        out = {k: v for k, v in out.items() if ".channel_bank." not in f".{k}"}  # runtime state only
        tuner = find_tuner(model)
        tuner._check_placement("while saving")
        weight = tuner.channel_bank[adapter_name].weight
        consolidated = next(
            (v for k, v in state_dict.items() if k.endswith(f"channel_bank.{adapter_name}.weight")), None
        )
        for key in [k for k in out if k.endswith(f"trady_state.{adapter_name}")]:
            out[key] = tuner.selection_states[adapter_name].to_tensor()
        with bank_for_saving(weight, consolidated):  # ZeRO-3: the whole bank
            cls._fold_into(model, adapter_name, out)
        return out

    @staticmethod
    def _fold_into(model, adapter_name: str, out: dict) -> None:
        """Write each layer's store with the current period folded in into ``out``."""
        for name, module in model.named_modules():
            if not isinstance(module, TraDyLayer) or adapter_name not in module.trady_delta:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            key_idx, key_val = f"{name}.trady_indices.{adapter_name}", f"{name}.trady_values.{adapter_name}"
            if key_idx not in out:
                if module.current_delta(adapter_name) is not None:
                    raise RuntimeError(
                        f"Could not find {key_idx!r} in the state dict being saved; refusing to save an adapter "
                        "that would silently drop the current period's delta."
                    )
                continue
            indices, values = module.fold(adapter_name)
            out[key_idx], out[key_val] = indices.to(torch.int32), values
