"""The draws every strategy is built from: the budgeted random draw's stop rule and uniformity, and
the weighted draw's frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from trady_peft.selection.draws import PricedLayer, draw_under_budget, draw_weighted_under_budget, period_generator


def reference_draw(layers, budget, seed, period):
    """The WACV rule written out loop by loop: shuffle all pairs, stop at the first overflow."""
    pairs = [(layer.name, c, layer.price) for layer in layers for c in range(layer.in_channels)]
    order = torch.randperm(len(pairs), generator=period_generator(seed, period)).tolist()
    spent, chosen = 0, {}
    for i in order:
        name, channel, cost = pairs[i]
        if spent + cost > budget:
            break
        spent += cost
        chosen.setdefault(name, []).append(channel)
    return {k: sorted(v) for k, v in chosen.items()}, spent


LAYERS = [PricedLayer("a", 16, 40), PricedLayer("b", 24, 75), PricedLayer("c", 8, 300), PricedLayer("d", 32, 12)]


@pytest.mark.parametrize("budget", [300, 1000, 2500, 6000])
@pytest.mark.parametrize("period", [0, 1, 7])
def test_draw_follows_the_documented_stop_rule_and_never_exceeds_the_budget(budget, period):
    got = draw_under_budget(LAYERS, budget, seed=3, period=period)
    expected, spent = reference_draw(LAYERS, budget, seed=3, period=period)
    assert {k: v.tolist() for k, v in got.items()} == expected
    cost = {layer.name: layer.price for layer in LAYERS}
    assert sum(cost[k] * len(v) for k, v in got.items()) == spent <= budget


def chi2_upper(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z (3.29: p=0.9995)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_trady_inclusion_is_uniform_within_each_top_k_layer():
    runs = 3000
    counts = {layer.name: torch.zeros(layer.in_channels) for layer in LAYERS}
    for seed in range(runs):
        for name, channels in draw_under_budget(LAYERS, 1500, seed=seed, period=0).items():
            counts[name][channels] += 1
    for name, c in counts.items():
        expected = c.mean()
        assert expected > 20, name  # enough draws per cell for the chi-square test
        chi2 = float(((c - expected) ** 2 / expected).sum())
        assert chi2 < chi2_upper(len(c) - 1), (name, chi2)
    # ...and a broken draw (always the lowest indices) would fail that test:
    skewed = torch.cat([torch.full((8,), 100.0), torch.full((8,), 50.0)])
    assert float(((skewed - skewed.mean()) ** 2 / skewed.mean()).sum()) > chi2_upper(15)


def test_weighted_draw_follows_the_weights():
    layers = [PricedLayer("a", 4, 10), PricedLayer("b", 4, 10)]
    weights = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 4.0, 8.0, 8.0])]
    w = torch.cat(weights)
    counts = torch.zeros(8)
    runs = 2000
    for seed in range(runs):
        chosen = draw_weighted_under_budget(layers, weights, budget=10, seed=seed, period=0)  # one channel fits
        for name, channels in chosen.items():
            counts[channels + (4 if name == "b" else 0)] += 1
    assert counts[4] == 0  # zero weight: never drawn
    expected = runs * w / w.sum()
    mask = w > 0
    chi2 = float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())
    df = int(mask.sum()) - 1
    assert chi2 < df * (1 - 2 / (9 * df) + 3.29 * math.sqrt(2 / (9 * df))) ** 3, chi2
