"""Per-period resampling under the Hugging Face ``Trainer`` (and a helper for plain loops).

The callback keeps no state of its own: the period is derived from the Trainer's own progress
(``state.epoch`` or ``state.global_step``), and the channels of a period are a pure function
of ``(seed, period)``. A run resumed from a checkpoint therefore redraws exactly the selection
the interrupted run had, and every process of a distributed run draws the same channels.
"""

from __future__ import annotations

import logging
import math

from torch import nn
from transformers import TrainerCallback

from .model import TraDyModel

logger = logging.getLogger(__name__)


def find_tuner(model: nn.Module) -> TraDyModel:
    """The :class:`TraDyModel` inside a ``PeftModel`` (also when wrapped by DDP/FSDP/accelerate)."""
    for module in model.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(
        f"No TraDy adapter found in this {type(model).__name__}: create it with "
        "peft.get_peft_model(model, trady_peft.TraDyConfig(...)) before training."
    )


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
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(
                f"resample_every_steps={steps!r} must be a positive int, or None to resample every epoch."
            )
        self.resample_every_steps = resample_every_steps

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

    def _sync(self, model, state, optimizer, *, restoring: bool) -> None:
        tuner = find_tuner(model)
        target = self._target_period(state, restoring=restoring)
        for name in tuner.active_adapters:
            if tuner.period(name) != target:
                # When restoring, the optimizer state just loaded belongs to the target
                # period's layout already: keep it.
                tuner.resample(None if restoring else optimizer, adapter_name=name, period=target)
                summary = tuner.selection_summary(name)
                logger.info("TraDy period %d (%s): %s", target, name, summary)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._sync(model, state, optimizer, restoring=True)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.resample_every_steps:
            self._sync(model, state, optimizer, restoring=False)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.resample_every_steps:
            self._sync(model, state, optimizer, restoring=False)
