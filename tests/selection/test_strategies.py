"""The strategies: Det RGN (oracle) and MeDyate against dense references, static strategies keeping
their draw, and strategies as small objects usable without a model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import trady_peft
from tests.tiny_models import tiny_cnn
from trady_peft.selection.draws import PricedLayer

BATCHES = [
    {
        "pixel_values": torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)),
        "labels": torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(100 + i)),
    }
    for i in range(3)
]


def dense_channel_norms(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Reference: the full gradient of a plain copy of the model, channel norms taken by hand."""
    model.zero_grad()  # same (eval) mode as the PEFT model under test
    for batch in BATCHES:
        model(**batch)["loss"].backward()
    out = {}
    for name in names:
        conv = model.get_submodule(name)
        g, groups = conv.weight.grad, conv.groups
        og, ig = conv.out_channels // groups, conv.in_channels // groups
        out[name] = torch.tensor(
            [float(g[(c // ig) * og : (c // ig + 1) * og, c % ig].norm()) for c in range(conv.in_channels)]
        )
    return out


def test_det_rgn_takes_the_channels_with_the_highest_reweighted_gradient_norm():
    budget = 400
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=budget, strategy="d-det-rgn"))
    tuner = model.base_model
    tuner.probe(BATCHES[0])
    assert tuner.selection_summary()["selected_channels"] == 0  # waiting for scores
    tuner.score_channels(BATCHES)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradient behind

    names = [n for n, _ in tuner.trady_layers("default")]
    norms = dense_channel_norms(tiny_cnn(), names)
    priced = {p.name: p for p in tuner.priced_layers()}
    ranked = sorted(
        ((float(norms[n][c]) / priced[n].price, n, c) for n in names for c in range(priced[n].in_channels)),
        key=lambda t: -t[0],
    )
    expected, spent = set(), 0
    for _, n, c in ranked:
        if spent + priced[n].price > budget:
            break
        spent += priced[n].price
        expected.add((n, c))
    got = {(n, c) for n, m in tuner.trady_layers("default") for c in m.trady_idx["default"].tolist()}
    assert got == expected and tuner.selected_cost() == spent


def test_medyate_records_last_seen_norms_and_explores_unseen_channels():
    config = trady_peft.TraDyConfig(memory_budget=300, strategy="medyate", modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config)
    tuner = model.base_model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(**BATCHES[0])  # probe + the first, uniform, draw
    first = {n: sorted(m.trady_idx["default"].tolist()) for n, m in tuner.trady_layers("default")}
    for batch in BATCHES:
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    tuner.next_period(optimizer=optimizer)

    state = tuner.selection_states["default"].statistics
    top = max(float(state.norms[n][c].max()) for n, c in first.items() if c)
    for name, selected in first.items():
        norms, seen = state.norms[name], state.seen[name]
        assert seen.sum() == len(selected)
        assert torch.all(norms[~seen] == top)  # unexplored channels get the largest norm seen
        if selected:
            assert torch.all(norms[selected] > 0)
    assert 0 < tuner.selected_cost() <= 300


def test_medyate_k_follows_the_alpha_rule():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=300, strategy="medyate"))
    tuner = model.base_model
    tuner.probe(BATCHES[0])
    layers = tuner.trady_layers("default")
    costs = [tuner.layer_costs[n].channel_cost("values") * m.geometry.in_channels for n, m in layers]
    k = next(i for i in range(1, len(costs) + 1) if 300 / sum(costs[:i]) <= 0.2)
    assert len(tuner.candidate_layers()) == k


def test_deleting_a_pending_adapter_leaves_no_state_behind():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=300))
    model.add_adapter("other", trady_peft.TraDyConfig(memory_budget=300, strategy="medyate"))
    model.delete_adapter("other")
    tuner = model.base_model
    assert "other" not in tuner.selection_states and "other" not in tuner.trady_bank
    model(**BATCHES[0])["loss"].backward()  # probes and draws for "default" only
    assert tuner.selected_cost() <= 300


def test_an_adapter_waiting_for_oracle_scores_is_probed_once(monkeypatch):
    config = trady_peft.TraDyConfig(memory_budget=400, strategy="d-det-rgn", modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config)
    tuner = model.base_model
    calls = []
    original = type(tuner.periods.prices).probe
    monkeypatch.setattr(
        type(tuner.periods.prices), "probe", lambda self, inputs: calls.append(1) or original(self, inputs)
    )
    for batch in BATCHES:
        model(**batch)["loss"].backward()
    assert len(calls) == 1


# ------------------------------------------------------------ strategies without a model
def test_strategies_are_small_objects_usable_without_a_model():
    from trady_peft.selection.strategies import STRATEGIES, alpha_top_k, get_strategy

    layers = [PricedLayer("a", 16, (10, 100)), PricedLayer("b", 32, (20, 50))]
    limits = (200, 1000)
    for strategy in STRATEGIES.values():
        if strategy.needs_scores:
            with pytest.raises(RuntimeError, match="needs channel scores"):
                strategy.select(layers, limits, seed=0, period=1)
            scores = {"a": torch.arange(16.0), "b": torch.zeros(32)}
            chosen = strategy.select(layers, limits, 0, 1, scores=scores)
            assert set(chosen) == {"a"} and chosen["a"].tolist()[-1] == 15  # the highest scores first
            continue
        p0, p1 = strategy.select(layers, limits, 0, 0), strategy.select(layers, limits, 0, 1)
        same = set(p0) == set(p1) and all(torch.equal(p0[n], p1[n]) for n in p0)
        assert same is not strategy.redraws  # D- strategies redraw, S- strategies keep their draw
        for chosen in (p0, p1):
            spent = [
                sum(layers[i].costs[k] * chosen.get(layers[i].name, torch.zeros(0)).numel() for i in range(2))
                for k in range(2)
            ]
            assert all(s <= limit for s, limit in zip(spent, limits)) and sum(c.numel() for c in chosen.values())
    weights = [torch.zeros(16), torch.ones(32)]
    chosen = get_strategy("medyate").select(layers, limits, 0, 2, norms=weights)
    assert set(chosen) == {"b"}  # zero weights are never drawn
    assert alpha_top_k([100, 100, 100], budget=50, alpha=0.2) == 3
    assert alpha_top_k([100, 200, 300], budget=50, alpha=0.2) == 2
    with pytest.raises(ValueError, match="did you mean|unknown"):
        get_strategy("tardy")


def test_static_strategy_keeps_its_channels():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, strategy="s-top-k-random"))
    layers = model.base_model.trady_layers("default")
    first = [layer.trady_idx["default"].clone() for _, layer in layers]
    model.base_model.next_period()
    assert all(torch.equal(a, layer.trady_idx["default"]) for a, (_, layer) in zip(first, layers))


def test_channel_norms_are_the_norms_of_each_channels_slice():
    from trady_peft.selection.statistics import channel_norms

    slices = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    norms = channel_norms(slices)
    assert norms.dtype == torch.float64 and norms.shape == (5,)
    assert torch.allclose(
        norms, torch.tensor([float(s.double().pow(2).sum().sqrt()) for s in slices], dtype=torch.float64)
    )
    assert channel_norms(slices.bfloat16(), dtype=None).dtype == torch.bfloat16  # in the slices' own dtype
