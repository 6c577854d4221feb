"""Gradient statistics the gradient-informed strategies draw from.

* `channel_norms` -- the L2 norm of each channel's slice of a gradient, in float64.
* `full_gradient_norms` -- Det-RGN's oracle: the norm of the full weight gradient of every
  input channel of the candidate layers (needs the dense gradients the budget avoids).
* `ChannelNormStatistics` -- MeDyate's running statistics N: the last-seen gradient norm
  of every channel (MeDyate Alg. 1).

Both are averaged over the processes of a distributed run before a draw, so that all ranks draw
alike, and both serialise to plain data for checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.collectives import all_reduce_mean
from ..files.codec import pack_tensor, unpack_tensor
from ..memory.measure import call_model, required_loss


def channel_norms(slices: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The L2 norm of each channel's slice: ``slices`` is ``[k, ...]`` (one slice per channel), the
    result ``[k]``, computed in ``dtype`` (``None``: in the dtype of ``slices``).

    >>> channel_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    tensor([5., 1.], dtype=torch.float64)
    """
    flat = slices.reshape(slices.shape[0], -1)
    return (flat if dtype is None else flat.to(dtype)).norm(dim=1)


def full_gradient_norms(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any], other_parameters=()
) -> dict[str, torch.Tensor]:
    """``||dL/dW[:, c]||_2`` of every input channel of ``layers`` (TraDy layers), summed over ``batches``.

    The layers' dense base weights are made trainable for the duration, every other gradient is
    set aside and restored (also those of ``other_parameters``, e.g. the adapter's bank, which
    lives outside ``model``).

    Raises:
        TypeError: a layer's base weight is quantized (it cannot have a gradient).
    """
    quantized = [f"{n} ({m.quantization})" for n, m in layers.items() if m.quantization is not None]
    if quantized:
        raise TypeError(
            "The Det-RGN strategies score channels with the full gradient of every base weight, which a quantized "
            f"weight cannot have: {', '.join(quantized[:3])}{' ...' if len(quantized) > 3 else ''}. Use a strategy "
            "that needs no scores on a quantized base (strategy='trady', 'd-full-random', 'medyate', ...)."
        )
    flags = {n: m.base_layer.weight.requires_grad for n, m in layers.items()}
    params = [p for p in [*model.parameters(), *other_parameters] if p.requires_grad]
    saved_grads = {id(p): (p, p.grad) for p in params}
    for p in params:
        p.grad = None
    for m in layers.values():
        m.base_layer.weight.requires_grad_(True)
    try:
        for batch in batches:
            with torch.enable_grad():
                required_loss(call_model(model, batch), "Scoring channels").backward()
        norms = {}
        for n, m in layers.items():
            grad = m.base_layer.weight.grad
            if grad is None:
                raise RuntimeError(f"Layer {n!r} received no gradient from the scoring batches.")
            channels = torch.arange(m.geometry.in_channels, device=grad.device)
            slices = m.geometry.read_slices(grad, channels)
            norms[n] = channel_norms(slices).cpu()
    finally:
        for n, m in layers.items():
            m.base_layer.weight.grad = None
            m.base_layer.weight.requires_grad_(flags[n])
        for p, grad in saved_grads.values():
            p.grad = grad
    all_reduce_mean(norms)
    return norms


class ChannelNormStatistics:
    """MeDyate's channel statistics N (MeDyate Alg. 1), for the layers ``sizes`` (name -> channels).

    During a period, `add` and `step` record each backward's per-channel gradient norms of the
    selected channels provisionally; `commit` adds them to the period's sums once the optimizer
    step they fed has happened, unless one of them is not finite (an overflowing step, which a
    GradScaler skips), and `discard` drops them (a step that never happened). `end_period` writes
    the period's mean norm of each selected channel into N; after the first period, channels
    never selected get the largest value seen (to explore them), and keep it until they are
    selected.
    """

    def __init__(self, sizes: dict[str, int]):
        self.sizes = dict(sizes)
        self.norms: dict[str, torch.Tensor] = {}
        self.seen: dict[str, torch.Tensor] = {}
        self.period_sum: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.has_history = False
        self.pending: dict[str, torch.Tensor] = {}  # backwards recorded since the last commit
        self.pending_steps = 0

    def add(self, name: str, channels: torch.Tensor, slice_norms: torch.Tensor) -> None:
        """Record one backward's norms of the ``channels`` of layer ``name``, until `commit` (kept where they live)."""
        total = self.pending.get(name)
        if total is None:
            total = self.pending[name] = slice_norms.new_zeros(self.sizes[name], dtype=torch.float64)
        total.index_add_(0, channels.long(), slice_norms.double())

    def step(self) -> None:
        """Count one recorded backward pass."""
        self.pending_steps += 1

    def commit(self) -> bool:
        """Add the backwards recorded since the last commit to the period, if all their norms are finite.

        Returns False (and drops them) when one is not: the gradient overflowed, and the step it fed
        was skipped or diverged, so it says nothing about the channels.
        """
        pending, steps = self.pending, self.pending_steps
        self.discard()
        if not steps:
            return True
        if pending:
            first = next(iter(pending.values()))
            if not bool(torch.isfinite(torch.stack([t.sum().to(first.device) for t in pending.values()])).all()):
                return False
        for name, norms in pending.items():
            total = self.period_sum.get(name)
            if total is None:
                self.period_sum[name] = norms
                continue
            if total.device != norms.device:  # restored from a checkpoint on the CPU
                total = self.period_sum[name] = total.to(norms.device)
            total += norms
        self.steps += steps
        return True

    def discard(self) -> None:
        """Drop the backwards recorded since the last commit (the step they fed never happened)."""
        self.pending, self.pending_steps = {}, 0

    def end_period(self, selection: dict[str, torch.Tensor]) -> None:
        """Fold the period's means into N, for the channels ``selection`` trained (name -> channels).

        Backwards recorded but not committed (no optimizer step followed them) do not count."""
        self.discard()
        if not self.steps:
            return
        # One flat tensor over every layer (zeros where nothing trained) keeps the collective
        # identical on all ranks, whatever each rank saw.
        flat = {
            "all": torch.cat(
                [
                    self.period_sum[n].cpu() if n in self.period_sum else torch.zeros(c, dtype=torch.float64)
                    for n, c in self.sizes.items()
                ]
            )
        }
        all_reduce_mean(flat)
        period_sum = dict(zip(self.sizes, torch.split(flat["all"], list(self.sizes.values()))))
        for name, c in self.sizes.items():
            channels = selection.get(name, torch.zeros(0, dtype=torch.long)).long().cpu()
            norms = self.norms.setdefault(name, torch.zeros(c, dtype=torch.float64))
            seen = self.seen.setdefault(name, torch.zeros(c, dtype=torch.bool))
            if channels.numel():
                norms[channels] = period_sum[name][channels] / self.steps
                seen[channels] = True
        if not self.has_history:  # end of the first period: unexplored channels get the max
            top = max(
                (float(n[s].max()) for n, s in zip(self.norms.values(), self.seen.values()) if s.any()), default=1.0
            )
            for name in self.norms:
                self.norms[name][~self.seen[name]] = top
            self.has_history = True
        self.period_sum, self.steps = {}, 0

    def weights(self, names: list[str]) -> list[torch.Tensor] | None:
        """Draw weights of the layers ``names``, or None before the first period has ended."""
        return [self.norms[n] for n in names] if self.has_history else None

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists of floats) that `load_state_dict` restores exactly."""
        return {
            "norms": {n: pack_tensor(t) for n, t in self.norms.items()},
            "seen": {n: pack_tensor(t) for n, t in self.seen.items()},
            "period_sum": {n: pack_tensor(t) for n, t in self.period_sum.items()},
            "steps": self.steps,
            "has_history": self.has_history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = {n: unpack_tensor(v) for n, v in state["norms"].items()}
        self.seen = {n: unpack_tensor(v) for n, v in state["seen"].items()}
        self.period_sum = {n: unpack_tensor(v) for n, v in state["period_sum"].items()}
        self.steps = int(state["steps"])
        self.has_history = bool(state["has_history"])
