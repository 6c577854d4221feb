"""Budget accounting, the paper's numbers, and draws that respect the budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from paper_models import mcunet_in1, mobilenet_v2_w035, proxyless_w03  # benchmarks/, on pytest's pythonpath
from peft import get_peft_model

import trady_peft
from trady_peft.memory.budget import parse_budget
from trady_peft.selection.draws import PricedLayer, draw_under_budget, period_generator

IMAGE = torch.zeros(1, 3, 128, 128)


def mbv2():
    torch.manual_seed(0)
    return mobilenet_v2_w035(num_classes=10).eval()


def conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def test_mobilenet_v2_w035_accounting_matches_the_paper():
    model = mbv2()
    acc = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    assert len(acc.rows) == 52
    assert (acc.total_weights, acc.total_activations, acc.total) == (288_864, 963_456, 1_252_320)


@pytest.mark.parametrize(
    "factory, convs, totals",
    [(mcunet_in1, 42, (463_216, 846_592, 1_309_808)), (proxyless_w03, 61, (357_680, 804_352, 1_162_032))],
)
def test_mcunet_in1_and_proxyless_w03_accounting_matches_the_paper(factory, convs, totals):
    model = factory().eval()
    acc = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    assert len(acc.rows) == convs
    assert (acc.total_weights, acc.total_activations, acc.total) == totals


def test_budget_command_prints_the_table(capsys):
    from trady_peft.cli import main

    root = Path(__file__).resolve().parents[1]
    spec = f"{root / 'benchmarks' / 'paper_models.py'}:mobilenet_v2_w035"
    assert main(["budget", "--model", spec, "--input-shape", "3,128,128", "--convs-only"]) == 0
    out = capsys.readouterr().out
    assert "288,864" in out and "963,456" in out and "1,252,320" in out
    assert out.count("\n") > 52  # one row per convolution
    with pytest.raises(SystemExit):
        main(["budget", "--model", spec, "--input-shape", "3,a,128"])  # not a shape
    with pytest.raises(SystemExit, match="Check --input-shape"):
        main(["budget", "--model", spec, "--input-shape", "128,128"])  # not this model's input


def test_bytes_accounting_counts_batch_dtype_and_optimizer_state():
    model = mbv2()
    values = trady_peft.memory_accounting(model, IMAGE, target_modules=conv_names(model))
    batch = torch.zeros(8, 3, 128, 128, dtype=torch.float32)
    as_bytes = trady_peft.memory_accounting(model, batch, unit="bytes", target_modules=conv_names(model))
    assert as_bytes.total_activations == values.total_activations * 8 * 4
    assert as_bytes.total_weights == values.total_weights * (4 + 4 + 8)  # param + grad + AdamW moments


@pytest.mark.parametrize(
    "raw, expected",
    [
        (27946, (27946, "values")),
        ("256KiB", (262144, "bytes")),
        ("2MB", (2_000_000, "bytes")),
        ("1500000B", (1_500_000, "bytes")),
        ("1.5 MiB", (1_572_864, "bytes")),
    ],
)
def test_parse_budget(raw, expected):
    b = parse_budget(raw)
    assert (b.amount, b.unit) == expected


@pytest.mark.parametrize("raw", [0, -5, "256", "12 parsecs", True, 1.5, "0KiB"])
def test_bad_budgets_name_the_value_and_the_fix(raw):
    with pytest.raises(ValueError, match=r"memory_budget=.*(int|unit|positive|budget)"):
        trady_peft.TraDyConfig(memory_budget=raw)


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


def budget_model(budget, strategy="trady", **kwargs):
    return get_peft_model(
        mbv2(),
        trady_peft.TraDyConfig(memory_budget=budget, strategy=strategy, modules_to_save=["classifier"], **kwargs),
    )


@pytest.mark.parametrize("strategy", ["trady", "s-top-k-random", "d-full-random", "s-full-random"])
@pytest.mark.parametrize("budget", [27_946, 66_592, 93_696])
def test_every_strategy_stays_within_the_budget_over_periods(strategy, budget):
    model = budget_model(budget, strategy)
    tuner = model.base_model
    model(IMAGE)  # the first forward probes shapes and draws
    costs, selections = [], []
    for _ in range(4):
        costs.append(tuner.selected_cost())
        selections.append([m.trady_idx["default"].tolist() for _, m in tuner.trady_layers("default")])
        tuner.next_period()
    assert all(0 < c <= budget for c in costs), costs
    if strategy.startswith("s-"):
        assert all(s == selections[0] for s in selections)
    else:
        assert any(s != selections[0] for s in selections[1:])


def test_top_k_strategies_draw_only_inside_the_ranked_layers():
    names = conv_names(mbv2())
    ranking = list(reversed(names))  # any order: the test only needs a known top-K
    model = budget_model(66_592, layer_ranking=ranking, top_k=10)
    model(IMAGE)
    tuner = model.base_model
    top = {n for n in ranking[:10]}
    for _ in range(3):
        for name, layer in tuner.trady_layers("default"):
            if name not in top:
                assert layer.trady_delta["default"].count == 0, name
        tuner.next_period()
    assert tuner.selection_summary()["candidate_layers"] == 10


def test_budget_too_small_or_too_large_is_reported():
    with pytest.raises(ValueError, match="too small for a single channel"):
        budget_model(10)(IMAGE)
    with pytest.raises(ValueError, match="covers every candidate channel"):
        budget_model(2_000_000)(IMAGE)


def test_trainable_state_never_exceeds_the_budget_whatever_the_draw():
    budget = 27_946
    model = budget_model(budget)
    model.train()
    tuner = model.base_model
    batch = torch.randn(4, 3, 128, 128)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for period in range(5):
        if period:
            tuner.next_period(optimizer=optimizer)
        mem = trady_peft.measure_training_step(model, batch, optimizer)
        optimizer.zero_grad()
        bank_bytes = mem.trainable_parameters - 4 * head
        assert bank_bytes <= 4 * budget  # one fp32 per unit: the bank never outgrows the budget
        assert mem.gradients - 4 * head <= 4 * budget
        selected_weights = sum(m.trady_delta["default"].numel for _, m in tuner.trady_layers("default"))
        assert selected_weights <= tuner.trady_bank["default"].weight.numel()
        assert tuner.selected_cost() <= budget


def test_byte_budget_accounts_for_the_real_batch():
    model = budget_model("300KiB", optimizer_state_bytes=0)
    batch = torch.randn(8, 3, 128, 128)
    model(batch)
    tuner = model.base_model
    assert 0 < tuner.selected_cost() <= 300 * 1024
    bank = tuner.trady_bank["default"].weight
    assert bank.numel() * 8 == int(300 * 1024 * 0.5) // 8 * 8  # bank_share of the budget, fp32 parameter + gradient
    # What autograd keeps for the selected channels is the byte budget's activation part.
    acts = sum(
        tuner.layer_costs[n].activations * 8 * 4 * m.trady_delta["default"].count
        for n, m in tuner.trady_layers("default")
    )
    assert acts + bank.numel() * 8 == tuner.selected_cost()


def test_evaluation_before_training_does_not_fix_the_byte_accounting():
    model = budget_model("300KiB", optimizer_state_bytes=0)
    with torch.no_grad():
        model(torch.randn(64, 3, 128, 128))  # a large evaluation batch first
    tuner = model.base_model
    assert tuner.selection_summary()["selected_channels"] == 0  # still waiting for a training batch
    model(torch.randn(8, 3, 128, 128))
    assert all(c.batch_size == 8 for c in tuner.layer_costs.values())
