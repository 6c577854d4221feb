"""The methods compared: the grid of strategies x budgets and the baselines, and a fresh model per method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import trady_peft
from trady_peft.report import lora_targets as lora_rank_targets
from trady_peft.selection.strategies import STRATEGIES

from .tasks import Task

#: The budget-free baselines: peft LoRA, the head alone, full fine-tuning.
BASELINES = ("lora", "head", "full")
LORA_RANK = 8


@dataclass(frozen=True)
class Method:
    """A row of the grid: a strategy at a budget, or a budget-free baseline."""

    name: str
    budget: int | None = None  # bytes

    @property
    def is_trady(self) -> bool:
        return self.name not in BASELINES

    @property
    def key(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget}"


def grid(budgets: Sequence[int]) -> list[Method]:
    """Every strategy at every budget, then LoRA, head-only and full fine-tuning."""
    return [Method(s, b) for b in budgets for s in STRATEGIES] + [Method(b) for b in BASELINES]


def order_of(method: str) -> int:
    """Where ``method`` sorts in tables and plots: the strategies, then the baselines."""
    names = list(STRATEGIES) + list(BASELINES)
    return names.index(method) if method in names else len(names)


def target_layers(task: Task) -> list[str]:
    """The layers TraDy wraps by default on this model (the targets LoRA gets too)."""
    config = trady_peft.TraDyConfig(
        channels_per_layer=1, modules_to_save=[task.head] if task.head else None, exclude_modules=task.exclude
    )
    model = get_peft_model(task.build(), config)
    return [n for n, _ in model.base_model.trady_layers()]


def task_budgets(task: Task) -> list[int]:
    """The two byte budgets: fractions of what training every candidate channel would cost."""
    model = task.build()
    accounting = trady_peft.memory_accounting(
        model, task.batch(slice(0, task.batch_size)), unit="bytes", optimizer_state_bytes=0
    )
    total = accounting.total_weights + accounting.total_activations
    return [int(total * f) for f in task.budget_fractions]


def lora_wrappable(model: nn.Module, names: list[str]) -> list[str]:
    """The layers of ``names`` whose class peft LoRA rebuilds correctly (torch's or transformers' own)."""
    keep = []
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)
        if type(module).__module__.startswith(("torch.nn", "transformers")):
            keep.append(name)
    return keep


def lora_targets_of(task: Task, n_targets: int | None = None) -> list[str]:
    """The target layers peft LoRA r=8 can wrap (TraDy's targets less those it cannot); with
    ``n_targets`` (TraDy's count), a note on the task says how many are left out and why."""
    probe = build_method(task, Method("trady", 1 << 40), 0, [])  # not trained: only the LoRA-wrappable layers
    lora, skipped = lora_rank_targets(probe, LORA_RANK)
    plain = lora_wrappable(probe.base_model.model, lora)
    del probe
    if n_targets is not None and len(plain) < n_targets:
        task.notes.append(
            f"LoRA wraps {len(plain)} of the {n_targets} target layers: {len(skipped)} grouped convs whose groups "
            f"do not divide r={LORA_RANK}"
            + (f", {len(lora) - len(plain)} TF-same-padded convs" if len(plain) < len(lora) else "")
            + " are left out"
        )
    return plain


def build_method(
    task: Task, method: Method, seed: int, lora_targets: list[str], frozen_path: bool = True
) -> nn.Module:
    """A fresh model set up for ``method`` (its trainable parameters marked). ``frozen_path=False``
    turns TraDy's memory-saving frozen path off (`count_flops`: its twins recompute inside backward)."""
    model = task.build()
    torch.manual_seed(seed)
    if task.head:  # the seed draws the fresh head, as well as the channels and the data order
        model.get_submodule(task.head).reset_parameters()
    heads = [task.head] if task.head else None
    if method.is_trady:
        config = trady_peft.TraDyConfig(
            memory_budget=f"{method.budget}B",
            strategy=method.name,
            modules_to_save=heads,
            seed=seed,
            optimizer_state_bytes=0,  # plain SGD
            gradient_batches=task.gradient_batches,
            exclude_modules=task.exclude,
            memory_saving_frozen_path=frozen_path,
        )
        return get_peft_model(model, config)
    if method.name == "lora":
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=lora_targets, modules_to_save=heads)
        return get_peft_model(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(method.name == "full" or name.startswith(task.head_only))
    return model
