"""The memory of one training step per method (`trady_peft.measure_training_step`), and TraDy's own
footprint against its budget."""

from __future__ import annotations

import torch

import trady_peft

from .methods import Method, build_method
from .tasks import Task
from .training import make_optimizer, start_period, train_mode


def measure_memory(task: Task, method: Method, lora_targets: list[str]) -> dict:
    """One measured training step (seed 0): saved activations, trainable + gradient + optimizer
    bytes, and for TraDy the adapter's own footprint (its bank and the saved inputs inside its
    layers) against the budget."""
    model = train_mode(build_method(task, method, 0, lora_targets))
    optimizer, _ = make_optimizer(task, model, 10)
    batch = task.batch(slice(0, task.batch_size))
    if method.is_trady:
        start_period(model, task, optimizer, 0, 0)
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    row = {
        "task": task.name,
        "method": method.name,
        "budget_bytes": method.budget,
        "saved_activation_bytes": mem.saved_activations,
        "trainable_bytes": mem.trainable_parameters,
        "gradient_bytes": mem.gradients,
        "optimizer_state_bytes": mem.optimizer_state,
        "trainable_state_bytes": mem.trainable_parameters + mem.gradients + mem.optimizer_state,
        "step_total_bytes": mem.total,
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if method.is_trady:
        tuner = trady_peft.find_tuner(model)
        layers = {f"base_model.model.{n}" for n, _ in tuner.trady_layers()}
        saved = sum(b for n, b in mem.saved_by_module.items() if n in layers)
        bank = 0
        for p in tuner.trady_bank.parameters():
            parts = [p, *([p.grad] if p.grad is not None else [])]
            parts += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            bank += sum(t.numel() * t.element_size() for t in parts)
        summary = tuner.selection_summary()
        row.update(
            adapter_bank_bytes=bank,
            adapter_saved_input_bytes=saved,
            adapter_footprint_bytes=bank + saved,
            adapter_footprint_within_budget=bank + saved <= method.budget,
            budget_used=summary.get("budget_used"),
            candidate_layers=summary["candidate_layers"],
            selected_channels=summary["selected_channels"],
        )
    del model, optimizer
    return row
