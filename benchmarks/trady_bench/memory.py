"""The memory of one training step per method (`trady_peft.measure_training_step`), and TraDy's own
footprint against its budget."""

from __future__ import annotations

import torch

import trady_peft
from trady_peft.core.targets import depth_blocks

from .methods import Method, build_method
from .tasks import Task
from .training import OPTIMIZER_STATE_BYTES, make_optimizer, start_period, train_mode


def largest_block(saved_by_module: dict[str, int]) -> int:
    """The most saved-activation bytes of one numbered block (modules sharing their name up to its
    first number, ``model.layers.4``: `depth_blocks`): what gradient checkpointing recomputes, and
    holds, while the backward pass runs through that block."""
    blocks = depth_blocks(list(saved_by_module))  # names in the order they were first saved
    numbered = [b for b in blocks if any(part.isdigit() for part in b[0].split("."))]
    return max((sum(saved_by_module[n] for n in b) for b in numbered), default=0)


def measure_memory(task: Task, method: Method, lora_targets: list[str], optimizer: str = "sgd") -> dict:
    """One measured training step (seed 0) with ``optimizer``: saved activations, trainable +
    gradient + optimizer bytes, and for TraDy the adapter's own footprint (its bank and the saved
    inputs inside its layers) against the budget."""
    kind = optimizer
    model = train_mode(build_method(task, method, 0, lora_targets, optimizer_state_bytes=OPTIMIZER_STATE_BYTES[kind]))
    optimizer, _ = make_optimizer(task, model, 10, kind)
    batch = task.batch(slice(0, task.batch_size))
    if method.is_trady:
        start_period(model, task, optimizer, 0, 0)
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    row = {
        "task": task.name,
        "method": method.row_name,
        "budget_bytes": method.budget,
        "saved_activation_bytes": mem.saved_activations,
        "trainable_bytes": mem.trainable_parameters,
        "gradient_bytes": mem.gradients,
        "optimizer_state_bytes": mem.optimizer_state,
        "trainable_state_bytes": mem.trainable_parameters + mem.gradients + mem.optimizer_state,
        "step_total_bytes": mem.total,
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "largest_block_saved_bytes": largest_block(mem.saved_by_module),
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
        if summary["selected_channels"] == sum(m.geometry.in_channels for _, m in tuner.periods.candidate_layers()):
            raise ValueError(f"memory_budget={method.budget} covers every candidate channel")  # trady_peft warns
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
