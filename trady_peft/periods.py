"""What a period does: prices, draws, redraws, and the moves from one period to the next.

`PeriodLifecycle` is the part of `TraDyModel` that owns each adapter's selection lifecycle
(`trady_peft.state`): which layers are candidates, what one of their channels costs (the shape
probe, re-run when a larger input arrives), drawing a period's channels with the adapter's
strategy (`trady_peft.strategies`), installing them on the bank, and `advance`, the one way to
move to another period (used by `TraDyCallback` and `next_period`).
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch
from accelerate.utils import send_to_device

from .budget import Budget, bank_capacity, bytes_per_trained_value, draw_limits, layer_cost, probe_input_shapes
from .compat import has_zero_master, in_backward, tensor_leaves
from .config import TraDyConfig
from .distributed import bank_numel, gathered, zero_bank
from .importance import builtin_entry, family_of
from .layer import TraDyLayer
from .optim import reset_optimizer_state
from .scoring import all_reduce_max_costs, any_rank, full_gradient_norms
from .selection import Candidate, PricedLayer
from .state import Phase
from .strategies import alpha_top_k, get_strategy
from .targets import depth_blocks, names_match

logger = logging.getLogger(__name__)
#: A period with fewer channels than this gets a warning with the numbers.
FEW_CHANNELS = 4


class PeriodLifecycle:
    """Mixin of `TraDyModel`: every adapter's periods (see the module docstring)."""

    def _use_importance_table(self, name: str) -> None:
        """Fill ``layer_ranking`` (and ``top_k``) from the built-in table of the model's family."""
        config = self.peft_config[name]
        if config.layer_ranking is not None or get_strategy(config.strategy).layers == "all":
            return
        found = family_of(self.model)
        entry = builtin_entry(found[0]) if found else None
        names = [n for n, _ in self.trady_layers(name)]
        present = [r for r in entry.ranking if any(names_match(n, r) for n in names)] if entry else []
        if entry is None or len(present) < len(entry.ranking) / 2:
            medyate = config.strategy == "medyate"
            fallback = "rank layers by module order" if medyate else "draw from every target layer (D-Full Random)"
            logger.warning(
                "TraDy has no importance table for %s: strategy=%r will %s. Rank this architecture "
                "once with `trady-peft rank-layers` (or trady_peft.rank_layers) and pass layer_ranking=<file>%s.",
                f"family {found[0]!r}" if found else type(self.model).__name__,
                config.strategy,
                fallback,
                "" if medyate else ", or set strategy='d-full-random' to silence this",
            )
            return
        config.layer_ranking = present
        if config.top_k is None and config.strategy != "medyate":  # MeDyate's K comes from its alpha rule
            config.top_k = min(entry.top_k, len(present))
        logger.info("TraDy uses the %s importance table (%d ranked layers).", entry.family, len(present))

    def candidate_layers(self, adapter_name: str = "default") -> list[tuple[str, TraDyLayer]]:
        """The layers the adapter's strategy draws from, in module order: the ranking's top-K (or,
        for MeDyate, the ranked layers its alpha rule keeps), else every wrapped layer."""
        config = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        kind = get_strategy(config.strategy).layers
        if kind == "all" or (not config.layer_ranking and kind == "top-k"):
            return self._within_depth(adapter_name, layers, layers)
        ranked = layers
        if config.layer_ranking:
            ranking = config.layer_ranking[: config.top_k] if config.top_k else config.layer_ranking
            ranked = []
            for wanted in ranking:
                match = [(n, m) for n, m in layers if names_match(n, wanted)]
                if not match:
                    raise ValueError(
                        f"layer_ranking names {wanted!r}, which is not a TraDy layer of this model. Ranked layers "
                        f"must be among the target layers, e.g. {[n for n, _ in layers[:3]]}."
                    )
                ranked += [lm for lm in match if lm not in ranked]
        ranked = self._within_depth(adapter_name, layers, ranked)
        state = self.selection_states.get(adapter_name)
        costs = state.costs if state is not None else {}
        if kind == "alpha" and not config.top_k and all(n in costs for n, _ in ranked):
            unit, opt = config.budget.unit, config.optimizer_state_bytes
            memory = [costs[n].channel_cost(unit, opt) * m.geometry.in_channels for n, m in ranked]
            ranked = ranked[: alpha_top_k(memory, config.budget.amount, config.medyate_alpha)]
        order = {n: i for i, (n, _) in enumerate(layers)}
        return sorted(ranked, key=lambda lm: order[lm[0]])

    def _within_depth(self, adapter_name: str, layers: list, candidates: list) -> list:
        """``candidates`` restricted to the ``max_depth`` blocks of ``layers`` nearest the output."""
        depth = self.peft_config[adapter_name].max_depth
        if depth is None:
            return candidates
        blocks = depth_blocks([n for n, _ in layers])
        allowed = {n for block in blocks[-depth:] for n in block}
        kept = [(n, m) for n, m in candidates if n in allowed]
        if not kept:
            raise ValueError(
                f"max_depth={depth} leaves no candidate layer: the {depth} block(s) nearest the output "
                f"({blocks[-1][0]!r}, ...) hold none of the layers the strategy draws from "
                f"(e.g. {[n for n, _ in candidates[:3]]}). Raise max_depth, or pass None."
            )
        return kept

    def _capacity(self, name: str) -> int:
        """Trainable values the bank holds: never more than any draw can use, nor than the budget allows."""
        config = self.peft_config[name]
        layers = self.candidate_layers(name)  # before the probe: an upper bound
        if config.budget is None:
            return sum(config.channels_for(m.geometry.in_channels) * m.geometry.slice_numel for _, m in layers)
        total = sum(m.geometry.in_channels * m.geometry.slice_numel for _, m in layers)
        return bank_capacity(config.budget, total, config.optimizer_state_bytes, config.bank_share)

    # ------------------------------------------------------------------------ prices, probe
    def priced_layers(self, adapter_name: str = "default") -> list[PricedLayer]:
        """Candidate layers with what one channel spends of each part of the budget (needs the probe)."""
        unit, costs = self.peft_config[adapter_name].budget.unit, self.selection_states[adapter_name].costs
        priced = []
        for n, m in self.candidate_layers(adapter_name):
            price = costs[n].draw_price(unit)
            priced.append(PricedLayer(n, m.geometry.in_channels, price if len(price) > 1 else price[0]))
        return priced

    def probe(self, example_inputs) -> None:
        """Measure each target layer's input on ``example_inputs`` (one forward, no grad) and draw
        (or redraw) the adapters whose prices changed.

        Runs automatically on the first training forward and whenever a training batch has a
        larger input than any seen before (a longer sequence, a bigger batch), so that the byte
        budget stays a bound. Call it with your largest batch to price for it from the start.
        """
        self._probing = True
        layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TraDyLayer)]
        modes = {m: m.training for m in self.model.modules()}
        device = next(self.model.parameters()).device
        try:
            # Shapes only: no dropout draw, no batch-norm statistics, no trace in the random streams.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.model.eval()
                shapes = probe_input_shapes(self.model, example_inputs, layers)
        finally:
            for m, training in modes.items():
                m.training = training
            self._probing = False
        measured = {}
        for name, layer in layers:
            if name in shapes:
                cost = layer_cost(name, layer.geometry, *shapes[name])
                old = self.layer_costs.get(name)
                measured[name] = cost if old is None else old.larger(cost)
        # Every process prices alike (the largest input of any rank), so that all draw alike.
        self.layer_costs.update(all_reduce_max_costs(measured))
        for adapter in sorted(self.selection_states):
            state = self.selection_states[adapter]
            if self.peft_config[adapter].inference_mode or self.peft_config[adapter].budget is None:
                continue
            missing = [n for n, _ in self.candidate_layers(adapter) if n not in self.layer_costs]
            if missing:
                raise RuntimeError(
                    f"The probe forward pass did not reach the TraDy layers {missing[:5]}; their input size is "
                    "unknown. Pass inputs that run the whole model, or leave those layers out of target_modules."
                )
            for n, _ in self.candidate_layers(adapter):
                old = state.costs.get(n)
                state.costs[n] = self.layer_costs[n] if old is None else old.larger(self.layer_costs[n])
            if state.selection is None:
                self._draw_if_ready(adapter)
            elif not self._fits(adapter, state.selection):
                logger.warning(
                    "TraDy: a larger training input than any before arrived; adapter %r redraws period %d under "
                    "the new prices so that its footprint stays within memory_budget=%r.",
                    adapter,
                    state.period,
                    self.peft_config[adapter].memory_budget,
                )
                self._start_period(adapter, state.period, redraw=True)

    def _before_forward(self, module, args, kwargs):
        self._forward_depth += 1
        if self._forward_depth == 1:
            self._backprop_stop.before_forward()
        if self._probing or not torch.is_grad_enabled():
            return  # evaluation under no_grad must not fix the byte accounting to its batch
        if module.training and not self._placement_checked:
            self._check_placement("at the first training forward")
            self._placement_checked = True
        budgeted = [n for n, c in self.peft_config.items() if c.budget is not None and not c.inference_mode]
        if not budgeted:
            return
        waiting = any(not self.selection_states[n].costs for n in budgeted if n in self.selection_states)
        dims = _input_dims(args, kwargs)
        # A larger input than any before reprices, in training mode only (a grad-enabled
        # evaluation pass must not shrink the run's selection); the first forward always prices.
        grew = module.training and any(
            key not in self._input_dims or _larger(d, self._input_dims[key]) for key, d in dims.items()
        )
        if any_rank(waiting or grew):
            for key, d in dims.items():
                old = self._input_dims.get(key, d)
                self._input_dims[key] = tuple(max(a, b) for a, b in zip(d, old)) if len(d) == len(old) else d
            self.probe(kwargs if not args else (args if not kwargs else _Call(args, kwargs)))

    def _after_forward(self, module, args, output):
        self._forward_depth -= 1

    # ------------------------------------------------------------------------------ periods
    def period(self, adapter_name: str = "default") -> int:
        """Index of the current training period (0 before the first redraw)."""
        return self.selection_states[adapter_name].period

    def phase(self, adapter_name: str = "default") -> Phase:
        """Where the adapter stands: waiting for shapes, waiting for scores, ready, or drawn."""
        state, config = self.selection_states[adapter_name], self.peft_config[adapter_name]
        needs_costs = [n for n, _ in self.candidate_layers(adapter_name)] if config.budget is not None else []
        return state.phase(needs_costs, get_strategy(config.strategy).scores_due(state.period, state.scored_period))

    def advance(self, period=None, optimizer=None, batches=None, adapter_name: str | None = None) -> int:
        """Move to ``period`` (default: the next one); the one way TraDy's periods change.

        1. fold the deltas trained so far into each layer's accumulated store;
        2. for the Det-RGN oracles, score channels on up to ``gradient_batches`` of ``batches``;
        3. draw the period's channels (a pure function of the selection state) and install them;
        4. zero the bank in place (same parameter object, so the optimizer keeps tracking it) and
           reset ``optimizer``'s state for the entries whose channel changed, so that they train
           as under a freshly created optimizer.

        Args:
            period: the period to move to (a resumed run passes the one it resumes in).
            optimizer: the optimizer training the adapter (it must hold the bank).
            batches: training batches, for the strategies that score channels.
            adapter_name: the adapter (default: every active adapter).

        Returns:
            The new period index.
        """
        if self._forward_depth or in_backward():
            raise RuntimeError(
                "next_period / advance was called inside a forward or backward pass; the channels of a period "
                "must not change while autograd holds their inputs. Call it between optimizer steps."
            )
        self._check_placement("at a period change")
        new_period = None
        for name in [adapter_name] if adapter_name else list(self.active_adapters):
            config, state = self.peft_config[name], self.selection_states[name]
            new_period = state.period + 1 if period is None else period
            if optimizer is not None:
                self.attach_optimizer(optimizer, name)
            strategy = get_strategy(config.strategy)
            if not config.inference_mode and strategy.scores_due(new_period, state.scored_period):
                if batches is None:
                    raise ValueError(
                        f"strategy={config.strategy!r} scores channels on data: pass batches=train_loader."
                    )
                self.score_channels(itertools.islice(batches, config.gradient_batches), name, new_period)
            if config.inference_mode:
                state.period = new_period
                continue
            self._start_period(name, new_period, optimizer=optimizer)
        return new_period

    def resample(self, optimizer=None, adapter_name: str | None = None, period: int | None = None) -> int:
        """End the current period and start the next (``advance`` without batches)."""
        return self.advance(period=period, optimizer=optimizer, adapter_name=adapter_name)

    def _start_period(self, name: str, period: int, optimizer=None, redraw: bool = False) -> None:
        state = self.selection_states[name]
        with gathered(self.channel_bank[name].weight):  # ZeRO-3: the whole bank, on every rank
            for _, layer in self.trady_layers(name):
                layer.commit(name)
        if state.statistics is not None and not redraw and state.selection is not None:
            state.statistics.end_period(state.selection)
        state.period, state.selection = period, None
        zero_bank(self.channel_bank[name].weight)  # and DeepSpeed's master copy
        self._draw_if_ready(name, optimizer)

    def _draw_if_ready(self, name: str, optimizer=None) -> None:
        if self.phase(name) is not Phase.READY:
            return  # drawn once the probe (and, for the oracles, the scoring) has run
        state, config = self.selection_states[name], self.peft_config[name]
        selection = self._draw(name, state.period)
        changed = self._install(name, selection)
        state.selection = selection
        bank = self.channel_bank[name].weight
        optimizer = optimizer or (self._optimizer() if self._optimizer else None)
        if optimizer is not None:
            reset_optimizer_state(optimizer, bank, changed)
        elif changed and bank.grad is not None and not self._warned_stale:
            self._warned_stale = True  # trained, redrawn, and no optimizer to reset
            logger.warning(
                "TraDy redrew adapter %r's channels without an optimizer to reset: re-targeted entries keep the "
                "moments of their previous channel. Pass the optimizer to next_period (or call "
                "model.base_model.attach_optimizer(optimizer) once).",
                name,
            )
        if bank.grad is not None:  # gradient accumulated under the old layout (a redraw between micro-batches)
            for start, stop in changed:
                bank.grad[start:stop].zero_()
        count = sum(t.numel() for t in selection.values())
        if count < FEW_CHANNELS:
            logger.warning(
                "TraDy period %d of adapter %r trains only %d input channel(s) (budget use %s). memory_budget=%r "
                "barely holds a channel; raise it (or bank_share) for a useful period.",
                state.period,
                name,
                count,
                self.selection_summary(name).get("budget_used"),
                config.memory_budget,
            )

    def _draw(self, name: str, period: int) -> dict[str, torch.Tensor]:
        config, state = self.peft_config[name], self.selection_states[name]
        strategy, layers = get_strategy(config.strategy), self.candidate_layers(name)
        if config.budget is None:
            candidates = [
                Candidate(n, m.geometry.in_channels, config.channels_for(m.geometry.in_channels)) for n, m in layers
            ]
            return strategy.select(candidates, None, config.seed, period)
        priced = self.priced_layers(name)
        limits = draw_limits(config.budget, bank_numel(self.channel_bank[name].weight), config.optimizer_state_bytes)
        _check_budget(config, priced, limits)
        norms = state.statistics.weights([p.name for p in priced]) if state.statistics else None
        total = [state.costs[p.name].channel_cost(config.budget.unit, config.optimizer_state_bytes) for p in priced]
        return strategy.select(priced, limits, config.seed, period, scores=state.scores, norms=norms, total_cost=total)

    def _fits(self, name: str, selection: dict[str, torch.Tensor]) -> bool:
        config, costs = self.peft_config[name], self.selection_states[name].costs
        limits = draw_limits(config.budget, bank_numel(self.channel_bank[name].weight), config.optimizer_state_bytes)
        spent = [0] * len(limits)
        for n, channels in selection.items():
            for i, part in enumerate(costs[n].draw_price(config.budget.unit)):
                spent[i] += part * channels.numel()
        return all(s <= limit for s, limit in zip(spent, limits))

    def _install(self, name: str, selection: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """Install ``selection`` and return the bank segments whose meaning changed."""
        bank = self.channel_bank[name]
        offset, changed, segments = 0, [], []
        for layer_name, layer in self.trady_layers(name):
            channels = selection.get(layer_name, torch.zeros(0, dtype=torch.long))
            view, old = layer.trady_delta[name], layer.trady_idx[name]
            n = channels.numel() * layer.geometry.slice_numel
            same = view.offset == offset and torch.equal(old.long().cpu(), channels.long().cpu())
            if not same and n:
                changed.append((offset, offset + n))
            layer.install_channels(name, channels, bank, offset)
            segments.append((offset, n))
            offset += n
        if offset > bank_numel(bank.weight):
            raise RuntimeError(
                f"Internal error: the selection needs {offset} trainable values but the bank of adapter {name!r} "
                f"holds {bank_numel(bank.weight)}."
            )
        bank.set_layout(segments)
        return changed

    def attach_optimizer(self, optimizer, name: str = "default") -> None:
        """Check that ``optimizer`` trains the adapter's bank and remember it for mid-period redraws."""
        bank = self.channel_bank[name].weight
        groups = getattr(optimizer, "param_groups", None)
        deepspeed = has_zero_master(bank)  # DeepSpeed's groups hold flat partitions, not the bank
        if (
            groups is not None
            and not deepspeed
            and bank.numel()
            and not any(p is bank for g in groups for p in g["params"])
        ):
            raise ValueError(
                f"The optimizer given to next_period/advance ({type(optimizer).__name__}) does not hold adapter "
                f"{name!r}'s trainable bank, so the adapter would never train. Build the optimizer after "
                "get_peft_model from model.parameters() (or pass the one that trains the model)."
            )
        self._optimizer = weakref.ref(optimizer)

    # ------------------------------------------------------------------ gradient statistics
    def score_channels(self, batches, adapter_name: str | None = None, period: int | None = None) -> dict:
        """Det-RGN oracle: the full-gradient norm of every input channel of the candidate layers.

        Runs forward and backward on ``batches`` (dicts of model inputs with labels, or tensors)
        with the candidate layers' dense base weights temporarily trainable, and stores
        ``||dL/dW[:, c]||_2`` for the draw of ``period`` (default: the adapter's next draw). This
        needs the dense gradients the budget is meant to avoid: it is the paper's upper-bound
        baseline, not something to deploy. Returns the norms per layer.
        """
        names = [adapter_name] if adapter_name else list(self.active_adapters)
        device = self.channel_bank[names[0]].weight.device
        layers = {n: m for name in names for n, m in self.candidate_layers(name)}
        # Scoring must not move the training's random streams (data order, dropout): a resumed
        # run, which does not rescore, would otherwise diverge from the uninterrupted one.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            batches = [send_to_device(b, device) for b in batches]  # dicts, BatchEncoding, tuples
            norms = full_gradient_norms(self.model, layers, batches, self.channel_bank.parameters())
        for name in names:
            state = self.selection_states[name]
            state.scores = {n: norms[n] for n, _ in self.candidate_layers(name)}
            drawn = state.selection is not None
            state.scored_period = period if period is not None else state.period + int(drawn)
            if not drawn:
                self._draw_if_ready(name)
        return norms

    def _record_norms(self, name: str, grad: torch.Tensor) -> None:
        statistics = self.selection_states[name].statistics
        for layer_name, layer in self.trady_layers(name):
            view = layer.trady_delta[name]
            if view.count:
                seg = grad.narrow(0, view.offset, view.numel).view(view.count, -1).detach()
                statistics.add(layer_name, layer.trady_idx[name], seg.double().norm(dim=1))
        statistics.step()

    # ------------------------------------------------------------------------------ summary
    def selected_cost(self, adapter_name: str = "default") -> int:
        """What the current selection spends of the budget, in its unit. In bytes: the whole bank
        (parameter, gradient and optimizer state, a fixed cost) plus the selected channels' saved inputs."""
        config, state = self.peft_config[adapter_name], self.selection_states[adapter_name]
        selection = state.selection or {}
        if config.budget.unit == "values":
            return sum(state.costs[n].channel_cost("values") * c.numel() for n, c in selection.items())
        bank = bank_numel(self.channel_bank[adapter_name].weight) * bytes_per_trained_value(
            config.optimizer_state_bytes
        )
        return bank + sum(state.costs[n].saved_bytes * c.numel() for n, c in selection.items())

    def priced_inputs(self, adapter_name: str = "default") -> dict[str, int]:
        """Bytes of saved inputs the budget charges for the current selection, per layer (for a
        comparison with what autograd really keeps, e.g. `measure_training_step().saved_by_module`)."""
        state = self.selection_states[adapter_name]
        costs = {**self.layer_costs, **state.costs}  # without a budget: the probe's measurement
        return {n: costs[n].saved_bytes * c.numel() for n, c in (state.selection or {}).items() if c.numel()}

    def selection_summary(self, adapter_name: str = "default") -> dict:
        """Figures for logs: period, layers, channels selected now and touched so far, budget use."""
        layers = self.trady_layers(adapter_name)
        summary = {
            "period": self.selection_states[adapter_name].period,
            "layers": len(layers),
            "candidate_layers": len(self.candidate_layers(adapter_name)),
            "selected_channels": sum(layer.trady_delta[adapter_name].count for _, layer in layers),
            "touched_channels": sum(layer.touched_channels(adapter_name) for _, layer in layers),
            "total_channels": sum(layer.geometry.in_channels for _, layer in layers),
            "trainable_values": bank_numel(self.channel_bank[adapter_name].weight),
        }
        budget: Budget | None = self.peft_config[adapter_name].budget
        if budget is not None and self.selection_states[adapter_name].selection is not None:
            summary.update(budget=budget.amount, unit=budget.unit, selected_cost=self.selected_cost(adapter_name))
            summary["budget_used"] = round(summary["selected_cost"] / budget.amount, 4)
        return summary


def _check_budget(config: TraDyConfig, priced: list[PricedLayer], limits: tuple[int, ...]) -> None:
    budget = config.budget
    fits = [p for p in priced if all(c <= limit for c, limit in zip(p.costs, limits))]
    if not fits:
        cheapest = min(priced, key=lambda p: sum(p.costs))
        raise ValueError(
            f"memory_budget={config.memory_budget!r} ({budget}) is too small for a single channel: the cheapest "
            f"candidate channel ({cheapest.name}) needs {cheapest.costs} of the limits {limits} "
            f"({'values' if budget.unit == 'values' else 'bank values, saved-input bytes'}). Raise the budget"
            + ("." if budget.unit == "values" else ", or move bank_share towards the part that does not fit.")
        )
    if all(sum(p.costs[i] * p.in_channels for p in priced) <= limit for i, limit in enumerate(limits)):
        raise ValueError(
            f"memory_budget={config.memory_budget!r} ({budget}) covers every candidate channel: nothing would be "
            "left out. Use a smaller budget, or full fine-tuning."
        )


def _input_dims(args, kwargs) -> dict:
    """Shape of every tensor in a forward call (nested dicts, lists and tuples included), by position."""
    return {i: tuple(t.shape) for i, t in enumerate(tensor_leaves((args, kwargs)))}


def _larger(dims: tuple, seen: tuple) -> bool:
    return len(dims) != len(seen) or any(a > b for a, b in zip(dims, seen))


class _Call:
    """Positional and keyword arguments of one forward call, for the probe."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs
