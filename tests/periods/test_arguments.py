"""next_period checks every argument before anything changes, naming the value and a fix that works."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

import trady_peft
from tests.tiny_models import tiny_cnn


def trained():
    torch.manual_seed(0)
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=400, modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.zeros(4, dtype=torch.long))["loss"].backward()
    optimizer.step()
    return model, optimizer


def snapshot(model) -> dict:
    tuner = model.base_model
    state = tuner.selection_states["default"]
    return {
        "period": state.period,
        "selection": {n: t.tolist() for n, t in (state.selection or {}).items()},
        "bank": tuner.trady_bank["default"].weight.detach().clone(),
        "store": {n: m.trady_values["default"].clone() for n, m in tuner.trady_layers("default")},
    }


def same(a: dict, b: dict) -> bool:
    return (
        a["period"] == b["period"]
        and a["selection"] == b["selection"]
        and torch.equal(a["bank"], b["bank"])
        and all(torch.equal(a["store"][n], b["store"][n]) for n in a["store"])
    )


LOADER = DataLoader([{"pixel_values": torch.randn(3, 16, 16), "labels": 0}] * 4, batch_size=2)


def params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (lambda m: dict(period=1.5), ["period=1.5 must be an int >= 0", "or None for the next one"]),
        (lambda m: dict(period=-1), ["period=-1 must be an int >= 0"]),
        (lambda m: dict(period=True), ["period=True must be an int >= 0"]),
        (lambda m: dict(adapter="nope"), ["adapter 'nope' is not an adapter of this model", "one of ['default']"]),
        (lambda m: dict(optimizer=params(m)), ["optimizer=[", "(list) is not an optimizer", "Pass the torch.optim"]),
        (lambda m: dict(optimizer=LOADER), ["(DataLoader) is not an optimizer", "Pass a data loader as batches="]),
        (lambda m: dict(batches=5), ["batches=5 (int) is not iterable", "pass the training data loader"]),
    ],
    ids=["float period", "negative period", "bool period", "unknown adapter", "parameters", "loader", "batches"],
)
def test_a_bad_argument_is_refused_before_anything_changes(arguments, fragments):
    model, optimizer = trained()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        trady_peft.next_period(model, **arguments(model))
    message = str(info.value)
    assert all(f in message for f in fragments), message
    assert same(snapshot(model), before)
    # The fix the message gives works, and the adapter still trains.
    assert trady_peft.next_period(model, optimizer, batches=LOADER) == 1
    assert model.base_model.selection_states["default"].selection is not None
