"""A budget holds in every period: each draw stays within it, whatever the strategy, and a byte budget
is a bound on what is measured at every step, whatever the batch (the probe prices the first training
batch and reprices for larger ones)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.references import measured_footprint
from tests.tiny_models import conv_names, paper_mobilenet_v2, tiny_llama
from trady_peft.periods import lifecycle

BUDGET = 24 * 1024
IMAGE = torch.zeros(1, 3, 128, 128)


# ------------------------------------------------ a byte budget bounds what a step keeps
def batch(size: int, length: int, seed: int) -> dict:
    ids = torch.randint(0, 64, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_adapter_footprint_stays_within_the_byte_budget_for_longer_and_larger_batches():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner = model.base_model
    seen = []
    # Dynamic padding: the second batch is longer, the third larger, the last one short.
    for step, (size, length) in enumerate([(2, 8), (2, 32), (8, 48), (8, 20), (3, 5)]):
        footprint, saved = measured_footprint(model, batch(size, length, step), optimizer)
        optimizer.step()
        optimizer.zero_grad()
        assert footprint <= BUDGET, (step, footprint)
        assert saved > 0
        assert tuner.selected_cost() <= BUDGET
        seen.append((saved, dict(tuner.selection_states["default"].selection)))
    # The longer batches were priced: later periods select fewer channels than the first.
    count = [sum(t.numel() for t in sel.values()) for _, sel in seen]
    assert count[2] < count[0]
    summary = tuner.selection_summary()
    assert summary["unit"] == "bytes" and 0 < summary["budget_used"] <= 1


def test_without_repricing_a_longer_batch_would_exceed_the_budget(monkeypatch):
    """The property above fails when the tuner keeps the first batch's prices."""
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured_footprint(model, batch(2, 8, 0), optimizer)
    monkeypatch.setattr(type(model.base_model.periods.prices), "probe", lambda self, inputs: None)
    footprint, _ = measured_footprint(model, batch(8, 48, 1), optimizer)
    assert footprint > BUDGET


@pytest.mark.parametrize("budget", ["100B", 100])
def test_a_period_never_trains_nothing_when_one_channel_fits(budget, caplog):
    """A budget that barely holds a channel still trains one, and says so with the numbers."""
    costs = []
    config = trady_peft.TraDyConfig(memory_budget=budget, strategy="d-full-random", bank_share=0.9)
    try:
        model = get_peft_model(tiny_llama(), config)
        model.train()
        for period in range(4):
            if period:
                model.base_model.next_period()
            model(**batch(1, 1, period))
            costs.append(model.base_model.selection_summary()["selected_channels"])
    except ValueError as err:  # too small for one channel: refused with the numbers instead
        assert "too small for a single channel" in str(err)
        return
    assert all(c >= 1 for c in costs)
    assert "trains only" in caplog.text


def test_a_count_of_channels_asked_for_gets_no_budget_warning(caplog):
    """A period of fewer than four channels warns about memory_budget only when the user set one."""
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=1, target_modules=["q_proj"]))
    model.base_model.next_period()
    assert model.base_model.selection_summary()["selected_channels"] == 2  # q_proj of 2 blocks
    assert "memory_budget" not in caplog.text and "trains only" not in caplog.text


def test_a_batch_as_long_as_one_and_as_large_as_another_is_priced():
    """(8, 16) then (4, 32) then (8, 32): the last is covered by the prices of the first two."""
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, (size, length) in enumerate([(8, 16), (4, 32), (8, 32)]):
        footprint, _ = measured_footprint(model, batch(size, length, step), optimizer)
        assert footprint <= BUDGET, (step, footprint)


def test_the_probe_leaves_random_streams_and_batch_norm_statistics_alone():
    from tests.tiny_models import tiny_cnn

    config = trady_peft.TraDyConfig(memory_budget=300, memory_saving_frozen_path=False)
    model = get_peft_model(tiny_cnn(), config)
    model.train()
    bn = model.base_model.model.bn1
    images = torch.randn(4, 3, 16, 16)
    before, rng = bn.running_mean.clone(), torch.get_rng_state()
    model.base_model.probe(images)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0


def test_an_evaluation_pass_reprices_only_when_gradients_flow():
    """Under no_grad nothing is kept for backward; without it autograd keeps the inputs, in eval mode too."""
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    model(**batch(2, 8, 0))
    costs = dict(model.base_model.selection_states["default"].costs)
    model.eval()
    with torch.no_grad():
        model(**batch(8, 48, 1))
    assert model.base_model.selection_states["default"].costs == costs
    model(**batch(8, 48, 1))  # validation without torch.no_grad
    assert model.base_model.selection_states["default"].costs != costs


def test_nested_inputs_are_probed():
    from torch import nn

    class TakesAList(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, parts):
            return self.b(self.a(torch.cat(parts["x"], dim=1)))

    model = get_peft_model(TakesAList(), trady_peft.TraDyConfig(memory_budget=30, target_modules=["a", "b"]))
    out = model.base_model.model({"x": [torch.randn(2, 4), torch.randn(2, 4)]})
    out.sum().backward()
    assert model.base_model.selection_summary()["selected_channels"] > 0


# ---------------------------------------------- draws within the budget, period after period
def budget_model(budget, strategy="trady", **kwargs):
    return get_peft_model(
        paper_mobilenet_v2(),
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
    names = conv_names(paper_mobilenet_v2())
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


def test_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="too small for a single channel"):
        budget_model(10)(IMAGE)


def _suggested_budget(text: str):
    found = re.findall(r"memory_budget=('[0-9]+KiB'|[0-9]+), for TraDy to choose", text)
    assert found, text
    return eval(found[-1])  # the literal the message suggests: '123KiB' or 123


def _all_candidates(tuner) -> int:
    return sum(m.geometry.in_channels for _, m in tuner.periods.candidate_layers())


@pytest.mark.parametrize("budget", [2_000_000, "1.5GiB", "16 MB"])
def test_a_budget_above_every_channel_warns_at_creation_and_trains_them_all(budget, caplog):
    """A budget above what every candidate channel costs is told at get_peft_model (the trainable state, known
    then) and at the first forward (with the saved inputs), with the cost; every candidate channel trains; the
    budget the message suggests makes TraDy choose."""
    lifecycle._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        model = budget_model(budget)
        created = caplog.text
        tuner = model.base_model
        weights = sum(m.geometry.in_channels * m.geometry.slice_numel for _, m in tuner.periods.candidate_layers())
        per_value = 1 if isinstance(budget, int) else 16  # values, or fp32 param + grad + AdamW's two moments
        assert "leaves the bank more than the trainable state of every candidate channel" in created
        assert f"{weights * per_value:,}" in created
        model(IMAGE)
    drawn = caplog.text[len(created) :]
    assert "covers every candidate channel" in drawn
    cost = int(re.search(r"candidate layers cost ([0-9,]+)", drawn).group(1).replace(",", ""))
    assert cost == tuner.selected_cost()  # the cost named is what the selection spends
    assert tuner.selection_summary()["selected_channels"] == _all_candidates(tuner)
    fix = _suggested_budget(drawn)
    lifecycle._warn_once.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        fixed = budget_model(fix)
        fixed(IMAGE)
    assert "covers every candidate channel" not in caplog.text
    assert 0 < fixed.base_model.selection_summary()["selected_channels"] < _all_candidates(fixed.base_model)


def test_the_creation_warning_suggests_a_budget_that_leaves_the_bank_short(caplog):
    lifecycle._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        budget_model("1.5GiB")
    fix = _suggested_budget(caplog.text)
    lifecycle._warn_once.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        budget_model(fix)
    assert "trainable state of every candidate channel" not in caplog.text


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
