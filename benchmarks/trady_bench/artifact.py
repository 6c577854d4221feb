"""How the adapter's artifact (the union of channels touched, and its file) grows with epochs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trady_peft

from .methods import Method, build_method
from .tasks import Task
from .training import epoch_order, make_optimizer, start_period, train_mode, train_step


def measure_artifact(task: Task, budget: int, epochs: int, lora_targets: list[str]) -> dict:
    """E epochs of TraDy (one training step each: the union of channels does not depend on how long
    a period trains), the union of touched channels and the adapter file after each, against the
    uniform-sampling expectation 1 - prod_e (1 - rho_{l,e}) per layer (rho = the fraction of a
    candidate layer's channels drawn in epoch e)."""
    method = Method("trady", budget)
    model = train_mode(build_method(task, method, 0, lora_targets))
    optimizer, _ = make_optimizer(task, model, epochs)
    tuner = trady_peft.find_tuner(model)
    candidates = [n for n, _ in tuner.candidate_layers()]
    layers = dict(tuner.trady_layers("default"))
    widths = {n: layers[n].geometry.in_channels for n in candidates}
    untouched_prob = {n: 1.0 for n in candidates}
    rows = []
    with tempfile.TemporaryDirectory(prefix="trady-bench-") as tmp:
        for epoch in range(epochs):
            start_period(model, task, optimizer, 0, epoch)
            rows_idx = epoch_order(task, 0, epoch)[0]
            train_step(model, task.batch(rows_idx), optimizer)
            selected = {n: layers[n].trady_delta["default"].count for n in candidates}
            for n in candidates:
                untouched_prob[n] *= 1 - selected[n] / widths[n]
            touched = sum(layers[n].touched_channels("default") for n in candidates)
            total = sum(widths.values())
            rho = sum(selected.values()) / total
            model.save_pretrained(tmp)
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            rows.append(
                {
                    "epoch": epoch + 1,
                    "selected_channels": sum(selected.values()),
                    "touched_channels": touched,
                    "candidate_channels": total,
                    "touched_fraction": touched / total,
                    "rho": rho,
                    "expected_fraction_uniform": 1 - (1 - rho) ** (epoch + 1),
                    "expected_fraction_per_layer": sum(widths[n] * (1 - untouched_prob[n]) for n in candidates)
                    / total,
                    "adapter_file_bytes": size,
                }
            )
    return {"task": task.name, "budget_bytes": budget, "candidate_layers": len(candidates), "epochs": rows}
