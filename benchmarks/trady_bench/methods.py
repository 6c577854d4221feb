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
    """A row of the grid: a strategy at a budget, or a budget-free baseline.

    ``rank`` sets LoRA's rank (None: `LORA_RANK`); ``checkpointing`` turns transformers' gradient
    checkpointing on (LoRA or a strategy); ``bank_share`` sets a strategy's ``TraDyConfig.bank_share``
    (None: its default). A LoRA row with either of the first two, and a strategy with either of the
    last two, is recorded under its own name (`row_name`)."""

    name: str
    budget: int | None = None  # bytes
    rank: int | None = None
    checkpointing: bool = False
    bank_share: float | None = None

    @property
    def is_trady(self) -> bool:
        return self.name not in BASELINES

    @property
    def row_name(self) -> str:
        """What records, tables and plots call this row: the strategy or baseline name, for a
        LoRA row with an explicit rank ``lora-r<rank>``; ``-share<bank_share>`` appended with a bank
        share, then ``-gc`` with checkpointing (``medyate-share0.9-gc``)."""
        gc = "-gc" if self.checkpointing else ""
        if self.name != "lora":
            share = "" if self.bank_share is None else f"-share{self.bank_share:g}"
            return self.name + share + gc
        if self.rank is None and not self.checkpointing:
            return self.name
        return f"lora-r{self.rank or LORA_RANK}{gc}"

    @property
    def twin(self) -> Method:
        """The same method without checkpointing (which trains exactly as this one: checkpointing
        recomputes the same forward inside the backward pass)."""
        return Method(self.name, self.budget, self.rank, bank_share=self.bank_share)

    @property
    def key(self) -> str:
        return self.row_name if self.budget is None else f"{self.row_name}@{self.budget}"


def grid(budgets: Sequence[int]) -> list[Method]:
    """Every strategy at every budget, then LoRA, head-only and full fine-tuning."""
    return [Method(s, b) for b in budgets for s in STRATEGIES] + [Method(b) for b in BASELINES]


def base_name(row_name: str) -> str:
    """The strategy or baseline of a row name (`Method.row_name`): ``medyate-share0.9-gc`` ->
    ``medyate``, ``lora-r4-gc`` -> ``lora``."""
    if row_name.startswith("lora-"):
        return "lora"
    return row_name.removesuffix("-gc").partition("-share")[0]


def order_of(method: str) -> int:
    """Where ``method`` sorts in tables and plots: the strategies, then the baselines."""
    names = list(STRATEGIES) + list(BASELINES)
    method = base_name(method)
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


def lora_targets_at(model: nn.Module, targets: list[str], rank: int) -> list[str]:
    """The layers of ``targets`` that peft LoRA can wrap at ``rank``: a grouped convolution only
    when its groups divide the rank (`lora_targets_of` chose ``targets`` at `LORA_RANK`)."""
    return [n for n in targets if rank % getattr(model.get_submodule(n), "groups", 1) == 0]


def checkpointable(model: nn.Module) -> nn.Module | None:
    """The outermost module of ``model`` that supports transformers' gradient checkpointing (the
    model itself, or an encoder inside a task's wrapper), or None."""
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False) and hasattr(
            module, "gradient_checkpointing_enable"
        ):
            return module
    return None


def build_method(
    task: Task,
    method: Method,
    seed: int,
    lora_targets: list[str],
    frozen_path: bool = True,
    optimizer_state_bytes: int = 0,
) -> nn.Module:
    """A fresh model set up for ``method`` (its trainable parameters marked). ``frozen_path=False``
    turns TraDy's memory-saving frozen path off (`count_flops`: its twins recompute inside backward).
    ``optimizer_state_bytes`` is what the optimizer keeps per trained value, counted in TraDy's byte
    budget (0 for plain SGD, 8 for AdamW)."""
    model = task.build()
    torch.manual_seed(seed)
    if task.head:  # the seed draws the fresh head, as well as the channels and the data order
        model.get_submodule(task.head).reset_parameters()
    heads = [task.head] if task.head else None
    if method.checkpointing:
        inner = checkpointable(model)
        if inner is None:
            plain = (
                f"Method('lora', rank={method.rank or LORA_RANK})"
                if method.name == "lora"
                else f"Method({method.name!r}, {method.budget})"
            )
            raise ValueError(
                f"{method.row_name}: the {task.name} model holds no transformers model that supports gradient "
                f"checkpointing; use {plain} without checkpointing."
            )
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name warns)
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.is_trady:
        config = trady_peft.TraDyConfig(
            memory_budget=f"{method.budget}B",
            strategy=method.name,
            modules_to_save=heads,
            seed=seed,
            optimizer_state_bytes=optimizer_state_bytes,
            gradient_batches=task.gradient_batches,
            exclude_modules=task.exclude,
            memory_saving_frozen_path=frozen_path,
            **({} if method.bank_share is None else {"bank_share": method.bank_share}),
        )
        return get_peft_model(model, config)
    if method.name == "lora":
        rank = method.rank or LORA_RANK
        targets = lora_targets_at(model, lora_targets, rank)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=heads)
        return get_peft_model(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(method.name == "full" or name.startswith(task.head_only))
    return model
