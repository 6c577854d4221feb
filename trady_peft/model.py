"""`TraDyModel`: wraps the target layers, owns each adapter's bank, and hands periods to `Periods`.

Each adapter owns one flat fp32 parameter, its bank (`trady_peft.core.bank.DeltaBank`, in
``trady_bank``); each wrapped layer (`trady_peft.core.layer.TraDyLayer`) trains a view onto its
own segment of it.

Where the rest lives: what a period does (`trady_peft.periods.Periods`, a component of the
tuner), which channels a strategy picks and what a checkpoint carries of it
(`trady_peft.selection`), what a step keeps in memory and how bytes are counted
(`trady_peft.memory`), what a state dict holds and how a load resumes (`trady_peft.checkpoint`),
what the adapter file holds (`trady_peft.files`).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, NoMatchingPeftModuleError
from torch import nn

from .checkpoint import adapter_file_entries, after_load, before_load, write_folded_stores, write_selection_states
from .compat import has_zero_master, module_calls_on_stack
from .config import TraDyConfig
from .core.bank import DeltaBank
from .core.distributed import bank_numel, check_bank_placement, register_zero3_bank
from .core.geometry import SUPPORTED_LAYER_TYPES
from .core.layer import QuantizedMergeWarning, ResizableBufferDict, TraDyLayer, trady_layers
from .core.quantized import requantize_refusal
from .core.targets import default_targets
from .files.format import PREFIX
from .memory.backprop import BackpropStop
from .memory.budget import DEFAULT_RANK, default_budget
from .memory.frozen_path import apply_memory_saving, restore
from .periods import Periods
from .selection.state import SelectionState
from .selection.strategies import AUTO, auto_strategy

logger = logging.getLogger(__name__)


#: Where a config records the default budget it was given (not a field: never saved), so that reusing
#: the object for another model is caught.
_DEFAULTED = "_trady_default_budget"


def _supported_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` TraDy can wrap (Linear, Conv1d, Conv2d, transformers' Conv1D)."""
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYER_TYPES)]


def find_tuner(model: nn.Module) -> TraDyModel:
    """The `TraDyModel` inside a ``PeftModel`` (also when wrapped by DDP/FSDP/accelerate)."""
    for module in model.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(
        f"No TraDy adapter found in this {type(model).__name__}: create it with "
        "peft.get_peft_model(model, trady_peft.TraDyConfig(...)) before training."
    )


class TraDyModel(BaseTuner):
    """Applies TraDy to a model. Created by ``peft.get_peft_model`` with a `TraDyConfig`.

    Besides the usual peft tuner API (merge, unload, add/set/delete adapter), it offers
    `next_period`, the one way to move to a period: the deltas trained so far are folded into the
    accumulated store, the period's channels are drawn and the optimizer state of re-targeted
    entries is reset. Its `periods` component (`trady_peft.periods.Periods`) does that work.
    """

    prefix: str = PREFIX
    tuner_layer_cls = TraDyLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.periods = Periods(self)
        self._forward_depth, self._placement_checked = 0, False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._call_hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, always_call=True),
        ]
        self._backprop_stop = BackpropStop(self.model, self._module_trains)
        self.register_state_dict_post_hook(write_selection_states)
        self.register_load_state_dict_post_hook(after_load)

    @property
    def channel_bank(self) -> nn.ModuleDict:
        """Deprecated name of ``trady_bank`` (the banks, by adapter name)."""
        warnings.warn(
            "TraDyModel.channel_bank is deprecated; use TraDyModel.trady_bank (renamed so that the bank carries "
            "peft's 'trady_' prefix).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.trady_bank

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
        layers = self.trady_layers()
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
            supported = _supported_layer_names(model)
            if not supported:
                raise ValueError(
                    f"This {type(model).__name__} has no layer TraDy can adapt: TraDy trains input channels of "
                    "nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D layers, and the model has none."
                )
            raise ValueError(
                f"TraDy's default targets left no layer of this model to adapt (layers_to_transform, layers_pattern "
                "and modules_to_save, and the output heads, leave out all of them). Name the layers to adapt, e.g. "
                f"target_modules={supported[:3]}, or loosen layers_to_transform."
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
        new_module.register_state_dict_post_hook(write_folded_stores)  # a state dict is the whole adapter
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, **kwargs):
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, **kwargs)
        except NoMatchingPeftModuleError as error:
            supported = _supported_layer_names(model)
            raise ValueError(
                f"target_modules={self.peft_config[adapter_name].target_modules!r} matches no layer of this model. "
                + (
                    f"Layers TraDy can adapt here include {supported[:5]}; name some of them, or leave "
                    "target_modules=None for TraDy's default."
                    if supported
                    else "The model has no nn.Linear, nn.Conv1d, nn.Conv2d or Conv1D layer, the layers TraDy adapts."
                )
            ) from error
        self._create_bank(adapter_name, on_meta=low_cpu_mem_usage)
        if self.peft_config[adapter_name].memory_saving_frozen_path:
            apply_memory_saving(self.model)

    def _create_bank(self, name: str, on_meta: bool = False) -> None:
        """The adapter's bank; on the meta device for a ``low_cpu_mem_usage`` load, which makes it real."""
        config = self.peft_config[name]
        defaulted = config.uses_default_budget or config.memory_budget == config.__dict__.get(_DEFAULTED, False)
        if defaulted:
            geometries = [layer.geometry for _, layer in self.trady_layers(name)]
            budget = f"{default_budget(geometries, config.optimizer_state_bytes, config.bank_share)}B"
            if config.memory_budget not in (None, budget):  # peft keeps the caller's object: it was another model's
                raise ValueError(
                    f"This TraDyConfig got memory_budget={config.memory_budget!r} as the default budget of another "
                    f"model's layers; this model's default is {budget!r}. Pass a new TraDyConfig() for each model "
                    "(or set memory_budget)."
                )
            config.memory_budget = config.__dict__[_DEFAULTED] = budget
            logger.info(
                "TraDy: no memory_budget, step_memory or channels_per_layer: adapter %r gets memory_budget=%r, a bank "
                "of the values LoRA r=%d would train on its %d layers.",
                name,
                config.memory_budget,
                DEFAULT_RANK,
                len(geometries),
            )
        if config.strategy == AUTO:
            config.strategy = auto_strategy(is_causal_lm(self.model), config.budgeted)
            logger.info("TraDy: strategy='auto' picked %r for adapter %r.", config.strategy, name)
        self.periods.use_importance_table(name)
        layers = self.trady_layers(name)
        device = layers[0][1].base_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        if "trady_bank" not in self._modules:
            self.trady_bank = nn.ModuleDict()
            self.trady_state = ResizableBufferDict()  # placeholders: a state dict holds the live states
        capacity = 0 if config.inference_mode else self.periods.capacity(name, warn_if_all=not defaulted)
        bank = DeltaBank(name, capacity, torch.device("meta") if on_meta else device, layers[0][1].delta_dtype)
        if not config.init_weights and bank.weight.device.type != "meta":
            with torch.no_grad():
                bank.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(config.seed))
        self.trady_bank[name] = bank
        self.trady_state[name] = torch.zeros(0, dtype=torch.uint8, device=device)
        bank.weight.requires_grad_(name in self.active_adapters and not config.inference_mode)
        if any(other.averages_gradients for other in self.trady_bank.values() if other is not bank):
            bank.average_gradients()  # FSDP2 was prepared for the adapters before this one
        self.periods.add_adapter(name)

    # ------------------------------------------------------------------------------ forward
    @property
    def in_forward(self) -> bool:
        """Whether a forward pass of the wrapped model is running."""
        if self._forward_depth and not module_calls_on_stack(self.model):
            self._forward_depth = 0  # left behind by a forward that a KeyboardInterrupt stopped
        return self._forward_depth > 0

    def _before_forward(self, module, args, kwargs):
        if self._forward_depth:  # a nested call, or a count left behind by an interrupted forward
            self._forward_depth = module_calls_on_stack(self.model) - 1
        self._forward_depth += 1
        if self._forward_depth == 1:
            self._backprop_stop.before_forward()
        if not torch.is_grad_enabled():
            return  # evaluation under no_grad must not fix the byte accounting to its batch
        # Gradients flow (autograd keeps this forward's inputs), whatever the modules' training mode.
        if not self._placement_checked:
            self.check_placement("at the first grad-enabled forward")
            self._placement_checked = True
        self.periods.prices.before_forward(args, kwargs)
        self.periods.score_first_batch(args, kwargs)  # Det-RGN, when nothing scored it before

    def _after_forward(self, module, args, output):
        self._forward_depth = max(0, self._forward_depth - 1)
        if not self._forward_depth:
            self.periods.prices.after_forward()

    def check_placement(self, when: str) -> None:
        """Refuse a sharded bank (`trady_peft.core.distributed`), and follow FSDP's move of the model
        to its device."""
        check_bank_placement(dict(self.trady_bank), self.model, when)
        for name, bank in self.trady_bank.items():
            register_zero3_bank(bank.weight, [layer for _, layer in self.trady_layers(name)])
            device = self.trady_state[name].device  # a buffer: FSDP moves it with the managed states
            if bank.weight.device != device and not has_zero_master(bank.weight):  # an ignored parameter stays
                with torch.no_grad():
                    bank.weight.data = bank.weight.data.to(device)  # same Parameter: the optimizer keeps it

    # ------------------------------------------------------------------------------ periods
    def next_period(
        self, period=None, optimizer=None, batches=None, adapter_name: str | None = None, root: nn.Module | None = None
    ) -> int:
        """Move to ``period`` (default: the next one): fold, draw, reset (`trady_peft.periods.Periods.next_period`)."""
        return self.periods.next_period(period, optimizer, batches=batches, adapter_name=adapter_name, root=root)

    def advance(self, period=None, optimizer=None, batches=None, adapter_name: str | None = None) -> int:
        """Deprecated name of `next_period`."""
        warnings.warn("TraDyModel.advance is deprecated; use next_period.", DeprecationWarning, stacklevel=2)
        return self.next_period(period, optimizer, batches=batches, adapter_name=adapter_name)

    def resample(self, optimizer=None, adapter_name: str | None = None, period: int | None = None) -> int:
        """Deprecated name of `next_period`."""
        warnings.warn("TraDyModel.resample is deprecated; use next_period.", DeprecationWarning, stacklevel=2)
        return self.next_period(period, optimizer, adapter_name=adapter_name)

    def probe(self, example_inputs) -> None:
        """Price every budget on ``example_inputs`` (`trady_peft.periods.prices.Prices.probe`)."""
        self.periods.prices.probe(example_inputs)

    def attach_optimizer(self, optimizer, adapter_name: str = "default") -> None:
        """Check that ``optimizer`` trains the adapter's bank and reset its state at every redraw."""
        self.periods.attach_optimizer(optimizer, adapter_name)

    def score_channels(
        self, batches, adapter_name: str | None = None, period: int | None = None, root: nn.Module | None = None
    ) -> dict:
        """Det-RGN's channel scores on ``batches`` (`trady_peft.periods.Periods.score_channels`)."""
        return self.periods.score_channels(batches, adapter_name, period, root)

    @property
    def selection_states(self) -> dict[str, SelectionState]:
        """Each adapter's selection state (`trady_peft.selection.state.SelectionState`)."""
        return self.periods.states

    @property
    def layer_costs(self) -> dict:
        """Per-layer prices measured by the probe (`trady_peft.memory.budget.LayerCost`)."""
        return self.periods.prices.layer_costs

    def period(self, adapter_name: str = "default") -> int:
        """Index of the adapter's current training period (0 before the first redraw)."""
        return self.periods.period(adapter_name)

    def phase(self, adapter_name: str = "default"):
        """Where the adapter stands (`trady_peft.selection.state.Phase`)."""
        return self.periods.phase(adapter_name)

    def candidate_layers(self, adapter_name: str = "default") -> list[tuple[str, TraDyLayer]]:
        """The layers the adapter's strategy draws from, in module order."""
        return self.periods.candidate_layers(adapter_name)

    def priced_layers(self, adapter_name: str = "default") -> list:
        """Candidate layers with what one channel spends of each part of the budget."""
        return self.periods.prices.priced_layers(adapter_name)

    def selected_cost(self, adapter_name: str = "default") -> int:
        """What the current selection spends of the budget, in its unit."""
        return self.periods.prices.selected_cost(adapter_name)

    def selection_summary(self, adapter_name: str = "default") -> dict:
        """Figures for logs: period, layers, channels selected now and touched so far, budget use."""
        return self.periods.selection_summary(adapter_name)

    # ------------------------------------------------------------------------------- layers
    def _module_trains(self, module: nn.Module) -> bool:
        """Whether anything inside ``module`` trains now: selected channels of an active adapter whose
        bank trains, or a parameter that requires grad (`trady_peft.memory.backprop`)."""
        banks = getattr(self, "trady_bank", {})
        for _, m in trady_layers(module):
            if not m.disable_adapters and not m.merged:
                for name in m.active_adapters:
                    if name in banks and banks[name].weight.requires_grad and m.current_delta_installed(name):
                        return True
        return any(p.requires_grad for p in module.parameters())

    def trady_layers(self, adapter_name: str | None = None) -> list[tuple[str, TraDyLayer]]:
        """The wrapped layers carrying ``adapter_name`` (default: every wrapped layer), in module order."""
        return trady_layers(self.model, adapter_name)

    # ------------------------------------------------------------------ adapter housekeeping
    def _sync_bank_requires_grad(self, active, inference_mode: bool = False) -> None:
        for name, bank in getattr(self, "trady_bank", {}).items():
            sized_later = self.peft_config[name].step_memory is not None  # empty until the probe sizes it
            holds = bank_numel(bank.weight) > 0 or sized_later
            bank.weight.requires_grad_(name in active and not inference_mode and holds)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_bank_requires_grad(self.active_adapters, inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if name in getattr(self, "trady_bank", {}):
                self.trady_bank[name].weight.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in getattr(self, "trady_bank", {}):
            self.trady_bank[adapter_name].remove_hooks()
        for store in (getattr(self, "trady_bank", {}), getattr(self, "trady_state", {})):
            if adapter_name in store:
                del store[adapter_name]
        self.periods.remove_adapter(adapter_name)
        self._sync_bank_requires_grad(self.active_adapters)  # the remaining adapter trains, as with LoRA

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._sync_bank_requires_grad(self.active_adapters)

    # ----------------------------------------------------------------- dtype, state dicts
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's contract: ``autocast_adapter_dtype=False`` keeps the trainable weights in the base model's
        half dtype. The bank follows it (the same parameter object); the stores stay fp32."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        layers = self.trady_layers(adapter_name)
        if autocast_adapter_dtype or adapter_name not in getattr(self, "trady_bank", {}) or not layers:
            return
        bank, base = self.trady_bank[adapter_name], layers[0][1].base_layer.weight.dtype
        if base in (torch.float16, torch.bfloat16) and bank.weight.dtype != base:
            with torch.no_grad():
                bank.weight.data = bank.weight.data.to(base)
            bank.set_layout(bank.layout)  # drops the split cached for the old tensor

    # A state dict is the whole adapter (trady_peft.checkpoint): folded stores, an empty bank
    # placeholder and the live selection states, written by state-dict hooks.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        before_load(self, state_dict, prefix)  # runs before the children load: a refusal changes nothing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter file: ``(indices, values)`` per layer with the current period folded in, and the
        selection state; never the bank (`trady_peft.checkpoint.adapter_file_entries`)."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return adapter_file_entries(find_tuner(model), model, adapter_name, state_dict, out)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` generates text: a transformers model whose ``can_generate()`` says so."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate())
