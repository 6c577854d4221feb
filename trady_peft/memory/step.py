"""The whole training step under ``step_memory``: what the rest of the step keeps, measured.

``step_memory`` bounds everything one training step keeps: the model's parameters and buffers
resident on the device, the activations autograd saves for backward, the gradient and optimizer
state of every trainable tensor, and the adapter (its bank with gradient and optimizer state, and
the selected channels' saved inputs). The adapter gets what the rest leaves (`StepRest.share`).

The rest is measured, never assumed (`measure_step_rest`), for the largest input seen: one forward
with gradients in the modules' own training mode, under ``saved_tensors_hooks`` counting distinct
storages (`trady_peft.memory.measure.SavedTensors`), the graph dropped without backward. The
candidate layers' inputs are made to require grad, so that every frozen module on the way from any
layer a draw may pick to the loss keeps what its backward needs (a bound over every draw); what the
TraDy layers themselves save (the selected channels' inputs) is the adapter's, priced per channel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.layer import TraDyLayer
from ..core.quantized import plain_tensors
from .measure import SavedTensors, call_model, storage_key

#: Bytes allowed per trainable tensor for its optimizer's scalar state (Adam's ``step``).
STEP_SCALAR_BYTES = 8


@dataclass(frozen=True)
class StepRest:
    """What a training step keeps besides the adapter, in bytes.

    Attributes:
        weights: the model's parameters and buffers (each storage once), the adapters' banks aside.
        saved_activations: what autograd saves for backward outside the TraDy layers' channel slices.
        trainable_state: gradients and optimizer state of the trainable tensors outside the adapters'
            banks (``modules_to_save`` heads, ...), and every trainable tensor's scalar optimizer state.
        input_shapes: the shapes of the input the activations were measured on.
        channel_indices: the indices of a selection as large as every TraDy layer's input channels
            (int32 each; a draw's own are left out of ``weights``).
    """

    weights: int
    saved_activations: int
    trainable_state: int
    input_shapes: tuple = ()
    channel_indices: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.saved_activations + self.trainable_state + self.channel_indices

    def share(self, step_memory: int) -> int:
        """Bytes ``step_memory`` leaves the adapter (negative when the rest alone does not fit)."""
        return step_memory - self.total

    def describe(self) -> str:
        shapes = ", ".join(str(list(s)) for s in self.input_shapes) or "?"
        return (
            f"{self.total:,} bytes: model weights and buffers {self.weights + self.channel_indices:,}, saved "
            f"activations {self.saved_activations:,} (input {shapes}), gradients and optimizer state outside the "
            f"adapter {self.trainable_state:,}"
        )


def resident_bytes(model: nn.Module, leave_out: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of ``model``'s parameters and buffers, each storage once, ``leave_out`` aside."""
    left_out = {storage_key(p) for t in leave_out for p in plain_tensors(t)}
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        for p in plain_tensors(t):
            key = storage_key(p)
            if key not in left_out and p.device.type != "meta":
                storages[key] = p.untyped_storage().nbytes()
    return sum(storages.values())


def trainable_state_bytes(model: nn.Module, banks: Iterable[torch.Tensor], optimizer_state_bytes: int) -> int:
    """Gradient and optimizer state (``optimizer_state_bytes`` per fp32 value, scaled to the
    parameter's dtype) of the trainable parameters outside ``banks`` and the TraDy layers' frozen base
    layers, and `STEP_SCALAR_BYTES` per trainable tensor (banks included)."""
    banks = list(banks)
    frozen = {id(p) for m in model.modules() if isinstance(m, TraDyLayer) for p in m.base_layer.parameters()}
    total = STEP_SCALAR_BYTES * sum(1 for b in banks if b.requires_grad)
    for p in model.parameters():
        if not p.requires_grad or id(p) in frozen or any(p is b for b in banks):
            continue
        grad = p.numel() * p.element_size()
        state = p.numel() * optimizer_state_bytes * max(1, p.element_size()) // 4
        total += grad + state + STEP_SCALAR_BYTES
    return total


def measure_saved_activations(model: nn.Module, inputs: Any, candidates: Iterable[nn.Module]) -> int:
    """Bytes autograd saves in one grad-enabled forward of ``model`` on ``inputs``, outside the TraDy
    layers, with the inputs of ``candidates`` made to require grad (a bound over every draw from them).

    The forward runs in the modules' own training mode (dropout masks count), with the random
    streams forked and batch-norm running statistics restored, so that it leaves no trace; its graph
    is dropped without backward.
    """
    handles = [layer.register_forward_pre_hook(_requiring_grad) for layer in candidates]
    statistics = _running_statistics(model)
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with SavedTensors(model, skip=_inside_trady_layer) as saved:
                call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in statistics:
                buffer.copy_(value)
    return saved.total


def measure_step_rest(
    model: nn.Module,
    inputs: Any,
    candidates: Iterable[nn.Module],
    banks: Iterable[torch.Tensor],
    optimizer_state_bytes: int,
    input_shapes: tuple = (),
) -> StepRest:
    """What a training step of ``model`` on ``inputs`` keeps besides the adapters (see the module
    docstring). ``banks`` are the adapters' bank parameters, counted in the adapters' share."""
    banks = list(banks)
    saved = measure_saved_activations(model, inputs, candidates)
    return StepRest(
        weights=resident_bytes(model, banks),
        saved_activations=saved,
        trainable_state=trainable_state_bytes(model, banks, optimizer_state_bytes),
        input_shapes=input_shapes,
    )


def _requiring_grad(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True), *args[1:])
    return None


def _inside_trady_layer(stack: list[tuple[str, nn.Module]]) -> bool:
    # A TraDy layer's frozen base saves only its weight; what else it saves is the selected
    # channels' input slice, which the adapter's share pays for.
    return any(isinstance(m, TraDyLayer) for _, m in stack)


def _running_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the running statistics a training-mode forward would update (batch norms)."""
    kept = []
    for module in model.modules():
        if module.training and getattr(module, "track_running_stats", False):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor):
                    kept.append((buffer, buffer.detach().clone()))
    return kept
