"""A byte budget is a bound on what is measured, at every step, whatever the batch."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_llama

BUDGET = 24 * 1024


def measured_footprint(model, batch, optimizer) -> tuple[int, int]:
    """What the adapter adds to one training step, measured independently of the tuner's prices:
    the saved inputs attributed to the TraDy layers (saved-tensor hooks), and the bank's parameter,
    gradient and per-value optimizer state. Returns (footprint bytes, saved-input bytes)."""
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    tuner = model.base_model
    layers = {n for n, _ in tuner.trady_layers("default")}
    saved = sum(b for name, b in mem.saved_by_module.items() if name.removeprefix("base_model.model.") in layers)
    bank = tuner.trady_bank["default"].weight
    state = optimizer.state.get(bank, {})
    per_value_state = sum(
        v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.shape == bank.shape
    )
    assert bank.grad is not None
    return saved + 2 * bank.numel() * bank.element_size() + per_value_state, saved


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


def test_the_bank_is_a_share_of_the_byte_budget_not_all_of_it():
    for share in (0.25, 0.75):
        config = trady_peft.TraDyConfig(memory_budget="40KiB", bank_share=share, strategy="d-full-random")
        model = get_peft_model(tiny_llama(), config)
        bank = model.base_model.trady_bank["default"].weight
        # fp32 parameter + gradient + 8 B of AdamW state per value
        assert bank.numel() * 16 <= share * 40 * 1024 < (bank.numel() + 1) * 16


def test_without_repricing_a_longer_batch_would_exceed_the_budget(monkeypatch):
    """The property above fails when the tuner keeps the first batch's prices."""
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured_footprint(model, batch(2, 8, 0), optimizer)
    monkeypatch.setattr(type(model.base_model.periods), "probe", lambda self, inputs: None)
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


def test_a_grad_enabled_evaluation_pass_does_not_reprice_the_run():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=f"{BUDGET}B", strategy="d-full-random"))
    model.train()
    model(**batch(2, 8, 0))
    costs = dict(model.base_model.selection_states["default"].costs)
    model.eval()
    model(**batch(8, 48, 1))  # validation without torch.no_grad
    assert model.base_model.selection_states["default"].costs == costs


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


def test_the_memory_report_prints_budget_and_measured_footprint():
    import re

    from tests.tiny_models import tiny_cnn
    from trady_peft.report import compare_memory

    config = trady_peft.TraDyConfig(memory_budget="6KiB", strategy="d-full-random", modules_to_save=["classifier"])
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    report = compare_memory(tiny_cnn, batch, config)
    note = report.row("TraDy").note
    found = re.search(
        r"measured footprint ([\d,]+) B \(bank ([\d,]+) \+ saved inputs ([\d,]+)\) of the 6,144-byte", note
    )
    assert found, note
    total, bank, saved = (int(g.replace(",", "")) for g in found.groups())
    assert total == bank + saved <= 6144 and saved > 0
