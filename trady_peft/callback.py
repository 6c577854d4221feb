"""Per-period resampling under the Hugging Face ``Trainer`` (and a helper for plain loops).

The callback keeps no state that a checkpoint must carry: the period is derived from the Trainer's
own progress (``state.epoch`` or ``state.global_step``) counted from the period the adapter carried
when the run began, and the channels of a period are a pure function of ``(seed, period)``. A run
resumed from a checkpoint therefore redraws exactly the selection the interrupted run had, a new run
on a trained adapter (``trainer.train()`` again, or a Trainer on a reloaded adapter) continues its
periods instead of replaying them, and every process of a distributed run draws the same channels.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from .compat import move_callback_first
from .core.distributed import bank_numel, fsdp_managed, zero3_managed
from .model import find_tuner
from .recommend import LEARNING_RATE_TOLERANCE, recommended_learning_rate
from .selection.draws import period_generator
from .selection.state import Phase

logger = logging.getLogger(__name__)


class TraDyCallback(TrainerCallback):
    """Redraws TraDy's channels every epoch (or every ``resample_every_steps`` optimizer steps).

    At each new period it folds the trained deltas into the accumulated store, draws the next
    channel set and resets the optimizer moments of re-targeted entries.

    Args:
        resample_every_steps: resample every this many optimizer steps instead of every epoch.

    Example:
        ```python
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[trady_peft.TraDyCallback()])
        ```
    """

    def __init__(self, resample_every_steps: int | None = None):
        steps = resample_every_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(
                f"resample_every_steps={steps!r} must be a positive int, or None to resample every epoch."
            )
        self.resample_every_steps = None if steps is None else int(steps)
        # Per adapter: the period the run's progress counts from (set at each on_train_begin).
        self._first_period: dict[str, int] = {}
        self._checked_learning_rate = False

    def _target_period(self, state, *, restoring: bool) -> int:
        if self.resample_every_steps:
            # Resampling runs in on_step_end, before a checkpoint is written: a checkpoint at
            # step s already holds period s // N (and its optimizer reset).
            return state.global_step // self.resample_every_steps
        epoch = state.epoch or 0.0
        if restoring:
            # A checkpoint written at epoch 2.0 was written during period 1: period 2 (and its
            # optimizer reset) only starts at the next on_epoch_begin.
            return max(0, math.ceil(epoch - 1e-9) - 1)
        return math.floor(epoch + 1e-9)

    def _sync(self, model, state, optimizer, *, restoring: bool, dataloader=None) -> None:
        tuner = find_tuner(model)
        progress = self._target_period(state, restoring=restoring)
        for name in tuner.active_adapters:
            target = self._first_period.get(name, 0) + progress
            if tuner.period(name) != target or tuner.phase(name) is not Phase.DRAWN:
                # When restoring, the optimizer state just loaded belongs to the target
                # period's layout already: keep it (the checkpoint carried the selection).
                batches = _scoring_batches(dataloader, tuner.peft_config[name], target)
                tuner.next_period(
                    target,
                    None if restoring else optimizer,
                    batches=batches,
                    adapter_name=name,
                    root=_scoring_root(model),
                )
                if tuner.phase(name) is Phase.DRAWN:  # else drawn at the first training forward (the probe)
                    logger.warning("TraDy period %d (%s): %s", target, name, tuner.selection_summary(name))
            if optimizer is not None:
                tuner.attach_optimizer(optimizer, name)

    def on_init_end(self, args, state, control, **kwargs):
        # Run before the report_to integrations, so that they receive the trady/* metrics.
        move_callback_first(self)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        # The adapter carries its period (in memory, in its file, in a checkpoint): a new run counts on
        # from it, and a resumed run finds the count its interrupted run started from.
        tuner = find_tuner(model)
        progress = self._target_period(state, restoring=True)
        for name in tuner.active_adapters:
            first = self._first_period[name] = max(0, tuner.period(name) - progress)
            if first and not progress:
                logger.warning(
                    "TraDy adapter %r carries period %d from an earlier run (or its file): this run continues "
                    "from it (its first %s is period %d) rather than replaying periods 0..%d.",
                    name,
                    first,
                    f"{self.resample_every_steps} steps" if self.resample_every_steps else "epoch",
                    first,
                    first,
                )
        self._sync(model, state, optimizer, restoring=True, dataloader=train_dataloader)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self.resample_every_steps:
            self._sync(model, state, optimizer, restoring=False, dataloader=train_dataloader)

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self._checked_learning_rate:  # after the first step: the bank is sized and the optimizer built
            self._checked_learning_rate = True
            _check_learning_rate(model, optimizer)
        if self.resample_every_steps:
            self._sync(model, state, optimizer, restoring=False, dataloader=train_dataloader)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        """Add the selection's figures (numbers) to the Trainer's logs, before the integrations see them."""
        if model is None or logs is None or "loss" not in logs:
            return
        tuner = find_tuner(model)
        summary = tuner.selection_summary(tuner.active_adapters[0])
        stats = {
            "trady/period": int(summary["period"]),
            "trady/selected_channels": int(summary["selected_channels"]),
            "trady/touched_channels": int(summary["touched_channels"]),
        }
        if "budget_used" in summary:
            stats["trady/budget_used"] = float(summary["budget_used"])
            stats["trady/footprint_bytes" if summary["unit"] == "bytes" else "trady/selected_cost"] = int(
                summary["selected_cost"]
            )
        if "step_rest" in summary:  # step_memory: the measured rest of the step, and the adapter's share
            stats["trady/step_rest_bytes"] = int(summary["step_rest"])
            stats["trady/budget_bytes"] = int(summary["budget"])
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


def _check_learning_rate(model, optimizer) -> None:
    """Warn, once, when an Adam-family optimizer trains an adapter's bank at a rate far from
    `trady_peft.recommended_learning_rate` (more than ``LEARNING_RATE_TOLERANCE`` times off)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    if model is None or "adam" not in type(inner).__name__.lower():
        return
    tuner = find_tuner(model)
    for name in tuner.active_adapters:
        bank = tuner.trady_bank[name].weight
        rates = [g.get("initial_lr", g["lr"]) for g in inner.param_groups if any(p is bank for p in g["params"])]
        if not rates or not bank_numel(bank):
            continue
        lr, recommended = rates[0], recommended_learning_rate(model, name)
        if recommended / LEARNING_RATE_TOLERANCE <= lr <= recommended * LEARNING_RATE_TOLERANCE:
            continue
        logger.warning(
            "TraDy adapter %r trains %s values with %s at learning_rate=%g, %.0fx %s the rate the accuracy-memory "
            "front recommends for that many values (%.1e, trady_peft.recommended_learning_rate). A TraDy bank "
            "trains from zero every period: set learning_rate=%.1e (TrainingArguments, or your optimizer).",
            name,
            f"{bank_numel(bank):,}",
            type(inner).__name__,
            lr,
            max(lr / recommended, recommended / lr),
            "above" if lr > recommended else "below",
            recommended,
            recommended,
        )


def _scoring_batches(dataloader, config, period: int):
    """The batches the Det-RGN strategies score period ``period`` on: drawn from the dataset with the
    period's own generator, so that a resumed run scores on what the uninterrupted run scored on
    (iterating the training dataloader would depend on where its sampler stands)."""
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    # Per process: accelerate's DataLoaderShard has batch_size None and a batch_sampler that knows it.
    sampler = getattr(dataloader, "batch_sampler", None)
    size = getattr(dataloader, "batch_size", None) or getattr(sampler, "batch_size", None)
    if dataloader is None or collate is None or not size or not hasattr(dataset, "__getitem__"):
        return dataloader
    try:
        n = len(dataset)
    except TypeError:
        return dataloader  # an iterable dataset: score on its next batches
    order = torch.randperm(n, generator=period_generator(config.seed, period)).tolist()
    count = min(n, size * config.gradient_batches)
    return [collate([dataset[i] for i in order[start : start + size]]) for start in range(0, count, size)]


class PeriodWatchdog(TrainerCallback):
    """Warns when a dynamic strategy trains for epochs without `TraDyCallback` (its channels would
    never be redrawn). Added to every Trainer by ``import trady_peft``; silent for other models."""

    def __init__(self):
        self.warned = False

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.warned or model is None or (state.epoch or 0) < 2 - 1e-9:
            return
        try:
            tuner = find_tuner(model)
        except ValueError:
            return  # not a TraDy model
        for name in tuner.active_adapters:
            config = tuner.peft_config[name]
            if config.redraws and not config.inference_mode and tuner.period(name) == 0:
                logger.warning(
                    "TraDy adapter %r (strategy=%r) has trained %.0f epochs in period 0: its channels are never "
                    "redrawn. Pass callbacks=[trady_peft.TraDyCallback()] to the Trainer (or call "
                    "trady_peft.next_period in a plain loop).",
                    name,
                    config.strategy,
                    state.epoch,
                )
                self.warned = True


def _scoring_root(model: nn.Module) -> nn.Module | None:
    """What Det-RGN's scoring runs the batches through: under FSDP2 or DeepSpeed ZeRO-3 the model given
    (the ``fully_shard``-ed root's or the engine's forward gathers the parameters it partitions), else
    the wrapped model (a DDP wrapper would wait for gradients)."""
    return model if fsdp_managed(model) or zero3_managed(model) else None


def next_period(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Iterable | None = None,
    period: int | None = None,
    adapter: str | None = None,
) -> int:
    """Start the next TraDy period in a plain PyTorch / Accelerate loop (what the callback does).

    Folds the deltas trained so far, draws the next channels and resets ``optimizer``'s state
    for re-targeted entries (see `TraDyModel.advance`). The Det-RGN strategies first score
    channels on up to ``gradient_batches`` of ``batches`` (e.g. the training dataloader). Called
    with ``period=0`` before the loop, it scores their first period; without that call they score
    the first training batch, which must then carry labels (docs/strategies.md).

    Example:
        ```python
        for epoch in range(epochs):
            if epoch:
                trady_peft.next_period(model, optimizer, batches=train_loader)
            for batch in train_loader:
                ...
        ```

    Returns:
        The new period index.
    """
    tuner = find_tuner(model)
    new_period = tuner.next_period(period, optimizer, batches=batches, adapter_name=adapter, root=_scoring_root(model))
    for name in [adapter] if adapter else tuner.active_adapters:
        logger.info("TraDy period %d (%s): %s", new_period, name, tuner.selection_summary(name))
    return new_period
