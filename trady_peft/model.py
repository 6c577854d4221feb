"""`TraDyModel`: finds the target layers, wraps them, owns the trainable bank and the draws.

Trainable state (DESIGN.md §2.3-2.4). Each adapter owns one flat fp32 parameter, its *bank*;
each wrapped layer trains a view onto its own segment of it. The bank's size is fixed when the
adapter is created, so the optimizer, DDP's reducer and FSDP see the same parameter for the
whole run; a resample only moves segment boundaries and index buffers, in place. No dense
``[out, in]`` tensor is ever allocated for training.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn

from ._registration import PREFIX
from .adapter_file import check_model_state
from .budget import PARAM_AND_GRAD_BYTES, LayerCost, _call, layer_cost, probe_input_shapes
from .config import ORACLE_STRATEGIES, TOP_K_STRATEGIES, TraDyConfig
from .frozen_path import apply_memory_saving, restore
from .geometry import SUPPORTED_LAYER_TYPES
from .importance import builtin_entry, family_of
from .layer import TraDyLayer
from .memory import required_loss
from .selection import (
    Candidate,
    PricedLayer,
    draw_per_layer,
    draw_under_budget,
    draw_weighted_under_budget,
    greedy_under_budget,
)

logger = logging.getLogger(__name__)


class DeltaBank(nn.Module):
    """One adapter's trainable values: a flat fp32 ``weight`` shared out among the layers.

    A leaf module with a ``.weight`` so that FSDP auto-wrapping treats it as its own unit.
    """

    def __init__(self, adapter_name: str, capacity: int, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.adapter_name = adapter_name
        # Assigned directly, not through register_parameter: peft builds tuners under
        # init_empty_weights when loading with low_cpu_mem_usage=True, which would put the bank
        # on the meta device, and the bank is runtime state that no checkpoint fills in.
        self._parameters["weight"] = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, capacity={self.weight.numel()}"


class TraDyModel(BaseTuner):
    """Applies TraDy to a model. Created by ``peft.get_peft_model`` with a :class:`TraDyConfig`.

    Besides the usual peft tuner API (merge, unload, add/set/delete adapter), it offers
    :meth:`resample`, which ends a training period: the deltas trained so far are folded into
    the accumulated store, a new channel set is drawn and the optimizer moments of re-targeted
    entries are reset.
    """

    prefix: str = PREFIX
    tuner_layer_cls = TraDyLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self._trady_period: dict[str, int] = {}
        self._trady_costs: dict[str, LayerCost] = {}  # per layer name, from the shape probe
        self._trady_pending: set[str] = set()  # adapters waiting for the probe (or oracle scores) to draw
        self._oracle_scores: dict[str, dict[str, torch.Tensor]] = {}  # Det RGN: full-gradient channel norms
        self._medyate: dict[str, _MeDyateState] = {}
        self._probing = False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # Budgets need per-channel activation sizes: probe them on the first forward pass.
        self._probe_hook = self.model.register_forward_pre_hook(self._probe_on_first_forward, with_kwargs=True)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._probe_hook.remove()  # the returned base model must not call back into this tuner
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        restore(model)  # the plain torch modules again
        return model

    # ------------------------------------------------------------------- target discovery
    def _prepare_adapter_config(self, peft_config: TraDyConfig, model_config: dict) -> TraDyConfig:
        return peft_config  # target_modules=None is resolved in _prepare_model, which sees the model

    def _prepare_model(self, peft_config: TraDyConfig, model: nn.Module) -> None:
        if peft_config.target_modules is not None:
            return
        excluded = set()
        get_output = getattr(model, "get_output_embeddings", None)
        output_emb = get_output() if callable(get_output) else None
        for name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                excluded.update(id(m) for m in head.modules())
        if output_emb is not None:
            excluded.add(id(output_emb))
        saved = set(peft_config.modules_to_save or [])
        names = []
        for name, module in model.named_modules():
            if not isinstance(module, (*SUPPORTED_LAYER_TYPES, TraDyLayer)) or id(module) in excluded:
                continue
            parts = name.split(".")
            if any(".".join(parts[i:j]) in saved for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)):
                continue
            if any(isinstance(m, BaseTunerLayer) for m in _ancestors(model, name)):
                continue
            names.append(name)
        if not names:
            raise ValueError(
                "TraDy found no nn.Linear, nn.Conv1d, nn.Conv2d or Conv1D layer to adapt in this model; "
                "pass target_modules explicitly."
            )
        peft_config.target_modules = set(names)

    # ---------------------------------------------------------------------------- wrapping
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

    def inject_adapter(
        self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None
    ):
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._create_bank(adapter_name)
        if self.peft_config[adapter_name].memory_saving_frozen_path:
            apply_memory_saving(self.model)

    # ----------------------------------------------------------------------------- layers
    def trady_layers(self, adapter_name: str) -> list[tuple[str, TraDyLayer]]:
        """The wrapped layers carrying ``adapter_name``, in module order."""
        return [
            (name, m)
            for name, m in self.model.named_modules()
            if isinstance(m, TraDyLayer) and adapter_name in m.trady_delta
        ]

    def candidate_layers(self, adapter_name: str = "default") -> list[tuple[str, TraDyLayer]]:
        """The layers the adapter's strategy draws from: the ranking's top-K for the top-K
        strategies when a ``layer_ranking`` is set, else every wrapped layer."""
        config = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        if config.strategy not in TOP_K_STRATEGIES or not config.layer_ranking:
            return layers if config.strategy != "medyate" else self._medyate_top_k(adapter_name, layers)
        ranked = config.layer_ranking[: config.top_k] if config.top_k else config.layer_ranking
        chosen = []
        for wanted in ranked:
            match = [(n, m) for n, m in layers if n == wanted or n.endswith("." + wanted)]
            if not match:
                raise ValueError(
                    f"layer_ranking names {wanted!r}, which is not a TraDy layer of this model. Ranked layers must "
                    f"be among the target layers, e.g. {[n for n, _ in layers[:3]]}."
                )
            chosen += [lm for lm in match if lm not in chosen]
        if config.strategy == "medyate" and not config.top_k:
            chosen = self._medyate_top_k(adapter_name, chosen)
        order = {n: i for i, (n, _) in enumerate(layers)}
        return sorted(chosen, key=lambda lm: order[lm[0]])

    def _medyate_top_k(self, adapter_name: str, ranked: list) -> list:
        """MeDyate's K: the fewest ranked layers whose memory M_K gives budget / M_K <= alpha."""
        config = self.peft_config[adapter_name]
        if not all(n in self._trady_costs for n, _ in ranked):
            return ranked  # before the probe: every ranked layer (an upper bound for the bank)
        unit, spent = config.budget.unit, 0
        for k, (name, layer) in enumerate(ranked, start=1):
            cost = self._trady_costs[name].channel_cost(unit, config.optimizer_state_bytes)
            spent += cost * layer.geometry.in_channels
            if config.budget.amount / spent <= config.medyate_alpha:
                return ranked[:k]
        return ranked

    def _capacity(self, adapter_name: str) -> int:
        """Trainable values the adapter's bank holds: exactly what any draw can need, at most.

        For a budget the bound needs no shapes: a draw's weights never cost more than the whole
        budget, so the bank never holds more than the budget's worth of values.
        """
        config = self.peft_config[adapter_name]
        layers = self.candidate_layers(adapter_name)
        if config.inference_mode:
            return 0
        budget = config.budget
        if budget is None:
            return sum(config.channels_for(m.geometry.in_channels) * m.geometry.slice_numel for _, m in layers)
        total = sum(m.geometry.in_channels * m.geometry.slice_numel for _, m in layers)
        per_value = 1 if budget.unit == "values" else PARAM_AND_GRAD_BYTES + config.optimizer_state_bytes
        return min(total, budget.amount // per_value)

    def _use_importance_table(self, adapter_name: str) -> None:
        """Fill ``layer_ranking`` / ``top_k`` from the built-in table of the model's family."""
        config = self.peft_config[adapter_name]
        if config.layer_ranking is not None or config.strategy not in ("trady", "s-top-k-random"):
            return
        found = family_of(self.model)
        entry = builtin_entry(found[0]) if found else None
        layer_names = [n for n, _ in self.trady_layers(adapter_name)]
        present = []
        if entry is not None:
            present = [r for r in entry.ranking if any(n == r or n.endswith("." + r) for n in layer_names)]
        if entry is None or len(present) < len(entry.ranking) / 2:
            what = f"family {found[0]!r}" if found else f"{type(self.model).__name__}"
            logger.warning(
                "TraDy has no importance table for %s: strategy=%r will draw from every target layer (D-Full "
                "Random). Rank this architecture once with `trady-peft rank-layers` (or trady_peft.rank_layers) "
                "and pass layer_ranking=<file>, or set strategy='d-full-random' to silence this.",
                what,
                config.strategy,
            )
            return
        config.layer_ranking = present
        if config.top_k is None:
            config.top_k = min(entry.top_k, len(present))
        logger.info(
            "TraDy uses the %s importance table: top %d of %d layers.", entry.family, config.top_k, len(present)
        )

    def _create_bank(self, adapter_name: str) -> None:
        self._use_importance_table(adapter_name)
        layers = self.trady_layers(adapter_name)
        config = self.peft_config[adapter_name]
        capacity = self._capacity(adapter_name)
        device = layers[0][1].base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        if not hasattr(self, "channel_bank"):
            self.channel_bank = nn.ModuleDict()
        bank = DeltaBank(adapter_name, capacity, device, layers[0][1].delta_dtype)
        if not config.init_weights:
            with torch.no_grad():
                bank.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(config.seed))
        self.channel_bank[adapter_name] = bank
        bank.weight.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
        self._trady_period[adapter_name] = 0
        if config.inference_mode:
            return
        if config.strategy == "medyate":
            self._medyate[adapter_name] = _MeDyateState(self, adapter_name)
        if not self._ready(adapter_name):
            self._trady_pending.add(adapter_name)  # drawn after the probe (and, for oracles, the scoring)
            return
        self._install(adapter_name, self._draw(adapter_name, 0))

    def _ready(self, adapter_name: str) -> bool:
        config = self.peft_config[adapter_name]
        if config.budget is not None and not self._has_costs(adapter_name):
            return False
        return config.strategy not in ORACLE_STRATEGIES or adapter_name in self._oracle_scores

    # ----------------------------------------------------------------------- costs
    def _has_costs(self, adapter_name: str) -> bool:
        return all(name in self._trady_costs for name, _ in self.candidate_layers(adapter_name))

    def probe(self, example_inputs) -> None:
        """Measure each target layer's input size on ``example_inputs`` (one forward, no grad)
        and draw the selection of adapters that were waiting for it.

        Called automatically on the first forward pass when a ``memory_budget`` is set; call
        it yourself to draw earlier. In byte budgets, the batch size and dtype of
        ``example_inputs`` are the ones accounted for.
        """
        self._probing = True
        try:
            layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TraDyLayer)]
            shapes = probe_input_shapes(self.model, example_inputs, layers)
        finally:
            self._probing = False
        for name, layer in layers:
            if name in shapes:
                self._trady_costs[name] = layer_cost(name, layer.geometry, *shapes[name])
        self._draw_pending(after_probe=True)

    def _draw_pending(self, after_probe: bool = False) -> None:
        """Draw for adapters that were waiting and now can; before a probe, simply keep waiting."""
        for adapter_name in sorted(self._trady_pending):
            missing = [n for n, _ in self.candidate_layers(adapter_name) if n not in self._trady_costs]
            if missing and not after_probe:
                continue
            if missing:
                raise RuntimeError(
                    f"The probe forward pass did not reach the TraDy layers {missing[:5]}; their input size is "
                    "unknown. Pass inputs that run the whole model, or leave those layers out of target_modules."
                )
            if not self._ready(adapter_name):
                continue
            self._install(adapter_name, self._draw(adapter_name, self._trady_period[adapter_name]))
            self._trady_pending.discard(adapter_name)

    def _probe_on_first_forward(self, module, args, kwargs):
        # Only a training forward (gradients on) tells the real batch: an evaluation pass under
        # no_grad before training must not fix the byte accounting to its batch size.
        if self._trady_pending and not self._probing and torch.is_grad_enabled() and not self._has_costs_for_all():
            self.probe(kwargs if not args else (args if not kwargs else _Call(args, kwargs)))

    def priced_layers(self, adapter_name: str = "default") -> list[PricedLayer]:
        """Candidate layers with their per-channel cost in the budget's unit (needs the probe)."""
        config = self.peft_config[adapter_name]
        unit = config.budget.unit
        return [
            PricedLayer(
                n, m.geometry.in_channels, self._trady_costs[n].channel_cost(unit, config.optimizer_state_bytes)
            )
            for n, m in self.candidate_layers(adapter_name)
        ]

    def _check_budget(self, adapter_name: str, priced: list[PricedLayer]) -> None:
        budget = self.peft_config[adapter_name].budget
        cheapest = min(p.channel_cost for p in priced)
        whole = sum(p.channel_cost * p.in_channels for p in priced)
        if budget.amount < cheapest:
            raise ValueError(
                f"memory_budget={self.peft_config[adapter_name].memory_budget!r} ({budget}) is too small for a single "
                f"channel: the cheapest candidate channel costs {cheapest:,} {budget.unit}. Raise the budget."
            )
        if budget.amount >= whole:
            raise ValueError(
                f"memory_budget={self.peft_config[adapter_name].memory_budget!r} ({budget}) covers every candidate "
                f"channel ({whole:,} {budget.unit}): nothing would be left out. Use a smaller budget, or full "
                "fine-tuning."
            )

    def _draw(self, adapter_name: str, period: int) -> dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        effective_period = period if config.redraws else 0
        if config.budget is None:
            candidates = [
                Candidate(n, m.geometry.in_channels, config.channels_for(m.geometry.in_channels))
                for n, m in self.candidate_layers(adapter_name)
            ]
            return draw_per_layer(candidates, config.seed, effective_period)
        priced = self.priced_layers(adapter_name)
        self._check_budget(adapter_name, priced)
        budget = config.budget.amount
        if config.strategy in ORACLE_STRATEGIES:
            norms = self._oracle_scores.get(adapter_name)
            if norms is None:
                raise RuntimeError(
                    f"strategy={config.strategy!r} needs channel scores: call "
                    "model.base_model.score_channels(batches) before resample(), or train with TraDyCallback."
                )
            rgn = [norms[p.name] / p.channel_cost for p in priced]  # TraDy Eq. 7
            return greedy_under_budget(priced, rgn, budget)
        if config.strategy == "medyate" and self._medyate[adapter_name].has_history:
            weights = self._medyate[adapter_name].weights([p.name for p in priced])
            return draw_weighted_under_budget(priced, weights, budget, config.seed, effective_period)
        return draw_under_budget(priced, budget, config.seed, effective_period)

    # --------------------------------------------------------------- gradient statistics
    def score_channels(self, batches, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Det-RGN oracle: the full-gradient norm of every input channel of the candidate layers.

        Runs forward and backward on ``batches`` (dicts of model inputs with labels, or
        tensors) with the candidate layers' dense base weights temporarily trainable, and
        keeps ``||dL/dW[:, c]||_2`` of the gradient summed over the batches. This needs the
        dense gradients the budget is meant to avoid: it is the paper's upper-bound baseline,
        not something to deploy. Returns and stores the norms per layer.
        """
        names = [adapter_name] if adapter_name else list(self.active_adapters)
        layers = {n: m for name in names for n, m in self.candidate_layers(name)}
        flags = {n: m.base_layer.weight.requires_grad for n, m in layers.items()}
        # Set every existing gradient aside (backward would add into it) and put it back after.
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.channel_bank.parameters())
        saved_grads = {id(p): (p, p.grad) for p in params}
        for p in params:
            p.grad = None
        for m in layers.values():
            m.base_layer.weight.requires_grad_(True)
        try:
            for batch in batches:
                if self._trady_pending and not self._has_costs_for_all():
                    self.probe(batch)
                with torch.enable_grad():
                    required_loss(_call(self.model, batch), "Scoring channels").backward()
            norms = {}
            for n, m in layers.items():
                grad = m.base_layer.weight.grad
                if grad is None:
                    raise RuntimeError(f"Layer {n!r} received no gradient from the scoring batches.")
                channels = torch.arange(m.geometry.in_channels, device=grad.device)
                slices = m.geometry.read_slices(grad, channels)
                norms[n] = slices.reshape(slices.shape[0], -1).double().norm(dim=1).cpu()
        finally:
            for n, m in layers.items():
                m.base_layer.weight.grad = None
                m.base_layer.weight.requires_grad_(flags[n])
            for p, grad in saved_grads.values():
                p.grad = grad
        _all_reduce_mean(norms)
        for name in names:
            self._oracle_scores[name] = {n: norms[n] for n, _ in self.candidate_layers(name)}
        self._draw_pending()
        return norms

    def _has_costs_for_all(self) -> bool:
        return all(self._has_costs(name) for name in self._trady_pending)

    def selected_cost(self, adapter_name: str = "default") -> int:
        """Cost of the current selection in the budget's unit (needs a budget and the probe)."""
        unit_cost = {p.name: p.channel_cost for p in self.priced_layers(adapter_name)}
        return sum(unit_cost[n] * m.trady_delta[adapter_name].count for n, m in self.candidate_layers(adapter_name))

    def _install(self, adapter_name: str, selection: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """Install ``selection`` and return the bank segments whose meaning changed."""
        bank = self.channel_bank[adapter_name]
        offset, changed = 0, []
        for name, layer in self.trady_layers(adapter_name):
            channels = selection.get(name, torch.zeros(0, dtype=torch.long))
            view = layer.trady_delta[adapter_name]
            n = channels.numel() * layer.geometry.slice_numel
            old = layer.trady_idx[adapter_name]
            same = (
                view.offset == offset
                and old.numel() == channels.numel()
                and torch.equal(old.long().cpu(), channels.long().cpu())
            )
            if not same and n:
                changed.append((offset, offset + n))
            layer.install_channels(adapter_name, channels, bank, offset)
            offset += n
        if offset > bank.weight.numel():
            raise RuntimeError(
                f"Internal error: the selection needs {offset} trainable values but the bank of adapter "
                f"{adapter_name!r} holds {bank.weight.numel()}."
            )
        return changed

    # ---------------------------------------------------------------------------- periods
    def period(self, adapter_name: str = "default") -> int:
        """Index of the current training period (0 before the first resample)."""
        return self._trady_period[adapter_name]

    @torch.no_grad()
    def resample(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        adapter_name: str | None = None,
        period: int | None = None,
    ) -> int:
        """End the current period and start the next one.

        1. fold the deltas trained this period into each layer's accumulated store;
        2. draw the channels of the next period (a pure function of seed and period);
        3. zero the bank in place (same parameter object, so the optimizer keeps tracking it);
        4. reset ``optimizer``'s state (Adam moments, momentum) for the bank entries whose
           channel changed.

        Args:
            optimizer: the optimizer training the adapter, if its state must be reset.
            adapter_name: the adapter to resample (default: every active adapter).
            period: the period to draw (default: the current one + 1). Resuming passes it.

        Returns:
            The new period index.
        """
        names = [adapter_name] if adapter_name else list(self.active_adapters)
        new_period = None
        for name in names:
            for _, layer in self.trady_layers(name):
                layer.commit(name)
            new_period = self._trady_period[name] + 1 if period is None else period
            self._trady_period[name] = new_period
            if name in self._medyate:
                self._medyate[name].end_period()
            if name in self._trady_pending or self.peft_config[name].inference_mode:
                continue  # drawn once the probe has run
            changed = self._install(name, self._draw(name, new_period))
            bank = self.channel_bank[name].weight
            bank.zero_()
            if optimizer is not None:
                reset_optimizer_state(optimizer, bank, changed)
        return new_period

    def selection_summary(self, adapter_name: str = "default") -> dict[str, int]:
        """Counts for logs: layers, channels selected now, channels touched so far, bank size."""
        layers = self.trady_layers(adapter_name)
        summary = {
            "period": self._trady_period[adapter_name],
            "layers": len(layers),
            "candidate_layers": len(self.candidate_layers(adapter_name)),
            "selected_channels": sum(layer.trady_delta[adapter_name].count for _, layer in layers),
            "touched_channels": sum(layer.touched_channels(adapter_name) for _, layer in layers),
            "total_channels": sum(layer.geometry.in_channels for _, layer in layers),
            "trainable_values": self.channel_bank[adapter_name].weight.numel(),
        }
        config = self.peft_config[adapter_name]
        if config.budget is not None and adapter_name not in self._trady_pending:
            summary["budget"] = config.budget.amount
            summary["selected_cost"] = self.selected_cost(adapter_name)
        return summary

    # ------------------------------------------------------------------ adapter housekeeping
    def _sync_bank_requires_grad(self, active: list[str], inference_mode: bool = False) -> None:
        for name, bank in getattr(self, "channel_bank", {}).items():
            bank.weight.requires_grad_(name in active and not inference_mode)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_bank_requires_grad(self.active_adapters, inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name in getattr(self, "channel_bank", {}):
                self.channel_bank[name].weight.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in getattr(self, "channel_bank", {}):
            del self.channel_bank[adapter_name]
        self._trady_period.pop(adapter_name, None)
        self._trady_pending.discard(adapter_name)
        self._oracle_scores.pop(adapter_name, None)
        medyate = self._medyate.pop(adapter_name, None)
        if medyate is not None:
            medyate.hook.remove()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._sync_bank_requires_grad(self.active_adapters)

    # ----------------------------------------------------------------------- saving
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

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save ``(indices, values)`` per layer with the current period folded in; never the bank."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        out = {k: v for k, v in out.items() if ".channel_bank." not in f".{k}"}  # runtime state only
        for name, module in model.named_modules():
            if not isinstance(module, TraDyLayer) or adapter_name not in module.trady_delta:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            key_idx = f"{name}.trady_indices.{adapter_name}"
            key_val = f"{name}.trady_values.{adapter_name}"
            if key_idx not in out:
                if module.current_delta(adapter_name) is not None:
                    raise RuntimeError(
                        f"Could not find {key_idx!r} in the state dict being saved; refusing to save an adapter "
                        "that would silently drop the current period's delta."
                    )
                continue
            indices, values = module.fold(adapter_name)
            out[key_idx], out[key_val] = indices.to(torch.int32), values
        return out


def reset_optimizer_state(optimizer, parameter: torch.Tensor, segments: list[tuple[int, int]]) -> int:
    """Zero the per-entry optimizer state (moments, momentum) of ``parameter`` in ``segments``.

    Works with torch optimizers and accelerate's ``AcceleratedOptimizer`` (its ``.state`` proxies
    the real one). Returns the number of state tensors touched.
    """
    state = optimizer.state.get(parameter) if hasattr(optimizer, "state") else None
    if not state or not segments:
        return 0
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            for start, stop in segments:
                value[start:stop].zero_()
            touched += 1
    return touched


class _MeDyateState:
    """MeDyate's channel statistics N (MeDyate Alg. 1).

    During a period, a hook on the bank adds each backward's per-channel gradient norm of the
    selected channels. At the period's end, the mean norm of each selected channel is written
    into N; after the first period, channels never selected get the largest value seen (to
    explore them), and keep it until they are selected.
    """

    def __init__(self, tuner: TraDyModel, adapter_name: str):
        self.tuner, self.adapter_name = tuner, adapter_name
        self.norms: dict[str, torch.Tensor] = {}  # N, per layer
        self.seen: dict[str, torch.Tensor] = {}
        self.period_sum: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.has_history = False
        self.layers = tuner.trady_layers(adapter_name)
        bank = tuner.channel_bank[adapter_name].weight
        trains = bank.requires_grad
        bank.requires_grad_(True)  # a tensor hook can only be registered on a tensor that requires grad
        self.hook = bank.register_hook(self._on_grad)
        bank.requires_grad_(trains)

    def _on_grad(self, grad: torch.Tensor) -> None:
        for name, layer in self.layers:
            view = layer.trady_delta[self.adapter_name]
            if not view.count:
                continue
            seg = grad.narrow(0, view.offset, view.numel).view(view.count, -1).detach()
            # Accumulated where the gradient lives: no host sync per layer and step.
            total = self.period_sum.get(name)
            if total is None:
                total = self.period_sum[name] = grad.new_zeros(layer.geometry.in_channels, dtype=torch.float64)
            total.index_add_(0, layer.trady_idx[self.adapter_name].long(), seg.double().norm(dim=1))
        self.steps += 1

    def end_period(self) -> None:
        if not self.steps:
            return
        # One flat tensor over every layer (zeros where nothing trained) keeps the collective
        # identical on all ranks, whatever each rank saw.
        flat = {
            "all": torch.cat(
                [
                    self.period_sum[n].cpu()
                    if n in self.period_sum
                    else torch.zeros(m.geometry.in_channels, dtype=torch.float64)
                    for n, m in self.layers
                ]
            )
        }
        _all_reduce_mean(flat)
        sizes = [m.geometry.in_channels for _, m in self.layers]
        self.period_sum = {n: t for (n, _), t in zip(self.layers, torch.split(flat["all"], sizes))}
        for name, layer in self.layers:
            channels = layer.trady_idx[self.adapter_name].long().cpu()
            c = layer.geometry.in_channels
            norms = self.norms.setdefault(name, torch.zeros(c, dtype=torch.float64))
            seen = self.seen.setdefault(name, torch.zeros(c, dtype=torch.bool))
            if name in self.period_sum and channels.numel():
                norms[channels] = self.period_sum[name][channels] / self.steps
                seen[channels] = True
        if not self.has_history:  # end of the first period: unexplored channels get the max
            top = max(
                (float(n[s].max()) for n, s in zip(self.norms.values(), self.seen.values()) if s.any()), default=1.0
            )
            for name in self.norms:
                self.norms[name][~self.seen[name]] = top
            self.has_history = True
        self.period_sum, self.steps = {}, 0

    def weights(self, names: list[str]) -> list[torch.Tensor]:
        return [self.norms[n] for n in names]


def _all_reduce_mean(tensors: dict[str, torch.Tensor]) -> None:
    """Average statistics over the processes of a distributed run, so that all ranks draw alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for key in sorted(tensors):
        t = tensors[key]
        work = t.to(torch.float64)
        dist.all_reduce(work)
        t.copy_(work / dist.get_world_size())


class _Call:
    """Positional and keyword arguments of one forward call, for the probe."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


def _ancestors(model: nn.Module, name: str):
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        yield module
