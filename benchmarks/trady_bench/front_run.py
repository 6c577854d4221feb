"""The front on one task: LoRA r=8's step memory sets the budgets, every point's step memory is
measured, a learning-rate sweep on the first seed picks each point's rate, the other seeds train
at it."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .accuracy import run_grid
from .aggregate import diverged
from .front import REFERENCE, FrontGrid, budgets_from, front_methods
from .memory import measure_memory
from .methods import Method, checkpointable, lora_targets_at, lora_targets_of, target_layers
from .resources import cpu_seconds
from .sweep import best_lr, lr_grid
from .tasks import Task
from .training import evaluate_model, train_mode

OPTIMIZER = "adamw"


def front_memory(task: Task, methods: Sequence[Method], lora: list[str], reference: dict) -> list[dict]:
    """The measured step memory of every point (AdamW). A checkpointed point also holds, while the
    backward pass recomputes a block, that block's activations: its ``step_total_bytes`` adds the
    largest block's saved activations of the same method without checkpointing (``reference``,
    LoRA r=8), as ``checkpoint_recompute_bytes``. A budget that covers every candidate channel of a
    strategy (trady_peft then trains them all: full fine-tuning of those layers) leaves its point
    out, with a note on the task."""
    rows = []
    for m in methods:
        try:
            row = reference if m == REFERENCE else measure_memory(task, m, lora, OPTIMIZER)
        except ValueError as error:
            if "covers every candidate channel" not in str(error):
                raise
            task.notes.append(f"{m.name} at {m.budget:,} B left out: the budget covers every candidate channel")
            continue
        if m.checkpointing:
            row["checkpoint_recompute_bytes"] = reference["largest_block_saved_bytes"]
            row["step_total_bytes"] += row["checkpoint_recompute_bytes"]
        rows.append(row)
    return rows


def run_front(task: Task, grid: FrontGrid, log=print, jobs: int = 1, spec: tuple[str, dict] | None = None) -> dict:
    """The front on one task: memory, the learning-rate sweep (first seed), the other seeds.

    A checkpointed LoRA point trains exactly as LoRA at its rank (checkpointing recomputes the same
    forward): its records are that point's, under its own name, marked ``trained_as``."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    targets = target_layers(task)
    lora = lora_targets_of(task, len(targets))
    reference = measure_memory(task, REFERENCE, lora, OPTIMIZER)
    budgets = budgets_from(reference["step_total_bytes"], grid.fractions)
    model = task.build()
    methods = front_methods(grid, budgets, checkpointable(model) is not None)
    for rank in grid.ranks:
        if len(kept := lora_targets_at(model, lora, rank)) < len(lora):
            task.notes.append(
                f"LoRA r={rank} wraps {len(kept)} of the {len(lora)} layers LoRA r={REFERENCE.rank} wraps: grouped "
                f"convs whose groups do not divide {rank} are left out"
            )
    if grid.checkpointing and not any(m.checkpointing for m in methods):
        task.notes.append("no LoRA point with gradient checkpointing: the model does not support it")
    memory = front_memory(task, methods, lora, reference)
    log(
        f"[{task.name}] budgets {budgets} B, {len(methods)} points, memory measured ({time.perf_counter() - t0:.0f} s)"
    )
    measured = {(r["method"], r["budget_bytes"]) for r in memory}
    trained = [m for m in methods if not m.checkpointing and (m.row_name, m.budget) in measured]
    first, others = grid.seeds[0], grid.seeds[1:]
    untrained = evaluate_model(task, train_mode(task.build()))  # the reference a diverged run ends far above

    def train(runs):
        records = run_grid(task, runs, lora, jobs, spec, OPTIMIZER)
        for r in records:
            r["diverged"] = r["diverged"] or diverged(r, untrained)
        return records

    sweep_records = train([(m, first, lr) for m in trained for lr in lr_grid(m.row_name)])
    sweep = {
        (m.row_name, m.budget): best_lr(
            [r for r in sweep_records if (r["method"], r["budget_bytes"]) == (m.row_name, m.budget)]
        )
        for m in trained
    }
    lr_of = {k: s["lr"] for k, s in sweep.items()}
    log(f"[{task.name}] sweep done ({time.perf_counter() - t0:.0f} s): {lr_of}")
    records = [r for r in sweep_records if r["lr"] == lr_of[(r["method"], r["budget_bytes"])]]
    records += train([(m, seed, lr_of[(m.row_name, m.budget)]) for m in trained for seed in others])
    for m in methods:
        if m.checkpointing and (m.row_name, m.budget) in measured:
            twin = Method("lora", rank=m.rank).row_name
            records += [{**r, "method": m.row_name, "trained_as": twin} for r in records if r["method"] == twin]
    mem = {(r["method"], r["budget_bytes"]): r for r in memory}
    for r in records:
        row = mem[(r["method"], r["budget_bytes"])]
        r.update(saved_activation_bytes=row["saved_activation_bytes"], step_total_bytes=row["step_total_bytes"])
    elapsed = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    log(f"[{task.name}] front done: {elapsed}")
    return {
        "records": records,
        "memory": memory,
        "sweep": [{"method": k[0], "budget_bytes": k[1], **s} for k, s in sweep.items()],
        "sweep_records": sweep_records,
        "budgets": budgets,
        "fractions": list(grid.fractions),
        "strategies": list(grid.strategies),
        "seeds": list(grid.seeds),
        "reference_step_bytes": reference["step_total_bytes"],
        "untrained": untrained,
        "optimizer": OPTIMIZER,
        "max_grad_norm": task.max_grad_norm,
        "elapsed": elapsed,
        "title": task.title,
        "notes": task.notes,
        "lora_targets": len(lora),
        "target_layers": len(targets),
    }
