"""Gradient statistics the gradient-informed strategies draw from.

* `channel_norms` -- the L2 norm of each channel's slice of a gradient, in float64.
* `gradient_norms` -- Det-RGN's scores: the norm of the full weight gradient of every input
  channel of the candidate layers, computed chunk by chunk (`scoring_chunks`, `per_layer_chunks`)
  without a dense weight gradient.
* `ChannelNormStatistics` -- MeDyate's running statistics N: the last-seen gradient norm
  of every channel (MeDyate Alg. 1).

Both are averaged over the processes of a distributed run before a draw, so that all ranks draw
alike, and both serialise to plain data for checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.autograd import ChannelProbe
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


def scoring_chunks(layers: Sequence[Any], limits: int | Sequence[int]) -> list[dict[str, range]]:
    """Every channel of ``layers`` (`trady_peft.selection.draws.PricedLayer`: ``name``, ``in_channels``
    and ``costs``), in order, split into chunks that each fit ``limits`` as a draw does: the costs
    of a chunk's channels (`PricedLayer.costs`) sum to at most each limit
    (`trady_peft.memory.budget.draw_limits`). A chunk maps layer names to ranges of channels; a
    channel that alone exceeds a limit gets a chunk of its own.

    >>> from trady_peft.selection.draws import PricedLayer
    >>> scoring_chunks([PricedLayer("a", 3, 2), PricedLayer("b", 2, 3)], 5)
    [{'a': range(0, 2)}, {'a': range(2, 3), 'b': range(0, 1)}, {'b': range(1, 2)}]
    """
    limit = [float(v) for v in (limits if isinstance(limits, (tuple, list)) else (limits,))]
    chunks: list[dict[str, range]] = [{}]
    spent = [0.0] * len(limit)
    for layer in layers:
        start = 0
        while start < layer.in_channels:
            fit = [math.inf if c <= 0 else (room - used) // c for c, room, used in zip(layer.costs, limit, spent)]
            take = int(min(layer.in_channels - start, max(0, min(fit))))
            if not take:
                if chunks[-1]:  # full: a new chunk
                    chunks.append({})
                    spent = [0.0] * len(limit)
                    continue
                take = 1  # one channel larger than a limit: alone
            chunks[-1][layer.name] = range(start, start + take)
            spent = [used + c * take for used, c in zip(spent, layer.costs)]
            start += take
    return [c for c in chunks if c]


def per_layer_chunks(counts: Mapping[str, tuple[int, int]]) -> list[dict[str, range]]:
    """Chunks of ``k`` channels of every layer at a time, for ``counts`` (name -> ``(in_channels, k)``):
    what a ``channels_per_layer`` draw holds.

    >>> per_layer_chunks({"a": (3, 2), "b": (2, 1)})
    [{'a': range(0, 2), 'b': range(0, 1)}, {'a': range(2, 3), 'b': range(1, 2)}]
    """
    rounds = max((math.ceil(c / max(k, 1)) for c, k in counts.values()), default=0)
    chunks = []
    for i in range(rounds):
        chunk = {n: range(i * k, min(c, (i + 1) * k)) for n, (c, k) in counts.items() if i * k < c}
        chunks.append(chunk)
    return chunks


def gradient_norms(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    chunks: Sequence[Mapping[str, range]],
    other_parameters=(),
    root: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """``||dL/dW[:, c]||_2`` of every input channel of ``layers`` (TraDy layers), the gradient summed over
    ``batches``: float64, on the CPU, averaged over the processes of a distributed run.

    No dense weight gradient is formed and the base weights stay frozen. For each of ``chunks``
    (layer name -> channel range; together they must cover every channel, see `scoring_chunks`) the
    model runs forward and backward on every batch with a `trady_peft.core.autograd.ChannelProbe`
    on the chunk's layers: each keeps ``x[:, chunk channels]`` and sums its channels' weight-slice
    gradients into an accumulator ``[k, *slice_shape]``. So a scoring pass costs
    ``len(chunks) * len(batches)`` forwards and backwards, and holds at any time what the frozen
    path saves for backward plus the chunk's inputs and accumulators.

    Every chunk sees the same random streams (dropout masks) and the same batch-norm running
    statistics, those of the first, which are left as one pass over ``batches`` leaves them. The
    adapter's bank (``other_parameters``: it lives outside ``model``) does not train for the
    duration; the gradients that other trainable parameters receive are set aside and restored.
    The batches run through ``root`` (default: ``model``), a module around ``model`` whose forward
    must run too, e.g. the ``fully_shard``-ed ``PeftModel`` of FSDP2, which gathers its own
    parameters (the embeddings) in its forward.
    """
    batches = list(batches)
    norms = {n: torch.zeros(m.geometry.in_channels, dtype=torch.float64) for n, m in layers.items()}
    frozen = [p for p in other_parameters if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [(p, p.grad) for p in trainable]
    devices = sorted({str(d) for d in (m.base_layer.weight.device for m in layers.values()) if d.type == "cuda"})
    running = _running_statistics(model)
    for p in trainable:
        p.grad = None
    for p in frozen:
        p.requires_grad_(False)
    try:
        for i, chunk in enumerate(chunks):
            if i:
                for buffer, value in running:
                    buffer.copy_(value)
            with torch.random.fork_rng(devices=devices):
                for name, accumulator in _chunk_gradients(root or model, layers, batches, chunk).items():
                    norms[name][chunk[name].start : chunk[name].stop] = channel_norms(accumulator).cpu()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p, grad in saved_grads:
            p.grad = grad
    all_reduce_mean(norms)
    return norms


def _running_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The running statistics a forward updates (batch norms in training mode), with a copy of each."""
    return [
        (b, b.clone())
        for m in model.modules()
        if m.training and getattr(m, "track_running_stats", False)
        for b in m.buffers(recurse=False)
    ]


def _chunk_gradients(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: list, chunk: Mapping[str, range]
) -> dict[str, torch.Tensor]:
    """The weight-slice gradients ``[k, *slice_shape]`` of ``chunk``'s channels, summed over ``batches``."""
    device = next(iter(layers.values())).base_layer.weight.device
    anchor = torch.zeros((), device=device, requires_grad=True)
    probes = {}
    for name, channels in chunk.items():
        layer = layers[name]
        weight = layer.base_layer.weight
        accumulator = torch.zeros(
            len(channels), *layer.geometry.slice_shape, dtype=layer.delta_dtype, device=weight.device
        )
        channel_index = torch.arange(channels.start, channels.stop, device=weight.device)
        probes[name] = layer.channel_probe = ChannelProbe(channel_index, accumulator, anchor)
    try:
        for batch in batches:
            with torch.enable_grad():
                loss = required_loss(call_model(model, batch), "Scoring channels")
                if loss.requires_grad:
                    loss.backward()
    finally:
        for name in chunk:
            del layers[name].channel_probe
    missing = [n for n, p in probes.items() if not p.backwards]
    if missing:
        raise RuntimeError(f"Layer {missing[0]!r} received no gradient from the scoring batches.")
    return {n: p.accumulator for n, p in probes.items()}


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
