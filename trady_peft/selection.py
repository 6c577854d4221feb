"""Where channels are chosen.

The channel set of period ``e`` is a pure function of ``(seed, e, the layer list, the
strategy)``: every process of a distributed run, and a run resumed from a checkpoint, draws
exactly what the uninterrupted single-process run draws, without communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Large odd multiplier so that (seed, period) pairs map to distinct generator seeds.
_PERIOD_STRIDE = 1_000_003


@dataclass(frozen=True)
class Candidate:
    """A layer channels may be drawn from: its name, input channel count and per-period quota."""

    name: str
    in_channels: int
    quota: int


def period_generator(seed: int, period: int) -> torch.Generator:
    """The CPU generator of one period's draw."""
    return torch.Generator().manual_seed(seed * _PERIOD_STRIDE + period)


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
