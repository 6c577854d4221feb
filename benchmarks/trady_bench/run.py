"""The whole protocol on one task (memory, speed, FLOPs, accuracy grid, artifact), and a FLOP recount
of a finished run."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from .accuracy import run_grid
from .aggregate import diverged
from .artifact import measure_artifact
from .environment import environment
from .flops import count_flops
from .journal import RunJournal
from .memory import measure_memory
from .methods import Method, grid, lora_targets_of, target_layers, task_budgets
from .resources import cpu_seconds
from .speed import measure_speed
from .tasks import Task
from .training import evaluate_model, train_mode

SEEDS = (0, 42, 100)  # the paper's seeds


def run_task(
    task: Task,
    preset: dict,
    log=print,
    seeds: Sequence[int] = SEEDS,
    jobs: int = 1,
    spec: tuple[str, dict] | None = None,
    journal: RunJournal | None = None,
) -> dict:
    """The whole protocol on one task: memory, speed, FLOPs, accuracy grid, artifact.

    ``jobs`` > 1 trains the accuracy grid in that many worker processes (one torch thread each),
    which rebuild the task from ``spec`` = ``(task name, preset sizes)``; everything timed or
    measured step by step (memory, speed, FLOPs) runs in this process before them. A run that
    ``journal`` holds (an interrupted run's) is not trained again."""
    t0, c0 = time.perf_counter(), cpu_seconds()

    def since() -> str:
        return f"{time.perf_counter() - t0:.0f} s, CPU {cpu_seconds() - c0:.0f} s"

    targets = target_layers(task)
    lora = lora_targets_of(task, len(targets))
    budgets = task_budgets(task)
    methods = grid(budgets)
    log(
        f"[{task.name}] {len(targets)} target layers, budgets {budgets} B, {len(methods)} methods x {len(seeds)} seeds"
    )
    memory = [measure_memory(task, m, lora) for m in methods]
    log(f"[{task.name}] memory measured ({since()})")
    speed = measure_speed(task, methods, lora, preset["speed_steps"])
    log(f"[{task.name}] speed measured ({since()})")
    task.notes.extend(count_flops(task, methods, lora, speed))
    log(f"[{task.name}] FLOPs counted ({since()})")
    records = []
    mem = {(r["method"], r["budget_bytes"]): r for r in memory}
    spd = {(r["method"], r["budget_bytes"]): r for r in speed}
    untrained = evaluate_model(task, train_mode(task.build()))  # the reference a diverged run ends far above
    runs = [(m, seed, None) for m in methods for seed in seeds]
    for (m, seed, _), r in zip(runs, run_grid(task, runs, lora, jobs, spec, journal=journal)):
        k = (m.name, m.budget)
        r["diverged"] = r["diverged"] or diverged(r, untrained)
        r.update(
            saved_activation_bytes=mem[k]["saved_activation_bytes"],
            trainable_state_bytes=mem[k]["trainable_state_bytes"],
            step_time_ratio_to_lora=spd[k]["step_time_ratio_to_lora"],
            step_time_ratio_to_full=spd[k]["step_time_ratio_to_full"],
        )
        records.append(r)
        if seed == seeds[-1]:
            log(f"[{task.name}] {m.key}: {[round(r[task.metric], 4) for r in records[-len(seeds) :]]} ({since()})")
    artifact = measure_artifact(task, budgets[0], preset["artifact_epochs"], lora)
    log(f"[{task.name}] artifact measured ({since()})")
    elapsed = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    log(f"[{task.name}] done: {elapsed}")
    return {
        "records": records,
        "memory": memory,
        "speed": speed,
        "artifact": artifact,
        "elapsed": elapsed,
        "title": task.title,
        "notes": task.notes,
        "lora_targets": len(lora),
        "target_layers": len(targets),
        "budgets": budgets,
        "untrained": untrained,
        "lr": task.lr,
        "max_grad_norm": task.max_grad_norm,
    }


def recount_flops(raw: Path, task: Task, command: str) -> None:
    """Recount the FLOPs of a finished run (``raw/<name>.json``) with this version of
    `count_flops`, recording the command that did (FLOP counts do not depend on timing)."""
    result = json.loads(raw.read_text())
    methods = [Method(r["method"], r["budget_bytes"]) for r in result["speed"]]
    lora = lora_targets_of(task)
    notes = count_flops(task, methods, lora, result["speed"])
    result["notes"] = [n for n in result["notes"] if not n.startswith("weight-derivative FLOPs")] + notes
    result["flops_recounted"] = {"command": command, "date": environment(command, 0)["date"]}
    raw.write_text(json.dumps(result, default=float) + "\n")
