"""The accuracy-memory front: which points it traces, the budgets they get, and their families.

Every point is a method at one memory level: peft LoRA at several ranks (and r=8 with gradient
checkpointing), the TraDy-family strategies at byte budgets that are fractions of LoRA r=8's
measured step memory (and at the smaller budgets with gradient checkpointing too, optionally at
another ``bank_share`` as well), head-only and full fine-tuning. A checkpointed point trains
exactly as its twin without checkpointing (tests/memory/test_checkpointing.py): only its memory
differs. The Det-RGN strategies are left out: their scoring pass (chunked, within the budget) adds
forward and backward passes each period that one measured training step does not show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
        checkpointed_fractions: the budgets (of ``fractions``) at which every strategy also runs
            with gradient checkpointing, where the model supports it.
        edge_steps: how many more learning rates the sweep tries, one at a time, past the edge of
            its range where a point's best lies.
        bank_share: another ``TraDyConfig.bank_share`` (the share of a byte budget for the
            trainable bank; the rest bounds the selected channels' saved inputs, which gradient
            checkpointing holds only while a block is recomputed), or None. Where the model supports
            checkpointing, each strategy of ``bank_share_strategies`` at each budget of
            ``bank_share_fractions`` then runs with it, with checkpointing and without (its twin,
            which trains for both and whose largest block the checkpointed point pays).
        bank_share_fractions: the budgets (of ``fractions``) of the ``bank_share`` points.
        bank_share_strategies: the strategies (of ``strategies``) of the ``bank_share`` points.
    """

    ranks: tuple[int, ...] = (1, 4, 8, 16)
    fractions: tuple[float, ...] = (0.05, 0.15, 0.4, 1.0)
    strategies: tuple[str, ...] = ("trady", "medyate")
    seeds: tuple[int, ...] = (0, 42, 100)
    checkpointing: bool = True
    checkpointed_fractions: tuple[float, ...] = (0.05, 0.15, 0.4)
    edge_steps: int = 2
    bank_share: float | None = None
    bank_share_fractions: tuple[float, ...] = ()
    bank_share_strategies: tuple[str, ...] = ()


#: The front of each preset: the full one, and a reduced one for ``make bench-quick`` (LoRA ranks 1 and
#: 8, three budgets up to 0.35x, each also checkpointed, one rate past an edge: 15 minutes on 2 idle cores).
FRONT_GRIDS = {
    "quick": FrontGrid(
        ranks=(1, 8),
        fractions=(0.05, 0.2, 0.35),
        seeds=(0, 42, 100),
        checkpointed_fractions=(0.05, 0.2, 0.35),
        edge_steps=1,
    ),
    "full": FrontGrid(edge_steps=1),
}

#: The reference every budget and memory ratio is taken against.
REFERENCE = Method("lora", rank=LORA_RANK)


def budgets_from(lora_step_bytes: int, fractions: Sequence[float]) -> list[int]:
    """The byte budgets: ``fractions`` of LoRA r=8's measured step memory."""
    return [int(lora_step_bytes * f) for f in fractions]


def front_methods(grid: FrontGrid, budgets: Sequence[int], checkpointing: bool) -> list[Method]:
    """The points of the front (``budgets``: one per fraction of ``grid``): LoRA at every rank,
    every strategy at every budget, head-only and full fine-tuning; when ``checkpointing`` (the
    model supports it), LoRA r=8 and every strategy at the budgets of ``checkpointed_fractions``
    with checkpointing too, after their twins; then the ``bank_share`` points (`FrontGrid`), twins
    first."""
    methods = [Method("lora", rank=r) for r in grid.ranks]
    if checkpointing and grid.checkpointing:
        methods.append(Method("lora", rank=LORA_RANK, checkpointing=True))
    methods += [Method(s, b) for s in grid.strategies for b in budgets]
    if checkpointing:
        small = [b for f, b in zip(grid.fractions, budgets, strict=True) if f in grid.checkpointed_fractions]
        methods += [Method(s, b, checkpointing=True) for s in grid.strategies for b in small]
    if checkpointing and grid.bank_share is not None:
        shared = [b for f, b in zip(grid.fractions, budgets, strict=True) if f in grid.bank_share_fractions]
        twins = [Method(s, b, bank_share=grid.bank_share) for s in grid.bank_share_strategies for b in shared]
        methods += twins + [replace(m, checkpointing=True) for m in twins]
    return methods + [Method("head"), Method("full")]


def family(row_name: str) -> str:
    """The line a point belongs to on the plot: ``lora``, ``lora-gc``, a strategy (``-gc``: with
    checkpointing), ``head`` or ``full``."""
    if row_name.startswith("lora"):
        return "lora-gc" if row_name.endswith("-gc") else "lora"
    return row_name


def is_lora(row_name: str) -> bool:
    """Whether a point is one of LoRA's (any rank, with or without checkpointing)."""
    return family(row_name) in ("lora", "lora-gc")
