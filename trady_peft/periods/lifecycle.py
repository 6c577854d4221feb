"""The period lifecycle: candidate layers, draws, the moves from one period to the next.

`Periods` is the component of `trady_peft.TraDyModel` that owns every adapter's selection
lifecycle (`trady_peft.selection.state`): which layers are candidates, drawing a period's
channels with the adapter's strategy (`trady_peft.selection.strategies`), installing them on the
bank, and `Periods.next_period`, the one way to move to another period (used by
`trady_peft.TraDyCallback` and `trady_peft.next_period`). Its `Prices` measure what channels cost
and its `StepWatch` follows the optimizer steps. It talks to the tuner only through `PeriodHost`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import numbers
import reprlib
import weakref
from collections.abc import Iterable
from typing import Protocol

import torch
from accelerate.utils import send_to_device
from torch import nn

from ..compat import has_zero_master, in_backward
from ..config import TraDyConfig
from ..core.distributed import bank_numel, fsdp_managed, gathered, zero3_managed, zero_bank
from ..core.layer import TraDyLayer
from ..core.optim import forget_optimizer_state, reset_optimizer_state
from ..core.targets import depth_blocks, names_match
from ..memory.budget import Budget, bank_capacity, bytes_per_trained_value
from ..memory.measure import MissingLossError, forward_batch
from ..selection.draws import Candidate
from ..selection.importance import builtin_entry, family_of
from ..selection.state import Phase, SelectionState
from ..selection.statistics import ChannelNormStatistics, gradient_norms, per_layer_chunks, scoring_chunks
from ..selection.strategies import alpha_top_k, get_strategy
from .prices import Prices, check_budget, covering_message
from .steps import StepWatch

logger = logging.getLogger(__name__)
#: A period with fewer channels than this gets a warning with the numbers.
FEW_CHANNELS = 4


class PeriodHost(Protocol):
    """What `Periods` needs of its tuner (`trady_peft.TraDyModel`)."""

    model: nn.Module
    peft_config: dict[str, TraDyConfig]
    trady_bank: nn.ModuleDict  # adapter name -> `trady_peft.core.bank.DeltaBank`

    @property
    def active_adapters(self) -> list[str]: ...

    @property
    def in_forward(self) -> bool: ...

    def trady_layers(self, adapter_name: str) -> list[tuple[str, TraDyLayer]]: ...

    def check_placement(self, when: str) -> None: ...


class Periods:
    """Every adapter's periods (see the module docstring). Owned by the tuner, ``host``."""

    _scoring = False  # `score_channels` is running (a class default: also for a copy pickled before it existed)

    def __init__(self, host: PeriodHost):
        self.host = host
        self.states: dict[str, SelectionState] = {}
        self.prices = Prices(self)  # what channels cost: the probe, repricing
        self.steps = StepWatch(self)  # what each optimizer step tells: MeDyate's norms, a finite bank
        self._optimizer, self._warned_stale = None, False

    def __getstate__(self) -> dict:
        # A copy (pickle, deepcopy) does not keep the optimizer: it trains the original's bank.
        return {**self.__dict__, "_optimizer": None}

    # --------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str) -> None:
        """Start ``name``'s lifecycle (its bank exists): statistics, prices measured so far, first draw."""
        config = self.host.peft_config[name]
        layers = self.host.trady_layers(name)
        statistics = None
        if get_strategy(config.strategy).channels == "weighted":  # also for inference: a loaded state keeps them
            statistics = ChannelNormStatistics({n: m.geometry.in_channels for n, m in layers})
            if not config.inference_mode:
                self.steps.watch_norms(name)
        # An adapter added after the probe starts from the prices measured so far.
        known = self.prices.layer_costs
        measured = config.budgeted and (config.step_memory is None or self.prices.rest(name) is not None)
        costs = {n: known[n] for n, _ in layers if n in known} if measured else {}
        self.states[name] = SelectionState(costs=costs, statistics=statistics)
        if not config.inference_mode:
            capacity = self.prices.bank_target(name) if costs else None  # step_memory, after the probe
            if capacity is not None:
                self.resize_bank(name, capacity)
            self.draw_if_ready(name)

    def bank_replaced(self, name: str) -> None:
        """Follow ``name``'s bank to its new parameter (a meta bank made real by a load)."""
        self.steps.bank_replaced(name)

    def remove_adapter(self, name: str) -> None:
        """Forget ``name``'s lifecycle (the adapter is being deleted)."""
        self.states.pop(name, None)
        self.prices.sized.discard(name)
        self.steps.forget(name)

    def use_importance_table(self, name: str) -> None:
        """Fill ``layer_ranking`` (and ``top_k``) from the built-in table of the model's family."""
        config = self.host.peft_config[name]
        if config.layer_ranking is not None or get_strategy(config.strategy).layers == "all":
            return
        found = family_of(self.host.model)
        entry = builtin_entry(found[0]) if found else None
        names = [n for n, _ in self.host.trady_layers(name)]
        present = [r for r in entry.ranking if any(names_match(n, r) for n in names)] if entry else []
        if entry is None or len(present) < len(entry.ranking) / 2:
            if config.inference_mode:
                return  # nothing is drawn for inference
            medyate = config.strategy == "medyate"
            fallback = "rank layers by module order" if medyate else "draw from every target layer (D-Full Random)"
            if entry is None:
                what = f"family {found[0]!r}" if found else type(self.host.model).__name__
                cause = f"has no importance table for {what}"
            else:
                cause = (
                    f"cannot use the {entry.family!r} importance table: it ranks {len(entry.ranking)} layers and only "
                    f"{len(present)} of them are target layers of this model (fewer than half; a smaller or "
                    "differently named model?)"
                )
            _warn_once(
                "TraDy %s: strategy=%r will %s. Rank this model once with `trady-peft rank-layers` (or "
                "trady_peft.rank_layers) and pass layer_ranking=<file>%s.",
                cause,
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
        config = self.host.peft_config[adapter_name]
        layers = self.host.trady_layers(adapter_name)
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
        state = self.states.get(adapter_name)
        costs = state.costs if state is not None else {}
        if kind == "alpha" and not config.top_k and all(n in costs for n, _ in ranked):
            budget, opt = self.prices.budget(adapter_name), config.optimizer_state_bytes
            memory = [costs[n].channel_cost(budget.unit, opt) * m.geometry.in_channels for n, m in ranked]
            ranked = ranked[: alpha_top_k(memory, budget.amount, config.medyate_alpha)]
        order = {n: i for i, (n, _) in enumerate(layers)}
        return sorted(ranked, key=lambda lm: order[lm[0]])

    def _within_depth(self, adapter_name: str, layers: list, candidates: list) -> list:
        """``candidates`` restricted to the ``max_depth`` blocks of ``layers`` nearest the output."""
        depth = self.host.peft_config[adapter_name].max_depth
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

    def capacity(self, name: str, warn_if_all: bool = True) -> int:
        """Trainable values the bank holds: never more than any draw can use, nor than the budget allows
        (none under step_memory: the probe sizes the bank, `resize_bank`). ``warn_if_all``: warn when the
        budget holds every candidate channel's weights (a budget the user chose, not the default)."""
        config = self.host.peft_config[name]
        if config.step_memory is not None:
            return 0
        layers = self.candidate_layers(name)  # before the probe: an upper bound
        if config.budget is None:
            return sum(config.channels_for(m.geometry.in_channels) * m.geometry.slice_numel for _, m in layers)
        total = sum(m.geometry.in_channels * m.geometry.slice_numel for _, m in layers)
        capacity = bank_capacity(config.budget, total, config.optimizer_state_bytes, config.bank_share)
        if capacity == total and warn_if_all and not config.inference_mode:
            per_value = 1 if config.budget.unit == "values" else bytes_per_trained_value(config.optimizer_state_bytes)
            unit = "values" if config.budget.unit == "values" else "bytes"
            smaller = total // 2 if unit == "values" else f"{max(1, total * per_value // 1024)}KiB"
            _warn_once(
                "TraDy: memory_budget=%r (%s) leaves the bank more than the trainable state of every candidate "
                "channel of adapter %r: all %s weight values cost %s %s, so the bank holds them all; whether every "
                "channel also trains is known once the first forward pass prices the saved inputs. Pass a smaller "
                "budget, e.g. memory_budget=%r, for TraDy to choose channels.",
                config.memory_budget,
                config.budget,
                name,
                f"{total:,}",
                f"{total * per_value:,}",
                unit,
                smaller,
            )
        return capacity

    # ------------------------------------------------------------------------------ periods
    def period(self, adapter_name: str = "default") -> int:
        """Index of the current training period (0 before the first redraw)."""
        return self.states[adapter_name].period

    def phase(self, adapter_name: str = "default") -> Phase:
        """Where the adapter stands: waiting for shapes, waiting for scores, ready, or drawn."""
        state, config = self.states[adapter_name], self.host.peft_config[adapter_name]
        needs_costs = [n for n, _ in self.candidate_layers(adapter_name)] if config.budgeted else []
        return state.phase(needs_costs, get_strategy(config.strategy).scores_due(state.period, state.scored_period))

    def next_period(
        self, period=None, optimizer=None, batches=None, adapter_name: str | None = None, root: nn.Module | None = None
    ) -> int:
        """Move to ``period`` (default: the next one); the one way TraDy's periods change.

        1. fold the deltas trained so far into each layer's accumulated store;
        2. for the Det-RGN strategies, score channels on up to ``gradient_batches`` of ``batches``;
        3. draw the period's channels (a pure function of the selection state) and install them;
        4. zero the bank in place (same parameter object, so the optimizer keeps tracking it) and
           reset ``optimizer``'s state for the entries whose channel changed, so that they train
           as under a freshly created optimizer.

        Args:
            period: the period to move to (a resumed run passes the one it resumes in).
            optimizer: the optimizer training the adapter (it must hold the bank).
            batches: training batches, for the strategies that score channels.
            adapter_name: the adapter (default: every active adapter).
            root: the module scoring runs the batches through (`score_channels`).

        Returns:
            The new period index.

        Raises:
            ValueError: a bad argument (checked before anything changes).
            FloatingPointError: the period's delta holds NaN or infinite values (`check_finite`).
        """
        self._check_next_period_arguments(period, optimizer, batches, adapter_name)
        if self.host.in_forward or in_backward():
            raise RuntimeError(
                "next_period was called inside a forward or backward pass; the channels of a period "
                "must not change while autograd holds their inputs. Call it between optimizer steps."
            )
        self.host.check_placement("at a period change")
        self.prices.reprice_agreed()
        new_period = None
        for name in [adapter_name] if adapter_name else list(self.host.active_adapters):
            config, state = self.host.peft_config[name], self.states[name]
            new_period = state.period + 1 if period is None else period
            if optimizer is not None:
                self.attach_optimizer(optimizer, name)
            strategy = get_strategy(config.strategy)
            if not config.inference_mode and strategy.scores_due(new_period, state.scored_period):
                if batches is None:
                    raise ValueError(
                        f"strategy={config.strategy!r} scores channels on data: pass batches=train_loader."
                    )
                self.score_channels(itertools.islice(batches, config.gradient_batches), name, new_period, root)
            if config.inference_mode:
                state.period = new_period
                continue
            self._start_period(name, new_period, optimizer=optimizer)
        return new_period

    def _check_next_period_arguments(self, period, optimizer, batches, adapter_name) -> None:
        if adapter_name is not None and adapter_name not in self.states:
            raise ValueError(
                f"next_period: adapter {adapter_name!r} is not an adapter of this model; pass one of "
                f"{sorted(self.states)}, or None for every active adapter."
            )
        if period is not None and (isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 0):
            raise ValueError(
                f"next_period: period={period!r} must be an int >= 0 (the period to move to), or None for the "
                "next one."
            )
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            loader = isinstance(optimizer, Iterable) and not isinstance(optimizer, (list, tuple, dict))
            raise ValueError(
                f"next_period: optimizer={reprlib.repr(optimizer)} ({type(optimizer).__name__}) is not an optimizer. "
                + ("Pass a data loader as batches=, and " if loader else "Pass ")
                + "the torch.optim.Optimizer that trains the model: "
                "next_period(model, optimizer, batches=train_loader)."
            )
        if batches is not None and not isinstance(batches, Iterable):
            raise ValueError(
                f"next_period: batches={reprlib.repr(batches)} ({type(batches).__name__}) is not iterable; pass the "
                "training data loader (or a list of batches), or None."
            )

    def _start_period(self, name: str, period: int, optimizer=None, redraw: bool = False) -> None:
        state = self.states[name]
        capacity = self.prices.bank_target(name)  # step_memory: a smaller share (refused before any change)
        with gathered(self.host.trady_bank[name].weight):  # ZeRO-3: the whole bank, on every rank
            move = "redraw of" if redraw else "change to"
            self.steps.check_finite(name, f"folded into its store at the {move} period {period}")
            for _, layer in self.host.trady_layers(name):
                layer.commit(name)
        self.steps.new_period(name)
        if state.statistics is not None and not redraw and state.selection is not None:
            state.statistics.end_period(state.selection)
        state.period, state.selection = period, None
        zero_bank(self.host.trady_bank[name].weight)  # and DeepSpeed's master copy
        if capacity is not None:
            self.resize_bank(name, capacity)
        self.draw_if_ready(name, optimizer)

    def redraw(self, name: str) -> None:
        """Draw adapter ``name``'s current period again (its prices changed), the trained delta folded first."""
        self._start_period(name, self.states[name].period, redraw=True)

    def resize_bank(self, name: str, capacity: int) -> None:
        """step_memory: give adapter ``name``'s bank ``capacity`` values (same parameter object, zeros,
        nothing installed) and drop the optimizer state of its old size."""
        bank = self.host.trady_bank[name]
        if has_zero_master(bank.weight):
            raise ValueError(
                "step_memory sizes the adapter's bank when the probe has measured the step, which a DeepSpeed ZeRO "
                "optimizer holding the bank does not allow: use memory_budget (a byte budget of the adapter) instead."
            )
        if bank.weight.numel() != capacity:
            bank.resize(capacity)
            optimizer = self._optimizer() if self._optimizer else None
            if optimizer is not None:
                forget_optimizer_state(optimizer, bank.weight)
        self.prices.sized.add(name)

    def draw_if_ready(self, name: str, optimizer=None) -> None:
        """Draw and install adapter ``name``'s channels once its prices (and scores) are known."""
        if self.phase(name) is not Phase.READY:
            return  # drawn once the probe (and, for Det-RGN, the scoring) has run
        if self.host.trady_bank[name].weight.device.type == "meta":
            return  # low_cpu_mem_usage: drawn once a load made the bank real (`bank_replaced`)
        state, config = self.states[name], self.host.peft_config[name]
        selection = self._draw(name, state.period)
        changed = self.install(name, selection)
        state.selection = selection
        bank = self.host.trady_bank[name].weight
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
        if count < FEW_CHANNELS and config.budgeted:  # channels_per_layer asks for its count
            bound = "step_memory" if config.step_memory is not None else "memory_budget"
            logger.warning(
                "TraDy period %d of adapter %r trains only %d input channel(s) (budget use %s). %s=%r "
                "barely holds a channel; raise it (or bank_share) for a useful period.",
                state.period,
                name,
                count,
                self.selection_summary(name).get("budget_used"),
                bound,
                getattr(config, bound),
            )

    def _draw(self, name: str, period: int) -> dict[str, torch.Tensor]:
        config, state = self.host.peft_config[name], self.states[name]
        strategy, layers = get_strategy(config.strategy), self.candidate_layers(name)
        if not config.budgeted:
            candidates = [
                Candidate(n, m.geometry.in_channels, config.channels_for(m.geometry.in_channels)) for n, m in layers
            ]
            return strategy.select(candidates, None, config.seed, period)
        priced, limits, unit = self.prices.priced_layers(name), self.prices.limits(name), self.prices.budget(name).unit
        total = [state.costs[p.name].channel_cost(unit, config.optimizer_state_bytes) for p in priced]
        if check_budget(config, priced, limits):
            _warn_once(covering_message(config, priced, total))
            return {p.name: torch.arange(p.in_channels) for p in priced}
        norms = state.statistics.weights([p.name for p in priced]) if state.statistics else None
        return strategy.select(priced, limits, config.seed, period, scores=state.scores, norms=norms, total_cost=total)

    def install(self, name: str, selection: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """Install ``selection`` and return the bank segments whose meaning changed."""
        bank = self.host.trady_bank[name]
        offset, changed, segments = 0, [], []
        for layer_name, layer in self.host.trady_layers(name):
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

    def remember_optimizer(self, optimizer) -> None:
        """Keep ``optimizer``, seen stepping a bank, for the redraws of a `next_period` called without one."""
        if self._optimizer is None or self._optimizer() is None:
            self._optimizer = weakref.ref(optimizer)

    def attach_optimizer(self, optimizer, name: str = "default") -> None:
        """Check that ``optimizer`` trains the adapter's bank and remember it for mid-period redraws."""
        bank = self.host.trady_bank[name].weight
        groups = getattr(optimizer, "param_groups", None)
        deepspeed = has_zero_master(bank)  # DeepSpeed's groups hold flat partitions, not the bank
        if (
            groups is not None
            and not deepspeed
            and bank.numel()
            and not any(p is bank for g in groups for p in g["params"])
        ):
            raise ValueError(
                f"The optimizer given to next_period ({type(optimizer).__name__}) does not hold the trainable "
                f"bank of adapter {name!r}, so the adapter would never train. Build the optimizer after "
                "get_peft_model from model.parameters() (or pass the one that trains the model)."
            )
        self._optimizer = weakref.ref(optimizer)

    # ------------------------------------------------------------------ gradient statistics
    def score_channels(
        self, batches, adapter_name: str | None = None, period: int | None = None, root: nn.Module | None = None
    ) -> dict:
        """Det-RGN's scores: the full-gradient norm of every input channel of the candidate layers.

        Stores ``||dL/dW[:, c]||_2``, the gradient summed over ``batches`` (dicts of model inputs
        with labels, or tensors), for the draw of ``period`` (default: the adapter's next draw),
        without forming a dense weight gradient (`trady_peft.selection.statistics.gradient_norms`):
        the channels are scored in chunks that each hold no more than a draw may (`scoring_chunks`),
        one forward and backward per chunk and batch. ``root``: the module to run the batches
        through (default: the wrapped model); under FSDP2, the ``fully_shard``-ed ``PeftModel``.
        Returns the norms per layer.
        """
        names = [adapter_name] if adapter_name else list(self.host.active_adapters)
        device = self.host.trady_bank[names[0]].weight.device
        # Scoring must not move the training's random streams (data order, dropout): a resumed
        # run, which does not rescore, would otherwise diverge from the uninterrupted one.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            batches = [send_to_device(b, device) for b in batches]  # dicts, BatchEncoding, tuples
            self._scoring = True  # its forwards are not training forwards (`score_first_batch`)
            try:
                norms = {}
                for name in names:
                    layers = {n: m for n, m in self.candidate_layers(name) if n not in norms}
                    chunks = self._scoring_chunks(name, layers, batches, root)
                    bank = self.host.trady_bank.parameters()
                    if layers:
                        norms.update(gradient_norms(self.host.model, layers, batches, chunks, bank, root))
            finally:
                self._scoring = False
        for name in names:
            state = self.states[name]
            state.scores = {n: norms[n] for n, _ in self.candidate_layers(name)}
            drawn = state.selection is not None
            state.scored_period = period if period is not None else state.period + int(drawn)
            if not drawn:
                self.draw_if_ready(name)
        return norms

    def score_first_batch(self, args: tuple, kwargs: dict) -> None:
        """Score, on this forward's inputs, the active adapters whose strategy needs channel scores
        before it can draw (the Det-RGN strategies in a loop that did not score them), so that their
        first training batch trains. Called by the tuner before each outermost grad-enabled forward,
        after the probe (`trady_peft.periods.prices.Prices.before_forward`).

        Raises:
            ValueError: the model returns no loss for these inputs (no labels, or a loss computed
                outside the model), so they cannot be scored, or FSDP2 or ZeRO-3 shards the model (its
                forward cannot hold the scoring's passes); the message says what to call instead.
        """
        if self._scoring:
            return  # a forward of the scoring itself
        waiting = [
            name
            for name in self.host.active_adapters
            if name in self.states
            and self.states[name].selection is None  # cheap, and false at every forward once drawn
            and get_strategy(self.host.peft_config[name].strategy).needs_scores
            and not self.host.peft_config[name].inference_mode
            and self.phase(name) is Phase.WAITING_FOR_SCORES
        ]
        sharded = "FSDP2" if fsdp_managed(self.host.model) else "ZeRO-3" if zero3_managed(self.host.model) else None
        for name in waiting:
            if sharded:
                raise ValueError(
                    f"strategy={self.host.peft_config[name].strategy!r} (adapter {name!r}) scores channels before it "
                    f"draws any, and under {sharded} it cannot score inside the sharded model's forward (the "
                    "scoring's own backward passes would release the parameters that forward gathered). Score "
                    "before the training loop, on every process: trady_peft.next_period(model, optimizer, "
                    "batches=train_loader, period=0), with the model you train (the fully_shard-ed model, or the "
                    "DeepSpeed engine)."
                )
            try:
                self.score_channels([forward_batch(args, kwargs)], name)
            except MissingLossError as error:
                config = self.host.peft_config[name]
                raise ValueError(
                    f"strategy={config.strategy!r} (adapter {name!r}) scores channels before it draws any, on "
                    "the first training batch, but the model returned no loss for this batch (no labels in "
                    "it, or a loss computed outside the model), so nothing could be scored or trained. Score "
                    "before the training loop: trady_peft.next_period(model, optimizer, "
                    "batches=train_loader, period=0) (or model.base_model.next_period(0, optimizer, "
                    f"batches=train_loader)) scores on gradient_batches={config.gradient_batches} batches that "
                    "carry labels; or pass the labels to the model so that it returns a loss."
                ) from error

    def _scoring_chunks(
        self, name: str, layers: dict[str, TraDyLayer], batches: list, root: nn.Module | None
    ) -> list[dict[str, range]]:
        """The channels of ``layers`` in chunks that hold no more than adapter ``name``'s draws may."""
        config = self.host.peft_config[name]
        if not config.budgeted:
            return per_layer_chunks(
                {n: (m.geometry.in_channels, config.channels_for(m.geometry.in_channels)) for n, m in layers.items()}
            )
        if any(n not in self.states[name].costs for n in layers) and batches:
            self.prices.probe(batches[0], root)  # the prices, which a draw needs anyway
        priced = [p for p in self.prices.priced_layers(name) if p.name in layers]
        return scoring_chunks(priced, self.prices.limits(name))

    # ------------------------------------------------------------------------------ summary
    def selection_summary(self, adapter_name: str = "default") -> dict:
        """Figures for logs: period, layers, channels selected now and touched so far, budget use."""
        layers = self.host.trady_layers(adapter_name)
        summary = {
            "period": self.states[adapter_name].period,
            "layers": len(layers),
            "candidate_layers": len(self.candidate_layers(adapter_name)),
            "selected_channels": sum(layer.trady_delta[adapter_name].count for _, layer in layers),
            "touched_channels": sum(layer.touched_channels(adapter_name) for _, layer in layers),
            "total_channels": sum(layer.geometry.in_channels for _, layer in layers),
            "trainable_values": bank_numel(self.host.trady_bank[adapter_name].weight),
        }
        config = self.host.peft_config[adapter_name]
        budget: Budget | None = self.prices.budget(adapter_name)
        if budget is not None and self.states[adapter_name].selection is not None:
            cost = self.prices.selected_cost(adapter_name)
            summary.update(budget=budget.amount, unit=budget.unit, selected_cost=cost)
            summary["budget_used"] = round(summary["selected_cost"] / max(budget.amount, 1), 4)
            rest = self.prices.rest(adapter_name) if config.step_memory is not None else None
            if rest is not None:  # the budget is the adapter's share of step_memory
                summary.update(step_memory=config.step_budget.amount, step_rest=rest.total)
        return summary


@functools.cache
def _warn_once(message: str, *args) -> None:
    """``logger.warning``, once per process for each distinct message."""
    logger.warning(message, *args)
