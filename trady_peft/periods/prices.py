"""What one channel costs: measured by the shape probe, and kept current as larger inputs arrive.

`Prices` is the part of `trady_peft.periods.Periods` that prices the byte budgets: it measures each
TraDy layer's input (`probe`, one forward without grad), reprices when a grad-enabled forward has
a larger input than any before, and tells its `Periods` to draw, or redraw, what the new prices
change. In a distributed run the prices are agreed over the ranks (`reprice_agreed`).

Under ``step_memory`` the probe also measures what the rest of the training step keeps
(`trady_peft.memory.step`), the adapter's budget is what remains (`Prices.budget`), and the bank is
sized (and shrunk, never grown, on a larger input) to that share (`Prices.bank_target`).
"""

from __future__ import annotations

import logging
import math

import torch

from ..compat import tensor_leaves
from ..core.collectives import all_reduce_max, any_rank, several_ranks
from ..core.distributed import bank_numel
from ..memory.budget import (
    Budget,
    InputShapes,
    all_reduce_max_costs,
    bytes_per_trained_value,
    draw_limits,
    layer_cost,
    probe_input_shapes,
)
from ..memory.measure import ForwardCall, forward_batch
from ..memory.step import StepRest, measure_saved_activations, resident_bytes, trainable_state_bytes
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
        # step_memory: the largest saved activations measured outside the adapters, the inputs they
        # were measured on, and the adapters whose bank the probe has sized.
        self._saved_activations, self._rest_shapes, self._rest_inputs = None, (), []
        self.sized: set[str] = set()

    def priced_layers(self, adapter_name: str = "default") -> list[PricedLayer]:
        """Candidate layers with what one channel spends of each part of the budget (needs the probe)."""
        unit, costs = self.budget(adapter_name).unit, self.periods.states[adapter_name].costs
        priced = []
        for n, m in self.periods.candidate_layers(adapter_name):
            price = costs[n].draw_price(unit)
            priced.append(PricedLayer(n, m.geometry.in_channels, price if len(price) > 1 else price[0]))
        return priced

    def probe(self, example_inputs, root=None) -> None:
        """Measure each target layer's input on ``example_inputs`` (one forward, no grad) and, for a
        ``step_memory`` adapter, what the rest of the step keeps (one forward with grad, its graph
        dropped); then draw (or redraw) the adapters whose prices changed.

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
        measured = self._measured(shapes)
        self._measure_rest(example_inputs, measured)
        self._set_prices(measured)

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
            config = self.periods.host.peft_config[adapter]
            if config.inference_mode or not config.budgeted:
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
            capacity = self.bank_target(adapter)  # step_memory: the bank the adapter's share holds
            if state.selection is None:
                if capacity is not None:
                    self.periods.resize_bank(adapter, capacity)
                self.periods.draw_if_ready(adapter)
            elif capacity is not None and adapter not in self.sized:  # a loaded selection, not sized here yet
                logger.info(
                    "TraDy: adapter %r measured its training step; period %d is redrawn to fit it.",
                    adapter,
                    state.period,
                )
                self.periods.redraw(adapter)
            elif capacity is not None or not self.fits(adapter, state.selection):
                bound = "step_memory" if config.step_memory is not None else "memory_budget"
                logger.warning(
                    "TraDy: a larger training input than any before arrived; adapter %r redraws period %d under "
                    "the new prices so that its footprint stays within %s=%r.",
                    adapter,
                    state.period,
                    bound,
                    getattr(config, bound),
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
        budgeted = [n for n, c in self.periods.host.peft_config.items() if c.budgeted and not c.inference_mode]
        if not budgeted:
            return
        waiting = any(not self.periods.states[n].costs for n in budgeted if n in self.periods.states)
        dims = _input_dims(args, kwargs)
        grew = any(key not in self._input_dims or _larger(d, self._input_dims[key]) for key, d in dims.items())
        grew = grew or self._uncovered(list(dims.values()))  # step_memory: a step not measured yet
        if not (waiting or grew):
            return
        seen = dict(self._input_dims)
        for key, d in dims.items():
            old = self._input_dims.get(key, d)
            self._input_dims[key] = tuple(max(a, b) for a, b in zip(d, old)) if len(d) == len(old) else d
        if waiting or not several_ranks():
            try:
                self.probe(forward_batch(args, kwargs))
            except ValueError:  # refused (step_memory): the same input is priced again at its next forward
                self._input_dims = seen
                raise
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

    def limits(self, name: str) -> tuple[int, ...]:
        """The limit of each part of a channel's draw price for adapter ``name`` (`draw_limits`)."""
        config = self.periods.host.peft_config[name]
        bank = bank_numel(self.periods.host.trady_bank[name].weight)
        return draw_limits(self.budget(name), bank, config.optimizer_state_bytes)

    def fits(self, name: str, selection: dict[str, torch.Tensor]) -> bool:
        costs, unit = self.periods.states[name].costs, self.budget(name).unit
        limits = self.limits(name)
        spent = [0] * len(limits)
        for n, channels in selection.items():
            for i, part in enumerate(costs[n].draw_price(unit)):
                spent[i] += part * channels.numel()
        return all(s <= limit for s, limit in zip(spent, limits))

    def selected_cost(self, adapter_name: str = "default") -> int:
        """What the current selection spends of the budget, in its unit. In bytes: the whole bank
        (parameter, gradient and optimizer state, a fixed cost) plus the selected channels' saved inputs."""
        config, state = self.periods.host.peft_config[adapter_name], self.periods.states[adapter_name]
        selection = state.selection or {}
        if self.budget(adapter_name).unit == "values":
            return sum(state.costs[n].channel_cost("values") * c.numel() for n, c in selection.items())
        bank = bank_numel(self.periods.host.trady_bank[adapter_name].weight) * bytes_per_trained_value(
            config.optimizer_state_bytes
        )
        return bank + sum(state.costs[n].saved_bytes * c.numel() for n, c in selection.items())

    # ------------------------------------------------------------------ step_memory
    def budget(self, name: str) -> Budget | None:
        """The budget adapter ``name`` draws under: its memory_budget, or under step_memory the bytes the
        measured rest of the step leaves it (0 before the probe); None for channels_per_layer."""
        config = self.periods.host.peft_config[name]
        if config.step_memory is None:
            return config.budget
        rest = self.rest(name)
        return Budget(max(0, rest.share(config.step_budget.amount)) if rest else 0, "bytes")

    def rest(self, name: str = "default", saved: int | None = None, shapes: tuple = ()) -> StepRest | None:
        """What a training step keeps besides the adapters (`trady_peft.memory.step.StepRest`): the
        weights and trainable state as they are now, the saved activations of the largest input
        measured (or ``saved``); None before the probe measured any."""
        if saved is None:
            saved, shapes = self._saved_activations, self._rest_shapes
        if saved is None:
            return None
        model, banks = self.periods.host.model, [b.weight for b in self.periods.host.trady_bank.values()]
        opt = self.periods.host.peft_config[name].optimizer_state_bytes
        layers = [layer for _, layer in self.periods.host.trady_layers()]
        # A draw's channel indices (int32 buffers) are priced for the largest selection, not as drawn.
        indices = [i for layer in layers for i in layer.trady_idx.values()]
        weights = resident_bytes(model, [*banks, *indices])
        reserve = 4 * sum(layer.geometry.in_channels * len(layer.trady_idx) for layer in layers)
        trainable = trainable_state_bytes(model, banks, opt)
        return StepRest(weights, saved, trainable, shapes, channel_indices=reserve)

    def _step_adapters(self) -> list[str]:
        configs = self.periods.host.peft_config
        return [n for n in self.periods.states if configs[n].step_memory is not None and not configs[n].inference_mode]

    def _measure_rest(self, example_inputs, measured: dict) -> None:
        """Measure what the step keeps outside the adapters on ``example_inputs``; refuse it (before any
        price changes) when step_memory leaves an adapter no channel."""
        adapters = self._step_adapters()
        if not adapters:
            return
        tree = (
            (example_inputs.args, example_inputs.kwargs) if isinstance(example_inputs, ForwardCall) else example_inputs
        )
        shapes = measured_on = tuple(tuple(t.shape) for t in tensor_leaves(tree))
        candidates = {id(m): m for n in adapters for _, m in self.periods.candidate_layers(n)}
        self.probing = True  # the measuring forward is not a training forward
        try:
            saved = measure_saved_activations(self.periods.host.model, example_inputs, candidates.values())
        finally:
            self.probing = False
        if several_ranks():  # every process sizes alike
            largest = torch.tensor([saved], dtype=torch.int64)
            all_reduce_max(largest)
            saved = int(largest)
        if self._saved_activations is not None and saved <= self._saved_activations:
            saved, shapes = self._saved_activations, self._rest_shapes
        costs = {**self.layer_costs, **measured}
        for name in adapters:
            self.step_capacity(name, costs, self.rest(name, saved, shapes))  # raises if it does not fit
        self._saved_activations, self._rest_shapes = saved, shapes
        self._rest_inputs = [seen for seen in self._rest_inputs if not _covers(measured_on, seen)] + [measured_on]

    def _uncovered(self, shapes: list) -> bool:
        """Whether a step_memory adapter meets an input no measured input covers."""
        if not self._step_adapters():
            return False
        return not any(_covers(seen, shapes) for seen in self._rest_inputs)

    def step_capacity(self, name: str, costs: dict | None = None, rest: StepRest | None = None) -> int:
        """The bank capacity (trainable values) adapter ``name``'s share of step_memory allows: its
        ``bank_share``, at most what every candidate channel needs. Raises a ValueError with the
        numbers when the share leaves no channel room (the rest alone does not fit)."""
        config = self.periods.host.peft_config[name]
        costs = self.periods.states[name].costs if costs is None else costs
        rest = self.rest(name) if rest is None else rest
        per_value = bytes_per_trained_value(config.optimizer_state_bytes)
        share = rest.share(config.step_budget.amount)
        layers = [(costs[n], m.geometry.in_channels) for n, m in self.periods.candidate_layers(name) if n in costs]
        if not layers:
            return 0  # the probe reached no candidate layer: `_set_prices` says so
        total = sum(c.weights * k for c, k in layers)
        capacity = min(total, max(0, math.floor(share * config.bank_share)) // per_value)
        if any(c.weights <= capacity and c.saved_bytes <= share - capacity * per_value for c, _ in layers):
            return capacity
        # The smallest share holding one channel: its weights within bank_share, its input within the rest.
        bank_part, input_part = config.bank_share, 1 - config.bank_share
        one = [
            max(math.ceil(c.weights * per_value / bank_part), math.ceil(c.saved_bytes / input_part)) for c, _ in layers
        ]
        needed = rest.total + per_value + min(one)
        raise ValueError(
            f"step_memory={config.step_memory!r} ({config.step_budget.amount:,} bytes) does not hold this training "
            f"step: the rest of the step needs {rest.describe()}, which leaves the adapter {share:,} bytes, less "
            f"than one channel needs (its trainable values with gradient and optimizer state, and its saved input). "
            f"Pass step_memory='{needed}B' ({_readable(needed)}) or more, or train on smaller batches (the "
            "saved activations grow with the batch and the sequence length)."
        )

    def bank_target(self, name: str) -> int | None:
        """step_memory: the capacity adapter ``name``'s bank must take now (the probe's first sizing, or a
        smaller share), else None (also without step_memory, or before the probe)."""
        config = self.periods.host.peft_config[name]
        if config.step_memory is None or self._saved_activations is None or config.inference_mode:
            return None
        capacity = self.step_capacity(name)
        if name not in self.sized or capacity < bank_numel(self.periods.host.trady_bank[name].weight):
            return capacity
        return None


def check_budget(config, priced: list[PricedLayer], limits: tuple[int, ...]) -> bool:
    """Refuse a budget too small for any channel; return whether it covers every candidate channel
    (then the draw takes them all, see `covering_message`)."""
    if config.step_memory is not None:
        return False  # `Prices.step_capacity` refuses a share too small; a share covering every channel is fine
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


def _covers(seen, shapes) -> bool:
    """Whether the input tensor shapes ``seen`` are each at least as large as ``shapes`` in every dimension."""
    return len(seen) == len(shapes) and all(
        len(a) == len(b) and all(x <= y for x, y in zip(a, b)) for a, b in zip(shapes, seen)
    )


def _readable(n: int) -> str:
    """``n`` bytes in the largest binary unit under it, e.g. '1.5 GiB'."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**power:
            return f"{n / 2**power:.3g} {unit}"
    return f"{n:,} B"


def _input_dims(args, kwargs) -> dict:
    """Shape of every tensor in a forward call (nested dicts, lists and tuples included), by position."""
    return {i: tuple(t.shape) for i, t in enumerate(tensor_leaves((args, kwargs)))}


def _larger(dims: tuple, seen: tuple) -> bool:
    return len(dims) != len(seen) or any(a > b for a, b in zip(dims, seen))
