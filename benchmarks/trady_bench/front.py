"""The accuracy-memory front: which points it traces, the budgets they get, and their families.

Every point is a method at one memory level: peft LoRA at several ranks (and r=8 with gradient
checkpointing), the TraDy-family strategies at byte budgets that are fractions of LoRA r=8's
measured step memory, head-only and full fine-tuning. The Det-RGN oracles are left out: their
scoring computes every candidate channel's dense gradient, memory that one measured training step
does not show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .methods import LORA_RANK, Method


@dataclass(frozen=True)
class FrontGrid:
    """The shape of a front (one per preset).

    Attributes:
        ranks: LoRA ranks (alpha = 2 x rank).
        fractions: the TraDy-family budgets, as fractions of LoRA r=8's measured step memory.
        strategies: the TraDy-family strategies traced at every budget.
        seeds: the seeds of every point; the first one also runs the learning-rate sweep.
        checkpointing: also LoRA r=8 with gradient checkpointing, where the model supports it.
    """

    ranks: tuple[int, ...] = (1, 4, 8, 16)
    fractions: tuple[float, ...] = (0.05, 0.15, 0.4, 1.0)
    strategies: tuple[str, ...] = ("trady", "medyate")
    seeds: tuple[int, ...] = (0, 42, 100)
    checkpointing: bool = True


#: The front of each preset: the full one, and a reduced one for ``make bench-quick`` (LoRA ranks 1, 8
#: and 16, three budgets, two seeds) that fits its 20 minutes.
FRONT_GRIDS = {
    "quick": FrontGrid(ranks=(1, 8, 16), fractions=(0.05, 0.2, 1.0), seeds=(0, 42)),
    "full": FrontGrid(),
}

#: The reference every budget and memory ratio is taken against.
REFERENCE = Method("lora", rank=LORA_RANK)


def budgets_from(lora_step_bytes: int, fractions: Sequence[float]) -> list[int]:
    """The byte budgets: ``fractions`` of LoRA r=8's measured step memory."""
    return [int(lora_step_bytes * f) for f in fractions]


def front_methods(grid: FrontGrid, budgets: Sequence[int], checkpointing: bool) -> list[Method]:
    """The points of the front: LoRA at every rank (and r=8 with checkpointing when
    ``checkpointing``), every strategy at every budget, head-only and full fine-tuning."""
    methods = [Method("lora", rank=r) for r in grid.ranks]
    if checkpointing and grid.checkpointing:
        methods.append(Method("lora", rank=LORA_RANK, checkpointing=True))
    methods += [Method(s, b) for s in grid.strategies for b in budgets]
    return methods + [Method("head"), Method("full")]


def family(row_name: str) -> str:
    """The line a point belongs to on the plot: ``lora``, ``lora-gc``, a strategy, ``head`` or ``full``."""
    if row_name.startswith("lora"):
        return "lora-gc" if row_name.endswith("-gc") else "lora"
    return row_name


def is_lora(row_name: str) -> bool:
    """Whether a point is one of LoRA's (any rank, with or without checkpointing)."""
    return family(row_name) in ("lora", "lora-gc")
