"""The time of a training step per method, relative to LoRA and to full fine-tuning, and the cost
of a redraw for the strategies that redraw."""

from __future__ import annotations

import statistics
import time

import trady_peft

from .methods import Method, build_method
from .tasks import Task
from .training import epoch_order, make_optimizer, start_period, train_mode, train_step


def measure_speed(task: Task, methods: list[Method], lora_targets: list[str], steps: int, warmup: int = 1) -> list:
    """Time per training step, methods interleaved step by step in this process (groups that each
    hold LoRA and full fine-tuning, so both ratios come from the same rounds). Median of ``steps``
    timed rounds after ``warmup``. For the dynamic strategies, also the time of a redraw
    (`trady_peft.next_period`, scoring included for the Det-RGN strategies), median of 3."""
    references = [m for m in methods if m.name in ("lora", "full")]
    others = [m for m in methods if m.name not in ("lora", "full")]
    group_size = task.speed_group_size
    rows = []
    for start in range(0, len(others), group_size):
        group = references + others[start : start + group_size]
        models, optimizers = {}, {}
        for m in group:
            model = train_mode(build_method(task, m, 0, lora_targets))
            optimizer, _ = make_optimizer(task, model, 10)
            for g in optimizer.param_groups:
                g["lr"] = 0.0  # timing only: the weights do not move (every step costs the same)
            if m.is_trady:
                start_period(model, task, optimizer, 0, 0)
            models[m], optimizers[m] = model, optimizer
        times: dict[Method, list[float]] = {m: [] for m in group}
        order = epoch_order(task, 0, 0)
        for i in range(warmup + steps):
            batch = task.batch(order[i % len(order)][: task.speed_batch_size])
            for m in group:
                t0 = time.perf_counter()
                train_step(models[m], batch, optimizers[m])
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[m].append(dt)
        medians = {m: statistics.median(t) for m, t in times.items()}
        for m in group:
            if m in references and start > 0:
                continue
            row = {
                "task": task.name,
                "method": m.name,
                "budget_bytes": m.budget,
                "step_seconds_median": medians[m],
                "timed_steps": len(times[m]),
                "timed_batch_rows": len(batch["labels"]),
                "step_time_ratio_to_lora": medians[m] / medians[references[0]],
                "step_time_ratio_to_full": medians[m] / medians[references[1]],
            }
            if m.is_trady and trady_peft.find_tuner(models[m]).peft_config["default"].redraws:
                redraws = []
                for epoch in range(1, 4):
                    t0 = time.perf_counter()
                    start_period(models[m], task, optimizers[m], 0, epoch)
                    redraws.append(time.perf_counter() - t0)
                row["redraw_seconds_median"] = statistics.median(redraws)
                row["redraw_to_step_ratio"] = row["redraw_seconds_median"] / medians[m]
            rows.append(row)
        del models, optimizers
    return rows
