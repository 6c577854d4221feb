"""The paper's selection strategies: candidate layers, their prices and statistics -> channels.

Each strategy is a small `Strategy` value with one method, `Strategy.select`. It needs
no model: the tuner hands it the candidate layers (already narrowed to the ranking's top-K where
the strategy says so) with their per-channel prices, the budget, the seed and the period, and
the statistics it uses (Det-RGN scores, MeDyate norms). The draws themselves are in
`trady_peft.selection.draws`.

| name | layers | channels | when |
|---|---|---|---|
| ``trady`` (D-Top-K Random) | top-K of the importance ranking | uniform until the budget is full | every period |
| ``s-top-k-random`` | top-K | uniform | once |
| ``d-full-random`` / ``s-full-random`` (≈ PaCA) | all target layers | uniform | every period / once |
| ``d-det-rgn`` / ``s-det-rgn`` | all | greedy by reweighted gradient norm | every period / once |
| ``medyate`` | ranking, K from the budget (α) | ∝ last-seen channel gradient norm | every period |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .draws import (
    Candidate,
    PricedLayer,
    draw_per_layer,
    draw_under_budget,
    draw_weighted_under_budget,
    greedy_under_budget,
)


@dataclass(frozen=True)
class Strategy:
    """One selection strategy.

    Attributes:
        name: the paper's name, as passed to ``TraDyConfig(strategy=...)``.
        layers: ``"top-k"`` (the ranking's first ``top_k`` layers), ``"all"`` (every target layer)
            or ``"alpha"`` (MeDyate: the fewest ranked layers whose memory M_K gives budget / M_K <= α).
        channels: ``"uniform"``, ``"greedy"`` (by reweighted gradient norm) or ``"weighted"``
            (proportional to the last-seen gradient norm).
        redraws: whether a new set is drawn every period (D-) or once (S-).
    """

    name: str
    layers: str
    channels: str
    redraws: bool

    @property
    def needs_scores(self) -> bool:
        """Whether the strategy needs the full-gradient norm of every candidate channel (Det-RGN)."""
        return self.channels == "greedy"

    def scores_due(self, period: int, scored_period: int | None) -> bool:
        """Whether channels must be (re)scored before drawing ``period``."""
        if not self.needs_scores:
            return False
        return scored_period is None or (self.redraws and scored_period != period)

    def select(
        self,
        layers: Sequence[PricedLayer] | Sequence[Candidate],
        budget: int | Sequence[int] | None,
        seed: int,
        period: int,
        *,
        scores: Mapping[str, torch.Tensor] | None = None,
        norms: Sequence[torch.Tensor] | None = None,
        total_cost: Sequence[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The channels of ``period``: sorted int64 indices per layer name.

        Args:
            layers: `PricedLayer` under a budget, or `Candidate` with per-layer
                quotas when ``budget`` is None (``channels_per_layer``).
            budget: the limit of each cost part (see `PricedLayer`), or None.
            seed, period: the draw is a pure function of these (and the other arguments).
            scores: Det-RGN: the gradient norm of every channel, per layer name.
            norms: MeDyate: per-layer weights (last-seen norms), in the order of ``layers``;
                None before the first period ends (then the draw is uniform).
            total_cost: Det-RGN: one scalar price per layer, for the reweighting ``norm / cost``
                (TraDy Eq. 7); default: the sum of the cost parts.
        """
        effective = period if self.redraws else 0
        if budget is None:
            return draw_per_layer(layers, seed, effective)
        if self.channels == "greedy":
            if scores is None:
                raise RuntimeError(
                    f"strategy={self.name!r} needs channel scores: train with TraDyCallback, or pass batches= to "
                    "next_period / model.base_model.advance so that channels can be scored."
                )
            prices = total_cost or [float(sum(p.costs)) for p in layers]
            return greedy_under_budget(layers, [scores[p.name] / c for p, c in zip(layers, prices)], budget)
        if self.channels == "weighted" and norms is not None:
            return draw_weighted_under_budget(layers, norms, budget, seed, effective)
        return draw_under_budget(layers, budget, seed, effective)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("trady", "top-k", "uniform", redraws=True),
        Strategy("s-top-k-random", "top-k", "uniform", redraws=False),
        Strategy("d-full-random", "all", "uniform", redraws=True),
        Strategy("s-full-random", "all", "uniform", redraws=False),
        Strategy("d-det-rgn", "all", "greedy", redraws=True),
        Strategy("s-det-rgn", "all", "greedy", redraws=False),
        Strategy("medyate", "alpha", "weighted", redraws=True),
    )
}


#: The strategies that redraw every period ("d-" and TraDy, MeDyate); the "s-" ones draw once.
DYNAMIC_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.redraws)
#: Strategies that draw inside a layer ranking (the importance table when none is given).
TOP_K_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.layers != "all")
#: Strategies that score channels by the full-gradient norm of every candidate channel (Det-RGN).
SCORING_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.needs_scores)


#: ``strategy="auto"`` (the default): `auto_strategy` picks one when the adapter is created.
AUTO = "auto"


def auto_strategy(causal_lm: bool, budgeted: bool) -> str:
    """What ``strategy="auto"`` picks: MeDyate for a causal language model under a budget, TraDy otherwise.

    On the accuracy-memory front (docs/benchmarks.md) MeDyate beats TraDy on the language model at
    the budgets where the two differ, and ties with it on the image and text classifiers, where TraDy
    (the paper's method, no gradient statistics to keep) stays. MeDyate needs a budget to draw under.

    >>> auto_strategy(causal_lm=True, budgeted=True), auto_strategy(causal_lm=False, budgeted=True)
    ('medyate', 'trady')
    """
    return "medyate" if causal_lm and budgeted else "trady"


def get_strategy(name: str) -> Strategy:
    """The `Strategy` called ``name`` (one of `STRATEGIES`)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {tuple(STRATEGIES)}.") from None


def alpha_top_k(layer_memory: Sequence[float], budget: float, alpha: float) -> int:
    """MeDyate's K: the fewest leading layers whose total memory M_K gives ``budget / M_K <= alpha``.

    ``layer_memory`` is the memory of every channel of each ranked layer, most important first.
    Returns all layers when no prefix satisfies the rule.
    """
    spent = 0.0
    for k, memory in enumerate(layer_memory, start=1):
        spent += memory
        if budget / spent <= alpha:
            return k
    return len(layer_memory)
