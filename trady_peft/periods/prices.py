"""What one channel costs: measured by the shape probe, and kept current as larger inputs arrive.

`Prices` is the part of `trady_peft.periods.Periods` that prices the byte budgets: it measures each
TraDy layer's input (`probe`, one forward without grad), reprices when a grad-enabled forward has
a larger input than any before, and tells its `Periods` to draw, or redraw, what the new prices
change. In a distributed run the prices are agreed over the ranks (`reprice_agreed`).
"""

from __future__ import annotations

import logging

import torch

from ..compat import tensor_leaves
from ..core.collectives import any_rank, several_ranks
from ..core.distributed import bank_numel
from ..memory.budget import (
    InputShapes,
    all_reduce_max_costs,
    bytes_per_trained_value,
    draw_limits,
    layer_cost,
    probe_input_shapes,
)
from ..memory.measure import forward_batch
from ..selection.draws import PricedLayer

logger = logging.getLogger(__name__)


class Prices:
    """The prices of every TraDy layer's channels, for the adapters of ``periods`` (a `Periods`)."""

    def __init__(self, periods):
        self.periods = periods
        self.layer_costs: dict = {}  # layer name -> LayerCost: the largest input seen (probe)
        self._input_dims: dict = {}  # largest size of each model input seen in a grad-enabled forward
        self._recording, self._pending_costs = None, {}  # distributed runs: prices met, not yet agreed
        self.probing = False

    def priced_layers(self, adapter_name: str = "default") -> list[PricedLayer]:
        """Candidate layers with what one channel spends of each part of the budget (needs the probe)."""
        unit, costs = self.periods.host.peft_config[adapter_name].budget.unit, self.periods.states[adapter_name].costs
        priced = []
        for n, m in self.periods.candidate_layers(adapter_name):
            price = costs[n].draw_price(unit)
            priced.append(PricedLayer(n, m.geometry.in_channels, price if len(price) > 1 else price[0]))
        return priced

    def probe(self, example_inputs, root=None) -> None:
        """Measure each target layer's input on ``example_inputs`` (one forward, no grad) and draw
        (or redraw) the adapters whose prices changed.

        Runs automatically on the first grad-enabled forward and whenever a grad-enabled forward
        has a larger input than any seen before (a longer sequence, a bigger batch), so that the
        byte budget stays a bound. Call it with your largest batch to price for it from the start
        (in a distributed run, on every process: it is a collective call). ``root``: the module to
        run (default: the wrapped model), e.g. the ``fully_shard``-ed ``PeftModel`` of FSDP2.
        """
        self.probing = True
        layers = self.periods.host.trady_layers()
        modes = {m: m.training for m in self.periods.host.model.modules()}
        device = next(self.periods.host.model.parameters()).device
        try:
            # Shapes only: no dropout draw, no batch-norm statistics, no trace in the random streams.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.periods.host.model.eval()
                shapes = probe_input_shapes(root or self.periods.host.model, example_inputs, layers)
        finally:
            for m, training in modes.items():
                m.training = training
            self.probing = False
        self._set_prices(self._measured(shapes))

    def _measured(self, shapes: dict) -> dict:
        """Each layer's price for the input ``shapes`` recorded, covering the prices measured before."""
        measured = {}
        for name, layer in self.periods.host.trady_layers():
            if name in shapes:
                cost = layer_cost(name, layer.geometry, *shapes[name])
                old = self.layer_costs.get(name)
                measured[name] = cost if old is None else old.larger(cost)
        return measured

    def _set_prices(self, measured: dict) -> None:
        """Take the prices ``measured`` (a collective in a distributed run) and draw, or redraw, the
        adapters they change."""
        # Every process prices alike (the largest input of any rank), so that all draw alike.
        self.layer_costs.update(all_reduce_max_costs(measured))
        for adapter in sorted(self.periods.states):
            state = self.periods.states[adapter]
            if (
                self.periods.host.peft_config[adapter].inference_mode
                or self.periods.host.peft_config[adapter].budget is None
            ):
                continue
            missing = [n for n, _ in self.periods.candidate_layers(adapter) if n not in self.layer_costs]
            if missing:
                raise RuntimeError(
                    f"The probe forward pass did not reach the TraDy layers {missing[:5]}; their input size is "
                    "unknown. Pass inputs that run the whole model, or leave those layers out of target_modules."
                )
            for n, _ in self.periods.candidate_layers(adapter):
                old = state.costs.get(n)
                state.costs[n] = self.layer_costs[n] if old is None else old.larger(self.layer_costs[n])
            if state.selection is None:
                self.periods.draw_if_ready(adapter)
            elif not self.fits(adapter, state.selection):
                logger.warning(
                    "TraDy: a larger training input than any before arrived; adapter %r redraws period %d under "
                    "the new prices so that its footprint stays within memory_budget=%r.",
                    adapter,
                    state.period,
                    self.periods.host.peft_config[adapter].memory_budget,
                )
                self.periods.redraw(adapter)

    def before_forward(self, args, kwargs) -> None:
        """Price the byte budgets at the first grad-enabled forward, and reprice when a grad-enabled
        forward (whose inputs autograd keeps, whatever the modules' training mode) has a larger input
        than any before. Called by the tuner before each outermost grad-enabled forward.

        In one process the larger input is priced before its forward runs. In a distributed run a
        forward runs no collective (one process may run a forward the others do not): only the very
        first forward, which every process runs, prices at once; a larger input is measured during its
        forward and priced at the next optimizer step or period change (`reprice_agreed`)."""
        if self.probing:
            return
        budgeted = [
            n for n, c in self.periods.host.peft_config.items() if c.budget is not None and not c.inference_mode
        ]
        if not budgeted:
            return
        waiting = any(not self.periods.states[n].costs for n in budgeted if n in self.periods.states)
        dims = _input_dims(args, kwargs)
        grew = any(key not in self._input_dims or _larger(d, self._input_dims[key]) for key, d in dims.items())
        if not (waiting or grew):
            return
        for key, d in dims.items():
            old = self._input_dims.get(key, d)
            self._input_dims[key] = tuple(max(a, b) for a, b in zip(d, old)) if len(d) == len(old) else d
        if waiting or not several_ranks():
            self.probe(forward_batch(args, kwargs))
        elif self._recording is None:
            self._recording = InputShapes(self.periods.host.trady_layers())

    def after_forward(self) -> None:
        """Keep the input shapes a distributed forward recorded, as prices for `reprice_agreed`."""
        if self._recording is None:
            return
        shapes = self._recording.stop()
        self._recording = None
        for name, cost in self._measured(shapes).items():
            old = self._pending_costs.get(name)
            self._pending_costs[name] = cost if old is None else old.larger(cost)

    def reprice_agreed(self) -> None:
        """In a distributed run, price the larger inputs any process met since the last call (a
        collective: every process calls it, at an optimizer step or a period change)."""
        if not several_ranks() or not self.layer_costs:
            return
        if not any_rank(bool(self._pending_costs)):
            return
        pending, self._pending_costs = self._pending_costs, {}
        self._set_prices({n: c.larger(pending[n]) if n in pending else c for n, c in self.layer_costs.items()})

    def fits(self, name: str, selection: dict[str, torch.Tensor]) -> bool:
        config, costs = self.periods.host.peft_config[name], self.periods.states[name].costs
        limits = draw_limits(
            config.budget, bank_numel(self.periods.host.trady_bank[name].weight), config.optimizer_state_bytes
        )
        spent = [0] * len(limits)
        for n, channels in selection.items():
            for i, part in enumerate(costs[n].draw_price(config.budget.unit)):
                spent[i] += part * channels.numel()
        return all(s <= limit for s, limit in zip(spent, limits))

    def selected_cost(self, adapter_name: str = "default") -> int:
        """What the current selection spends of the budget, in its unit. In bytes: the whole bank
        (parameter, gradient and optimizer state, a fixed cost) plus the selected channels' saved inputs."""
        config, state = self.periods.host.peft_config[adapter_name], self.periods.states[adapter_name]
        selection = state.selection or {}
        if config.budget.unit == "values":
            return sum(state.costs[n].channel_cost("values") * c.numel() for n, c in selection.items())
        bank = bank_numel(self.periods.host.trady_bank[adapter_name].weight) * bytes_per_trained_value(
            config.optimizer_state_bytes
        )
        return bank + sum(state.costs[n].saved_bytes * c.numel() for n, c in selection.items())


def check_budget(config, priced: list[PricedLayer], limits: tuple[int, ...]) -> bool:
    """Refuse a budget too small for any channel; return whether it covers every candidate channel
    (then the draw takes them all, see `covering_message`)."""
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
    return all(sum(p.costs[i] * p.in_channels for p in priced) <= limit for i, limit in enumerate(limits))


def covering_message(config, priced: list[PricedLayer], total_cost: list[int]) -> str:
    """The warning for a budget that covers every candidate channel: what they all cost, and a budget
    (half of it) under which TraDy chooses."""
    cost = sum(c * p.in_channels for c, p in zip(total_cost, priced))
    channels = sum(p.in_channels for p in priced)
    unit = "values" if config.budget.unit == "values" else "bytes"
    smaller = cost // 2 if unit == "values" else f"{max(1, cost // 2048)}KiB"
    return (
        f"TraDy: memory_budget={config.memory_budget!r} ({config.budget}) covers every candidate channel at the "
        f"inputs seen so far: all {channels:,} input channels of the {len(priced)} candidate layers cost {cost:,} "
        f"{unit}. Every one of them trains, every period (full fine-tuning of those layers). Pass a smaller budget, "
        f"e.g. memory_budget={smaller!r}, for TraDy to choose channels."
    )


def _input_dims(args, kwargs) -> dict:
    """Shape of every tensor in a forward call (nested dicts, lists and tuples included), by position."""
    return {i: tuple(t.shape) for i, t in enumerate(tensor_leaves((args, kwargs)))}


def _larger(dims: tuple, seen: tuple) -> bool:
    return len(dims) != len(seen) or any(a > b for a, b in zip(dims, seen))
