"""What a period is: one adapter's selection state, its lifecycle, and what a checkpoint carries.

An adapter's channels for period ``e`` are a pure function of its `SelectionState`: the
seed and strategy (in the config), the period, the measured per-channel prices, and the
strategy's statistics (Det-RGN scores, MeDyate norms). The state moves through

``waiting for shapes`` (a budget needs the probe's prices) -> ``waiting for scores`` (Det-RGN
needs full-gradient scores for this period) -> ``ready`` -> ``drawn`` (channels installed).

`SelectionState.to_tensor` turns the state into a small ``uint8`` tensor (UTF-8 JSON) that
travels inside the adapter file, so a Trainer checkpoint (or any ``save_pretrained``) resumes
with exactly the channels, prices and statistics the run had.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

from ..files.codec import pack_tensor, unpack_tensor
from ..memory.budget import LayerCost
from .statistics import ChannelNormStatistics

#: Version of the serialised state; bumped when its fields change meaning.
STATE_FORMAT = 2


class Phase(str, Enum):
    """Where an adapter stands in its period lifecycle."""

    WAITING_FOR_SHAPES = "waiting for shapes"
    WAITING_FOR_SCORES = "waiting for scores"
    READY = "ready"
    DRAWN = "drawn"


@dataclass
class SelectionState:
    """Everything that decides one adapter's channels.

    Attributes:
        period: index of the current training period.
        costs: measured price of one channel, per candidate layer (from the shape probe; the
            largest input seen so far).
        scores: Det-RGN full-gradient channel norms per layer, or None.
        scored_period: the period ``scores`` were computed for.
        statistics: MeDyate's running channel norms, or None for other strategies.
        selection: the channels installed for ``period`` (name -> sorted indices), or None while
            the adapter waits to draw.
    """

    period: int = 0
    costs: dict[str, LayerCost] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] | None = None
    scored_period: int | None = None
    statistics: ChannelNormStatistics | None = None
    selection: dict[str, torch.Tensor] | None = None

    def phase(self, needs_costs: list[str], needs_scores: bool) -> Phase:
        """The lifecycle phase, given the layers that must be priced and whether scores are due."""
        if self.selection is not None:
            return Phase.DRAWN
        if any(n not in self.costs for n in needs_costs):
            return Phase.WAITING_FOR_SHAPES
        if needs_scores:
            return Phase.WAITING_FOR_SCORES
        return Phase.READY

    # ---------------------------------------------------------------------- checkpoints
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data that `from_dict` restores exactly."""
        return {
            "format": STATE_FORMAT,
            "period": self.period,
            "costs": {n: asdict(c) for n, c in self.costs.items()},
            "scores": None if self.scores is None else {n: pack_tensor(t) for n, t in self.scores.items()},
            "scored_period": self.scored_period,
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
            "selection": None if self.selection is None else {n: t.tolist() for n, t in self.selection.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], statistics: ChannelNormStatistics | None = None) -> SelectionState:
        """Rebuild a state; ``statistics`` (an empty one of the right layers) receives the saved norms."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(
                f"This adapter's selection state has format {data.get('format')!r}; this trady-peft reads format "
                f"{STATE_FORMAT}. Upgrade trady-peft, or load the adapter for inference only."
            )
        if statistics is not None and data["statistics"] is not None:
            statistics.load_state_dict(data["statistics"])
        return cls(
            period=int(data["period"]),
            costs={n: LayerCost(**c) for n, c in data["costs"].items()},
            scores=None if data["scores"] is None else {n: unpack_tensor(v) for n, v in data["scores"].items()},
            scored_period=data["scored_period"],
            statistics=statistics,
            selection=None
            if data["selection"] is None
            else {n: torch.tensor(v, dtype=torch.long) for n, v in data["selection"].items()},
        )

    def to_tensor(self) -> torch.Tensor:
        """The state as a ``uint8`` tensor (UTF-8 JSON), for the adapter file."""
        return torch.frombuffer(bytearray(json.dumps(self.to_dict()).encode()), dtype=torch.uint8).clone()

    @staticmethod
    def parse_tensor(tensor: torch.Tensor) -> dict[str, Any]:
        """Inverse of `to_tensor` (the plain data; see `from_dict`)."""
        try:
            return json.loads(tensor.cpu().to(torch.uint8).numpy().tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"The adapter's selection state is corrupt ({err}).") from None
