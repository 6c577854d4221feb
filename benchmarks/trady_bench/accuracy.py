"""The accuracy grid: each ``(method, seed, learning rate)`` trained for the task's epochs, in this process or in
worker processes, with its final metric and what the run cost."""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

import trady_peft

from .environment import quiet
from .journal import RunJournal
from .methods import Method, build_method
from .resources import PeakRSS
from .tasks import TASKS, Task
from .training import (
    HEAD_LR,
    OPTIMIZER_STATE_BYTES,
    epoch_order,
    evaluate_model,
    make_optimizer,
    start_period,
    starts_period,
    train_mode,
    train_step,
)


def run_one(
    task: Task, method: Method, seed: int, lora_targets: list[str], lr: float | None = None, optimizer: str = "sgd"
) -> dict:
    """Train ``method`` with ``seed`` for ``task.epochs`` epochs with ``optimizer`` at learning rate
    ``lr`` (None: ``task.lr``); its final metric and run figures."""
    kind, lr = optimizer, task.lr if lr is None else lr
    with PeakRSS() as rss:
        start_cpu, start = time.process_time(), time.perf_counter()
        model = train_mode(
            build_method(task, method, seed, lora_targets, optimizer_state_bytes=OPTIMIZER_STATE_BYTES[kind])
        )
        total = task.epochs * task.steps_per_epoch
        head_lr = HEAD_LR if kind == "adamw" else None  # the AdamW front's fresh head: its own rate
        optimizer, scheduler = make_optimizer(task, model, total, kind, lr, head_lr)
        losses, periods = [], 0
        for epoch in range(task.epochs):
            for i, rows in enumerate(epoch_order(task, seed, epoch)):
                if method.is_trady and starts_period(task, kind, len(losses), i):
                    start_period(model, task, optimizer, seed, epoch, periods)
                    periods += 1
                losses.append(train_step(model, task.batch(rows), optimizer, scheduler, task.max_grad_norm))
        value = evaluate_model(task, model)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    record = {
        "task": task.name,
        "method": method.row_name,
        "budget_bytes": method.budget,
        "seed": seed,
        "optimizer": kind,
        "lr": lr,
        "head_lr": head_lr if len(optimizer.param_groups) > 1 else None,
        task.metric: value,
        "final_train_loss": losses[-1],
        "diverged": not all(math.isfinite(x) for x in losses) or not math.isfinite(value),  # refined by run_task
        "epochs": task.epochs,
        "periods": periods if method.is_trady else None,
        "steps": total,
        "peak_rss_growth_bytes": rss.growth,
        "wall_seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
    }
    if method.is_trady:
        summary = trady_peft.find_tuner(model).selection_summary()
        record["touched_channels"] = summary["touched_channels"]
        record["selected_channels"] = summary["selected_channels"]
        record["total_channels"] = summary["total_channels"]
    del model, optimizer
    return record


# Worker processes of the accuracy grid: each builds the task once (data, pretrained model).
_WORKER_TASK: Task | None = None


def _start_worker(name: str, sizes: dict) -> None:
    global _WORKER_TASK
    torch.set_num_threads(1)  # one thread per process: small batches scale poorly across threads
    quiet()
    _WORKER_TASK = TASKS[name](sizes)


def _run_in_worker(method: Method, seed: int, lora_targets: list[str], lr: float | None, optimizer: str) -> dict:
    return run_one(_WORKER_TASK, method, seed, lora_targets, lr, optimizer)


def run_grid(
    task: Task,
    runs: list[tuple[Method, int, float | None]],
    lora_targets: list[str],
    jobs: int,
    spec: tuple[str, dict] | None,
    optimizer: str = "sgd",
    journal: RunJournal | None = None,
) -> list[dict]:
    """`run_one` for every ``(method, seed, lr)`` of ``runs``, in order: in this process, or spread
    over ``jobs`` spawned processes that rebuild the task from ``spec`` (the same data and weights:
    the subsets and the pretrained model are fixed). A run that ``journal`` holds is not trained
    again; each run trained is added to it as it ends."""
    records: list[dict | None] = [
        journal.find(m.row_name, m.budget, seed, optimizer, task.lr if lr is None else lr) if journal else None
        for m, seed, lr in runs
    ]
    todo = [i for i, r in enumerate(records) if r is None]

    def finished(i: int, record: dict) -> None:
        records[i] = record
        if journal is not None:
            journal.add(record)

    if jobs <= 1 or spec is None:
        for i in todo:
            m, seed, lr = runs[i]
            finished(i, run_one(task, m, seed, lora_targets, lr, optimizer))
        return records
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=spec) as pool:
        futures = {pool.submit(_run_in_worker, *runs[i][:2], lora_targets, runs[i][2], optimizer): i for i in todo}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    return records
