"""A strategy that needs channel scores before its first draw (Det-RGN), in a plain loop that never
scored: the first training batch is scored, so the first step trains; a batch that cannot be
scored is refused with the call that fixes it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader

import trady_peft
from tests.tiny_models import CountingText, tiny_bert, tiny_llama


def det_rgn_llama():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="32KiB", strategy="d-det-rgn"))
    return model.train()


def prepared(model):
    """``model``, its AdamW and a dataloader of counting sequences, through accelerate."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader(CountingText(32), batch_size=8)
    return Accelerator(cpu=True).prepare(model, optimizer, loader)


def test_det_rgn_scores_the_first_batch_and_trains_from_the_first_step_in_an_accelerate_loop():
    model = det_rgn_llama()
    unscored = copy.deepcopy(model)
    model, optimizer, loader = prepared(model)
    tuner, bank = model.base_model, model.base_model.trady_bank["default"].weight
    first = next(iter(loader))
    with torch.no_grad():
        before = float(model(**first)["loss"])  # without grad: neither probes nor scores
    assert tuner.phase().value == "waiting for shapes"
    accelerator = Accelerator(cpu=True)
    for step, batch in enumerate(loader):
        loss = model(**batch)["loss"]
        if step == 0:
            assert tuner.phase().value == "drawn" and tuner.selection_summary()["selected_channels"] > 0
            assert all(p.grad is None for p in model.parameters())  # scoring left no gradient behind
            assert not any(m.base_layer.weight.requires_grad for _, m in tuner.trady_layers())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            assert bank.abs().sum() > 0  # the first step trained the selected channels
    with torch.no_grad():
        after = float(model(**first)["loss"])
    assert after < before

    scores = tuner.selection_states["default"].scores
    expected = unscored.base_model.score_channels([first])  # the first batch, scored on a copy
    assert set(scores) == set(expected)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])


def test_scoring_the_first_batch_trains_as_scoring_it_before_the_loop():
    """Same channels and, with dropout on, the same random streams: the scoring forward draws none."""
    batches = [
        {"input_ids": torch.randint(0, 64, (4, 8), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for g in [torch.Generator().manual_seed(i) for i in range(3)]
    ]

    def train(score_before: bool):
        torch.manual_seed(0)
        model = get_peft_model(tiny_bert(), trady_peft.TraDyConfig(memory_budget="16KiB", strategy="d-det-rgn"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(1)  # the scoring's dropout draws alike
        if score_before:
            trady_peft.next_period(model, optimizer, batches=batches[:1], period=0)
            torch.manual_seed(1)  # the loop's too
        for batch in batches:
            model(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        bank = model.base_model.trady_bank["default"].weight.detach().clone()
        return bank, model.base_model.selection_states["default"].selection, torch.random.get_rng_state()

    scored_first, selection, rng = train(score_before=False)
    scored_before, expected_selection, expected_rng = train(score_before=True)
    assert scored_first.abs().sum() > 0
    assert selection.keys() == expected_selection.keys()
    assert all(torch.equal(selection[n], expected_selection[n]) for n in selection)
    torch.testing.assert_close(scored_first, scored_before, rtol=0, atol=0)
    assert torch.equal(rng, expected_rng)


def test_a_first_batch_without_labels_is_refused_with_the_call_that_fixes_it():
    model, optimizer, loader = prepared(det_rgn_llama())
    tuner, bank = model.base_model, model.base_model.trady_bank["default"].weight
    accelerator = Accelerator(cpu=True)

    def step(batch) -> float:  # the loss computed outside the model
        logits = model(input_ids=batch["input_ids"])["logits"]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    batch = next(iter(loader))
    with pytest.raises(ValueError, match=r"no loss.*next_period\(model, optimizer, batches=train_loader, period=0\)"):
        step(batch)
    assert tuner.phase().value == "waiting for scores"
    assert all(p.grad is None for p in model.parameters())

    trady_peft.next_period(model, optimizer, batches=loader, period=0)  # what the message says
    losses = [step(b) for b in loader]
    assert tuner.period() == 0 and tuner.phase().value == "drawn"
    assert bank.abs().sum() > 0 and losses[-1] < losses[0]
