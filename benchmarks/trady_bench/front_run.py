"""The front on one task: LoRA r=8's step memory sets the budgets, every point's step memory is
measured, a learning-rate sweep on the first seed picks each point's rate, the other seeds train
at it."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .accuracy import run_grid
from .aggregate import diverged
from .front import REFERENCE, FrontGrid, budgets_from, front_methods
from .journal import RunJournal
from .memory import measure_memory
from .methods import Method, checkpointable, lora_targets_at, lora_targets_of, target_layers
from .resources import cpu_seconds
from .sweep import best_lr, beyond, lr_grid
from .tasks import Task
from .training import evaluate_model, train_mode

OPTIMIZER = "adamw"


def front_memory(
    task: Task, methods: Sequence[Method], lora: list[str], reference: dict, measured: Sequence[dict] = ()
) -> list[dict]:
    """The measured step memory of every point of ``methods`` (AdamW). A checkpointed point also
    holds, while the backward pass recomputes a block, that block's activations: its
    ``step_total_bytes`` adds the largest block's saved activations of its twin without
    checkpointing (``reference`` for LoRA r=8; a row measured before it, or one of ``measured``),
    as ``checkpoint_recompute_bytes``; a checkpointed strategy must select the channels its twin
    does (it then trains as the twin). A budget that covers every candidate channel of a strategy
    (trady_peft then trains them all: full fine-tuning of those layers), or a checkpointed point
    whose twin is not measured, leaves its point out, with a note on the task."""
    rows: list[dict] = []
    done = {(r["method"], r["budget_bytes"]): r for r in [reference, *measured]}
    for m in methods:
        twin = done.get((m.twin.row_name, m.budget)) if m.checkpointing else None
        if m.checkpointing and twin is None:
            task.notes.append(
                f"{m.row_name} at {m.budget:,} B left out: its twin without checkpointing is not measured"
            )
            continue
        try:
            row = reference if m == REFERENCE else measure_memory(task, m, lora, OPTIMIZER)
        except ValueError as error:
            if "covers every candidate channel" not in str(error):
                raise
            task.notes.append(f"{m.name} at {m.budget:,} B left out: the budget covers every candidate channel")
            continue
        if twin is not None:
            if row.get("selected_channels") != twin.get("selected_channels"):
                raise RuntimeError(
                    f"{m.row_name} at {m.budget} B selects {row.get('selected_channels')} channels, its twin without "
                    f"checkpointing {twin.get('selected_channels')}: it would not train as the twin."
                )
            row["checkpoint_recompute_bytes"] = twin["largest_block_saved_bytes"]
            row["step_total_bytes"] += row["checkpoint_recompute_bytes"]
        done[(row["method"], row["budget_bytes"])] = row
        rows.append(row)
    return rows


def twin_records(methods: Sequence[Method], measured: set, records: list[dict]) -> list[dict]:
    """The records of every measured checkpointed point of ``methods``: its twin's records (the
    same training: checkpointing recomputes the same forward), under its own name, marked
    ``trained_as``."""
    out = []
    for m in methods:
        if m.checkpointing and (m.row_name, m.budget) in measured:
            key = (m.twin.row_name, m.budget)
            out += [
                {**r, "method": m.row_name, "trained_as": key[0]}
                for r in records
                if (r["method"], r["budget_bytes"]) == key
            ]
    return out


def run_front(
    task: Task,
    grid: FrontGrid,
    log=print,
    jobs: int = 1,
    spec: tuple[str, dict] | None = None,
    previous: dict | None = None,
    journal: RunJournal | None = None,
) -> dict:
    """The front on one task: memory, the learning-rate sweep (first seed), the other seeds.

    The sweep tries each point's `lr_grid`, then up to ``grid.edge_steps`` more rates, one at a
    time, past the edge its best lies at (`beyond`). A checkpointed point trains exactly as its
    twin without checkpointing (checkpointing recomputes the same forward): its records are the
    twin's (`twin_records`).

    ``previous``: a finished result of this task (the raw result of an earlier run, whose LoRA r=8
    step memory sets the budgets again); its memory rows, sweep runs and seeds' runs are kept, and
    only what it lacks runs (new points, rates the sweep now tries, seeds at a rate the sweep now
    picks).

    ``journal``: the runs an interrupted run of this task finished (`RunJournal`); they are not
    trained again, and each run trained is added to it."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    targets = target_layers(task)
    lora = lora_targets_of(task, len(targets))
    old_memory = list(previous["memory"]) if previous else []
    if previous:  # the same reference, so the same budget for a fraction both grids hold
        reference = next(r for r in old_memory if (r["method"], r["budget_bytes"]) == (REFERENCE.row_name, None))
        budgets = budgets_from(reference["step_total_bytes"], grid.fractions)
    else:
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
        task.notes.append("no point with gradient checkpointing: the model does not support it")
    known = {(r["method"], r["budget_bytes"]) for r in old_memory}
    fresh = [m for m in methods if (m.row_name, m.budget) not in known]
    memory = old_memory + front_memory(task, fresh, lora, reference, measured=old_memory)
    log(
        f"[{task.name}] budgets {budgets} B, {len(methods)} points, memory measured ({time.perf_counter() - t0:.0f} s)"
    )
    measured = {(r["method"], r["budget_bytes"]) for r in memory}
    trained = [m for m in methods if not m.checkpointing and (m.row_name, m.budget) in measured]
    first, others = grid.seeds[0], grid.seeds[1:]
    untrained = previous["untrained"] if previous else evaluate_model(task, train_mode(task.build()))

    def train(runs):
        records = run_grid(task, runs, lora, jobs, spec, OPTIMIZER, journal)
        for r in records:
            r["diverged"] = r["diverged"] or diverged(r, untrained)
        return records

    def done(records, m, seed, lr) -> bool:
        return any(
            (r["method"], r["budget_bytes"], r["seed"], r["lr"]) == (m.row_name, m.budget, seed, lr) for r in records
        )

    def runs_of(records, m) -> list[dict]:
        return [r for r in records if (r["method"], r["budget_bytes"]) == (m.row_name, m.budget)]

    sweep_records = (
        [r for r in previous["sweep_records"] if (r["method"], r["budget_bytes"]) in measured] if previous else []
    )
    sweep_records += train(
        [
            (m, first, lr)
            for m in trained
            for lr in lr_grid(m.row_name, m.budget)
            if not done(sweep_records, m, first, lr)
        ]
    )
    for _ in range(grid.edge_steps):  # one more rate past the edge the best lies at, while it does
        more = [
            (m, first, lr)
            for m in trained
            if (lr := beyond(best_lr(runs_of(sweep_records, m)), lr_grid(m.row_name, m.budget), grid.edge_steps))
            is not None
        ]
        if not more:
            break
        sweep_records += train([run for run in more if not done(sweep_records, *run)])
    sweep = {(m.row_name, m.budget): best_lr(runs_of(sweep_records, m)) for m in trained}
    lr_of = {k: s["lr"] for k, s in sweep.items()}
    log(f"[{task.name}] sweep done ({time.perf_counter() - t0:.0f} s): {lr_of}")
    records = [r for r in sweep_records if r["lr"] == lr_of[(r["method"], r["budget_bytes"])]]
    kept = [r for r in previous["records"] if not r.get("trained_as")] if previous else []
    kept = [r for r in kept if r["seed"] != first and lr_of.get((r["method"], r["budget_bytes"])) == r["lr"]]
    records += kept
    records += train(
        [
            (m, seed, lr_of[(m.row_name, m.budget)])
            for m in trained
            for seed in others
            if not done(kept, m, seed, lr_of[(m.row_name, m.budget)])
        ]
    )
    records += twin_records(methods, measured, records)
    mem = {(r["method"], r["budget_bytes"]): r for r in memory}
    for r in records:
        row = mem[(r["method"], r["budget_bytes"])]
        r.update(saved_activation_bytes=row["saved_activation_bytes"], step_total_bytes=row["step_total_bytes"])
    elapsed = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    log(f"[{task.name}] front done: {elapsed}")
    if previous:  # the task's results took both runs
        elapsed = {k: round(v + previous["elapsed"][k], 1) for k, v in elapsed.items()}
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
        "notes": task.notes,  # every run notes all that applies (an earlier run's notes may be worded otherwise)
        "lora_targets": len(lora),
        "target_layers": len(targets),
        "earlier_runs": [*previous.get("earlier_runs", []), previous["run"]] if previous else [],
    }
