"""The learning rate the accuracy-memory front recommends for a TraDy adapter trained with AdamW.

A TraDy adapter trains its bank's values from zero every period. With AdamW each value moves by
about the learning rate per step, whatever its gradient's scale, so the more values a budget
trains, the smaller the rate that trains them well. `recommended_learning_rate` follows that:

    lr = 3e-3 * sqrt(500,000 / trainable values of the bank), clipped to [1e-3, 1e-2]

The rule was fitted to the accuracy-memory front (docs/benchmarks.md, `make bench-quick`: an image
CNN, a text encoder and a causal LM, TraDy and MeDyate at budgets from 0.05x to 1x LoRA r=8's step
memory) while a fresh classifier head trained at the bank's rate: the best rate of each point's
sweep fell as the bank grew, from 1e-2 to 1e-3, and the rule lay within a factor 2.3 of it at 26 of
29 points. On the current front, which trains a fresh head at its own rate (`create_optimizer`),
it stays within 2.1 of the causal LM's best rates, but the classifiers' banks train best 2 to 10x
below it (3e-4 to 3e-3); it is not refitted to that yet (docs/strategies.md).
`benchmarks/learning_rate_rule.py` prints the comparison. The Trainer's default (5e-5) trains a
TraDy bank far too slowly.

A fresh classifier head (``modules_to_save``) wants a larger rate than the bank: on the front's
image and text tasks the head alone trained best at 3e-2, and a head trained at a bank's rate
stayed underfit. `create_optimizer` builds the optimizer with both rates (`HEAD_LEARNING_RATE`).
"""

from __future__ import annotations

import math

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .core.distributed import bank_numel
from .model import find_tuner

#: The rule's anchor: the rate at this many trainable values.
REFERENCE_VALUES = 500_000
REFERENCE_LEARNING_RATE = 3e-3
#: The rule is clipped to the rates the front's sweeps found best.
LEARNING_RATE_RANGE = (1e-3, 1e-2)
#: AdamW's rate for a fresh classifier head (``modules_to_save``): the head-only point's best on the
#: front's image and text tasks (1e-4 to 1e-1 tried).
HEAD_LEARNING_RATE = 3e-2
#: `trady_peft.TraDyCallback` warns when an Adam-family optimizer's rate is more than this factor off.
LEARNING_RATE_TOLERANCE = 4.0


def learning_rate_for(trainable_values: int) -> float:
    """The rule for a bank of ``trainable_values`` (see the module docstring).

    >>> learning_rate_for(500_000), learning_rate_for(2_000_000), learning_rate_for(1_000)
    (0.003, 0.0015, 0.01)
    """
    if trainable_values < 1:
        raise ValueError(f"trainable_values={trainable_values!r} must be >= 1.")
    low, high = LEARNING_RATE_RANGE
    return min(high, max(low, REFERENCE_LEARNING_RATE * math.sqrt(REFERENCE_VALUES / trainable_values)))


def recommended_learning_rate(model: nn.Module, adapter_name: str = "default") -> float:
    """The AdamW learning rate the accuracy-memory front recommends for adapter ``adapter_name`` of
    ``model`` (a `peft.PeftModel` with TraDy adapters, or its `TraDyModel`), from the number of values
    its bank trains (`learning_rate_for`).

    Example:
        ```python
        model = get_peft_model(base, trady_peft.TraDyConfig(memory_budget="16MiB"))
        args = TrainingArguments(..., learning_rate=trady_peft.recommended_learning_rate(model))
        ```

    Raises:
        ValueError: the adapter's bank holds no value yet (a ``step_memory`` adapter before the first
            forward sizes it: call it after ``model.base_model.probe(batch)``), or ``adapter_name`` is unknown.
    """
    tuner = find_tuner(model)
    if adapter_name not in tuner.trady_bank:
        raise ValueError(
            f"recommended_learning_rate: adapter {adapter_name!r} is not a TraDy adapter of this model; pass one of "
            f"{sorted(tuner.trady_bank)}."
        )
    values = bank_numel(tuner.trady_bank[adapter_name].weight)
    if values < 1:
        raise ValueError(
            f"recommended_learning_rate: adapter {adapter_name!r}'s bank holds no trainable value yet (it is sized "
            "once the first forward prices the step); call model.base_model.probe(batch) first."
        )
    return learning_rate_for(values)


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float | None = None,
    head_lr: float | None = None,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters with the rates the accuracy-memory front
    recommends: each TraDy adapter's bank at ``lr`` (None: its `recommended_learning_rate`), the
    ``modules_to_save`` copies (a fresh classifier head) at ``head_lr`` (None:
    `HEAD_LEARNING_RATE`), any other trainable parameter at ``lr`` (None: the first bank's rate).
    ``kwargs`` go to ``optimizer_cls`` (``weight_decay``, ``betas``, ...).

    Example:
        ```python
        model = get_peft_model(base, trady_peft.TraDyConfig(memory_budget="8MiB", modules_to_save=["classifier"]))
        trainer = Trainer(model=model, args=args, optimizers=(trady_peft.create_optimizer(model), None),
                          callbacks=[trady_peft.TraDyCallback()])  # the Trainer adds its scheduler
        ```

    Raises:
        ValueError: ``model`` holds no TraDy adapter, a rate is not positive, or a bank holds no value yet
            (see `recommended_learning_rate`).
    """
    for name, rate in (("lr", lr), ("head_lr", head_lr)):
        if rate is not None and not rate > 0:
            raise ValueError(f"create_optimizer: {name}={rate!r} must be a positive learning rate, or None.")
    tuner = find_tuner(model)
    groups: list[dict] = []
    taken: set[int] = set()
    for name, bank in tuner.trady_bank.items():
        if bank.weight.requires_grad:
            rate = lr if lr is not None else recommended_learning_rate(model, name)
            groups.append({"params": [bank.weight], "lr": rate})
            taken.add(id(bank.weight))
    if not groups:
        raise ValueError(
            "create_optimizer: no TraDy adapter of this model trains (no bank requires a gradient); build it with "
            "peft.get_peft_model(model, trady_peft.TraDyConfig(...)) and keep an adapter active."
        )
    saved = {
        id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.modules_to_save.parameters()
    }
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    head = [p for p in trainable if id(p) in saved]
    rest = [p for p in trainable if id(p) not in saved]
    if head:
        groups.append({"params": head, "lr": HEAD_LEARNING_RATE if head_lr is None else head_lr})
    if rest:
        groups.append({"params": rest, "lr": groups[0]["lr"] if lr is None else lr})
    return optimizer_cls(groups, lr=groups[0]["lr"], **kwargs)
