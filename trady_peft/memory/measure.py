"""Measuring what one training step really keeps in memory.

Every memory figure trady-peft reports comes from here, and nothing here is computed on paper:

* **saved activations** -- the tensors autograd packs for the backward pass, caught with
  ``torch.autograd.graph.saved_tensors_hooks``. Views are counted once per distinct storage,
  and storages owned by the model's parameters and buffers are excluded (they are resident
  whether or not anything trains). Each storage is attributed to the innermost module running
  when it was first packed, so a report can say which layers keep what.
* **trainable parameters**, their **gradients** and the **optimizer state**, in bytes.
* on a CUDA device, the **peak allocated** memory of the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.quantized import plain_tensors


@dataclass
class TrainingStepMemory:
    """Bytes measured during one training step (see `measure_training_step`).

    Attributes:
        saved_activations: bytes of distinct non-parameter storages autograd kept for backward.
        trainable_parameters: bytes of parameters with ``requires_grad=True``.
        gradients: bytes of the ``.grad`` tensors of those parameters after backward.
        optimizer_state: bytes of the optimizer's per-parameter state after its step (0 without
            an optimizer).
        saved_by_module: ``saved_activations`` split by the module (qualified name) that was
            running when each storage was first saved; ``""`` is the top level.
        saved_by_module_type: the same split by module class name.
        peak_allocated: peak CUDA memory allocated during the step, or None off CUDA.
        loss: the loss value of the step.
    """

    saved_activations: int
    trainable_parameters: int
    gradients: int
    optimizer_state: int
    saved_by_module: dict[str, int] = field(default_factory=dict)
    saved_by_module_type: dict[str, int] = field(default_factory=dict)
    peak_allocated: int | None = None
    loss: float = float("nan")

    @property
    def total(self) -> int:
        """Saved activations + trainable parameters + gradients + optimizer state."""
        return self.saved_activations + self.trainable_parameters + self.gradients + self.optimizer_state


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """What identifies ``t``'s storage: its device and address."""
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class ForwardCall:
    """The positional and keyword arguments of one forward call, as one batch for `call_model`."""

    args: tuple
    kwargs: dict


def forward_batch(args: tuple, kwargs: dict) -> Any:
    """A forward call's arguments as one batch that `call_model` runs the same way again: the keyword
    arguments (a dict), the positional ones (a tuple), or a `ForwardCall` when it has both."""
    if not args:
        return kwargs
    return args if not kwargs else ForwardCall(args, kwargs)


def call_model(model: nn.Module, inputs: Any):
    """Run ``model`` on one batch as the Trainer would: a tensor positionally, a dict as keyword
    arguments, a tuple as positional arguments (or a recorded call's ``args``/``kwargs``)."""
    if hasattr(inputs, "args") and hasattr(inputs, "kwargs"):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


class MissingLossError(ValueError):
    """A model output without a loss, where one was needed (`required_loss`)."""


def required_loss(output: Any, purpose: str) -> torch.Tensor:
    """``output.loss`` (or ``output["loss"]``), or a `MissingLossError` saying labels are needed for ``purpose``."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise MissingLossError(f"{purpose} needs batches with labels, so that the model returns a loss.")
    return loss


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is not None:
        return loss
    if isinstance(output, torch.Tensor):
        tensor = output
    else:  # a dict, a ModelOutput or a tuple: its first tensor
        values = output.values() if hasattr(output, "values") else output
        tensor = next(v for v in values if isinstance(v, torch.Tensor))
    # A stand-in loss: its backward reaches every trainable entry the forward used.
    return tensor.float().square().mean()


def resident_storages(model: nn.Module) -> set[tuple[str, int]]:
    """The storages of ``model``'s parameters and buffers (a tensor subclass, such as torchao's
    quantized weights, by the plain tensors it holds)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {storage_key(p) for t in tensors for p in plain_tensors(t)}


class SavedTensors:
    """Records the storages autograd packs for backward while the context is open.

    Each distinct storage counts once, at its full size, attributed to the innermost module
    running when it was first packed; storages of ``model``'s parameters and buffers (also those
    created during the forward) are left out. ``skip(stack)`` (the qualified names and modules
    running, outermost first) may leave out what some modules pack.

    Attributes (after the context closes):
        storages: storage key -> (bytes, module name, module class name).
        total: the bytes of all of them.
    """

    def __init__(self, model: nn.Module, skip=None):
        self.model, self.skip = model, skip
        self.storages: dict[tuple[str, int], tuple[int, str, str]] = {}
        self.total = 0

    def __enter__(self) -> SavedTensors:
        model, seen = self.model, self.storages
        resident = resident_storages(model)
        stack: list[tuple[str, nn.Module]] = [("", model)]
        names = {m: n for n, m in model.named_modules()}

        def pack(t: torch.Tensor):
            if self.skip is not None and self.skip(stack):
                return t
            for p in plain_tensors(t):
                key = storage_key(p)
                if key not in resident and key not in seen and p.device.type != "meta":
                    seen[key] = (_tensor_bytes(p), stack[-1][0], type(stack[-1][1]).__name__)
            return t

        def pre_hook(module, args):
            if module in names:
                stack.append((names[module], module))

        def post_hook(module, args, output):
            if module in names and len(stack) > 1:
                stack.pop()

        self._handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
            torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True),
        ]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        # Buffers created during the forward (e.g. a store replaced by a redraw) are resident too.
        resident = resident_storages(self.model)
        for key in [k for k in self.storages if k in resident]:
            del self.storages[key]
        self.total = sum(nbytes for nbytes, _, _ in self.storages.values())


def measure_training_step(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainingStepMemory:
    """Run one real training step of ``model`` on ``inputs`` and measure its memory.

    The step is forward, backward and, if ``optimizer`` is given, ``optimizer.step()``; it
    changes the model like any training step. The loss is ``output.loss`` when the model
    returns one (pass ``labels`` in ``inputs``), else the mean square of its first output.

    Args:
        model: any ``nn.Module`` (a ``PeftModel``, a plain model, ...), in the mode you want
            measured (``model.train()`` for dropout and batch-norm statistics).
        inputs: a tensor (passed positionally) or a dict of keyword arguments.
        optimizer: optional; its state is created by the step and then measured.

    Returns:
        A `TrainingStepMemory` with integer byte counts.

    Example:
        ```python
        mem = trady_peft.measure_training_step(model, {"input_ids": ids, "labels": ids})
        print(mem.saved_activations, mem.gradients)
        ```
    """

    cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)

    with SavedTensors(model) as saved:
        output = call_model(model, inputs)
        loss = _loss_of(output)
    by_module: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for nbytes, name, kind in saved.storages.values():
        by_module[name] = by_module.get(name, 0) + nbytes
        by_type[kind] = by_type.get(kind, 0) + nbytes
    loss.backward()
    if optimizer is not None:
        optimizer.step()

    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    state_bytes = 0
    if optimizer is not None:
        for p in trainable:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    state_bytes += value.numel() * value.element_size()
    peak = torch.cuda.max_memory_allocated(cuda) if cuda is not None else None
    return TrainingStepMemory(
        saved_activations=saved.total,
        trainable_parameters=param_bytes,
        gradients=grad_bytes,
        optimizer_state=state_bytes,
        saved_by_module=by_module,
        saved_by_module_type=by_type,
        peak_allocated=peak,
        loss=float(loss.detach()),
    )
