"""The learning rate the accuracy-memory front recommends for a TraDy adapter trained with AdamW.

A TraDy adapter trains its bank's values from zero every period. With AdamW each value moves by
about the learning rate per step, whatever its gradient's scale, so the more values a budget
trains, the smaller the rate that trains them well. `recommended_learning_rate` follows that, with
one rule per kind of model (`model_kind`, `LEARNING_RATE_RULES`):

    causal LM:   lr = 3e-3 * (500,000 / values) ** 0.75, clipped to [1e-4, 1e-2]
    classifier:  lr = 3e-3 * (360,000 / values),     clipped to [1e-4, 3e-3]

A classifier's bank trains beside a fresh head at its own rate (`HEAD_LEARNING_RATE`, through
`create_optimizer`), and its best rates lie below a causal LM's: a large classifier bank collapses
at a rate a causal LM's bank of its size trains well (EfficientNet-Lite0, 958,346 values: 0.48
accuracy at 3e-3 against 0.75 at 3e-4). The classifier rule was fitted to the full accuracy-memory
front (docs/benchmarks.md, `make bench`: TraDy and MeDyate at budgets from 0.05x to 1x LoRA r=8's
step memory, the best rate of each point's sweep: within a factor 1.1 at the median, 3.8 at most);
the causal-LM rule to SmolLM2's points on the full and the quick front (`make bench-quick`):
within a factor 1.4 at the median, 2.2 at most.
`benchmarks/learning_rate_rule.py` prints rule against best for each point.
The Trainer's default (5e-5) trains a TraDy bank far too slowly.

A fresh classifier head (``modules_to_save``) wants a larger rate than the bank, how much larger
depending on the run. The head alone trained best at 3e-2 on the front's image task (0.718 against
0.705 at 1e-2), at 1e-2 on its text task (0.719 against 0.702 at 3e-2), and at 3e-3 in the
quickstart's longer run (189 steps on 64x64 images: 0.740 in the README's run, 0.714 at 1e-2,
0.700 at 3e-2), where TraDy gave 0.854, 0.845 and 0.831 with its head at those rates.
`HEAD_LEARNING_RATE` (1e-2) lies within 0.026 of the best head rate tried in each;
`create_optimizer` builds the optimizer with both rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .core.distributed import bank_numel
from .model import find_tuner, is_causal_lm


@dataclass(frozen=True)
class LearningRateRule:
    """``rate * (values / trainable values) ** exponent``, clipped to ``[low, high]``."""

    values: int
    rate: float
    exponent: float
    low: float
    high: float

    def __call__(self, trainable_values: int) -> float:
        if trainable_values < 1:
            raise ValueError(f"trainable_values={trainable_values!r} must be >= 1.")
        rate = self.rate * (self.values / trainable_values) ** self.exponent
        return min(self.high, max(self.low, rate))


#: The rule by the kind of model (`model_kind`), fitted to the accuracy-memory front (module docstring).
LEARNING_RATE_RULES = {
    "causal_lm": LearningRateRule(values=500_000, rate=3e-3, exponent=0.75, low=1e-4, high=1e-2),
    "classifier": LearningRateRule(values=360_000, rate=3e-3, exponent=1.0, low=1e-4, high=3e-3),
}
#: AdamW's rate for a fresh classifier head (``modules_to_save``): within 0.026 accuracy of the best
#: head rate tried on the front's image and text tasks and in the quickstart (module docstring).
HEAD_LEARNING_RATE = 1e-2
#: `trady_peft.TraDyCallback` warns when an Adam-family optimizer's rate is more than this factor off.
LEARNING_RATE_TOLERANCE = 4.0


def learning_rate_for(trainable_values: int, kind: str) -> float:
    """The rule of ``kind`` (``"causal_lm"`` or ``"classifier"``) for a bank of ``trainable_values``.

    >>> learning_rate_for(500_000, "causal_lm"), learning_rate_for(8_000_000, "causal_lm")
    (0.003, 0.000375)
    >>> learning_rate_for(360_000, "classifier"), learning_rate_for(1_440_000, "classifier")
    (0.003, 0.00075)
    """
    if kind not in LEARNING_RATE_RULES:
        raise ValueError(f"learning_rate_for: kind={kind!r}; choose one of {tuple(LEARNING_RATE_RULES)}.")
    return LEARNING_RATE_RULES[kind](trainable_values)


def model_kind(model: nn.Module) -> str:
    """Which rule a model's banks follow: ``"causal_lm"`` for a model that generates text (its
    ``can_generate()``), ``"classifier"`` for any other (a fresh head beside the bank)."""
    return "causal_lm" if is_causal_lm(find_tuner(model).model) else "classifier"


def recommended_learning_rate(model: nn.Module, adapter_name: str = "default") -> float:
    """The AdamW learning rate the accuracy-memory front recommends for adapter ``adapter_name`` of
    ``model`` (a `peft.PeftModel` with TraDy adapters, or its `TraDyModel`), from the number of values
    its bank trains and the kind of model (`learning_rate_for`, `model_kind`).

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
    return learning_rate_for(values, model_kind(tuner))


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
