"""How channels are drawn: the random and greedy draws every strategy is built from.

The channel set of period ``e`` is a pure function of ``(seed, e, the layer list, their prices,
the strategy's statistics)``: every process of a distributed run, and a run resumed from a
checkpoint, draws exactly what the uninterrupted single-process run draws, without communication.
The strategies themselves (which layers, which draw, how often) are in `trady_peft.selection.strategies`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Large odd multiplier so that (seed, period) pairs map to distinct generator seeds.
PERIOD_STRIDE = 1_000_003
#: Largest seed: the draw of period p seeds a torch generator with ``seed * PERIOD_STRIDE + p``,
#: which must fit in 64 bits for every period p < PERIOD_STRIDE.
MAX_SEED = (2**64 - 1) // PERIOD_STRIDE - 1


@dataclass(frozen=True)
class Candidate:
    """A layer channels may be drawn from: its name, input channel count and per-period quota."""

    name: str
    in_channels: int
    quota: int


def period_generator(seed: int, period: int) -> torch.Generator:
    """The CPU generator of one period's draw."""
    return torch.Generator().manual_seed(seed * PERIOD_STRIDE + period)


def draw_per_layer(candidates: Sequence[Candidate], seed: int, period: int) -> dict[str, torch.Tensor]:
    """Draw ``quota`` distinct channels uniformly in each candidate layer.

    Layers are visited in the order given (the model's module order), each draw consuming the
    same generator. Returns sorted int64 channel indices per layer name.
    """
    gen = period_generator(seed, period)
    chosen = {}
    for cand in candidates:
        perm = torch.randperm(cand.in_channels, generator=gen)[: cand.quota]
        chosen[cand.name] = torch.sort(perm).values
    return chosen


@dataclass(frozen=True)
class PricedLayer:
    """A candidate layer with the price of one of its channels.

    ``price`` is what one channel spends: one number in the budget's unit, or a tuple of numbers
    when a budget has several parts that must each hold (a byte budget: trainable values of the
    bank, and bytes of saved inputs). `costs` always gives the tuple.
    """

    name: str
    in_channels: int
    price: int | tuple[int, ...]

    @property
    def costs(self) -> tuple[int, ...]:
        cost = self.price
        return tuple(cost) if isinstance(cost, (tuple, list)) else (cost,)


def _limits(budget: int | Sequence[int]) -> torch.Tensor:
    parts = tuple(budget) if isinstance(budget, (tuple, list)) else (budget,)
    return torch.tensor(parts, dtype=torch.float64)


def _take_until_budget(
    layers: Sequence[PricedLayer], order: torch.Tensor, budget: int | Sequence[int]
) -> dict[str, torch.Tensor]:
    """Walk global (layer, channel) pairs in ``order``; keep them while the cumulative cost of
    every part fits its limit, stop at the first pair that does not.

    When even the first pair does not fit, the first pair in ``order`` that fits on its own is
    taken, so that a budget able to hold one channel never yields an empty period.
    Returns sorted channels per layer name.
    """
    limits = _limits(budget)
    counts = torch.tensor([layer.in_channels for layer in layers])
    costs = torch.tensor([layer.costs for layer in layers], dtype=torch.float64).reshape(len(layers), -1)
    owner = torch.repeat_interleave(torch.arange(len(layers)), counts)  # layer of each global pair
    first = torch.cumsum(counts, 0) - counts
    pair_costs = costs[owner[order]]
    over = (torch.cumsum(pair_costs, 0) > limits).any(dim=1)
    n = int(over.to(torch.int8).argmax()) if bool(over.any()) else order.numel()
    taken = order[:n]
    if n == 0:
        fits = (pair_costs <= limits).all(dim=1)
        taken = order[int(fits.to(torch.int8).argmax()) :][:1] if bool(fits.any()) else order[:0]
    chosen = {}
    layer_of = owner[taken]
    for i, layer in enumerate(layers):
        picked = taken[layer_of == i] - first[i]
        if picked.numel():
            chosen[layer.name] = torch.sort(picked).values
    return chosen


def draw_under_budget(
    layers: Sequence[PricedLayer], budget: int | Sequence[int], seed: int, period: int
) -> dict[str, torch.Tensor]:
    """Draw (layer, channel) pairs uniformly at random until the budget is full.

    The stop rule is the one of the authors' public code (``compute_random_budget_mask`` of the
    WACV-W 2024 repository): shuffle every candidate pair, take pairs in that order while the
    cumulative cost stays within ``budget``, and stop at the first pair that would exceed it.
    The selected cost therefore never exceeds the budget, and every pair has the same chance to
    come early in the order, whatever its layer. (One departure: if the very first pair does
    not fit, the first pair that does is taken instead of drawing nothing.)

    Returns sorted int64 channel indices per layer name (layers with nothing drawn are absent).
    """
    total = sum(layer.in_channels for layer in layers)
    order = torch.randperm(total, generator=period_generator(seed, period))
    return _take_until_budget(layers, order, budget)


def draw_weighted_under_budget(
    layers: Sequence[PricedLayer],
    weights: Sequence[torch.Tensor],
    budget: int | Sequence[int],
    seed: int,
    period: int,
) -> dict[str, torch.Tensor]:
    """Like `draw_under_budget`, with pairs drawn without replacement with probability
    proportional to ``weights`` (one tensor per layer; MeDyate's rule).

    The weighted order uses Efraimidis-Spirakis keys ``u ** (1 / w)``: sorting by them is a
    draw without replacement proportional to ``w``. Zero weights come last.
    """
    w = torch.cat([t.double().reshape(-1) for t in weights]).clamp_min(0)
    u = torch.rand(w.numel(), generator=period_generator(seed, period), dtype=torch.float64)
    keys = torch.where(w > 0, torch.log(u) / w.clamp_min(1e-300), torch.full_like(w, -math.inf))
    order = torch.argsort(keys, descending=True, stable=True)
    return _take_until_budget(layers, order, budget)


def greedy_under_budget(
    layers: Sequence[PricedLayer], scores: Sequence[torch.Tensor], budget: int | Sequence[int]
) -> dict[str, torch.Tensor]:
    """Deterministic: pairs in decreasing ``scores`` (ties by position), same stop rule (Det RGN)."""
    s = torch.cat([t.double().reshape(-1) for t in scores])
    order = torch.argsort(-s, stable=True)
    return _take_until_budget(layers, order, budget)
