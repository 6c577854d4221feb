"""Which optimizer a period change resets, and an optimizer that cannot train the adapter."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn

IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 3])


def _step(model, optimizer):
    model(pixel_values=IMAGES, labels=LABELS)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()


def test_next_period_without_the_optimizer_resets_the_one_that_trained_the_bank():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, optimizer)
    bank = model.base_model.trady_bank["default"].weight
    assert optimizer.state[bank]["exp_avg"].abs().sum() > 0
    before = {n: layer.trady_idx["default"].clone() for n, layer in model.base_model.trady_layers()}
    trady_peft.next_period(model)  # no optimizer passed: the one seen stepping the bank is reset
    changed = [
        layer.trady_delta["default"]
        for n, layer in model.base_model.trady_layers()
        if not torch.equal(layer.trady_idx["default"], before[n])
    ]
    assert changed
    for view in changed:
        moments = optimizer.state[bank]["exp_avg"].narrow(0, view.offset, view.numel)
        assert moments.abs().sum() == 0  # no stale moments of the previous channel


def test_an_optimizer_built_before_get_peft_model_is_refused_at_its_first_step():
    base = tiny_cnn()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-2)  # holds the base weights, not the bank
    model = get_peft_model(base, trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    model(pixel_values=IMAGES, labels=LABELS)["loss"].backward()
    with pytest.raises(ValueError, match="built before get_peft_model"):
        optimizer.step()
    good = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, good)  # the fix the message gives works


def test_a_model_whose_optimizer_was_seen_still_pickles_and_copies():
    import copy
    import pickle

    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    _step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(clone(pixel_values=IMAGES)["logits"], model(pixel_values=IMAGES)["logits"])
