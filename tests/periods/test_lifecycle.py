"""Moving from one period to the next: misuse refused, adapters added or scored mid-run, prices kept."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama


def llama_batch() -> dict:
    return {"input_ids": torch.arange(8).view(1, 8), "labels": torch.arange(8).view(1, 8)}


def cnn_batch() -> dict:
    return {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}


# ------------------------------------------------------------------------------- misuse
def test_next_period_refuses_an_optimizer_that_does_not_hold_the_bank():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    stray = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold the trainable bank of adapter 'default',"):
        trady_peft.next_period(model, stray)
    assert model.base_model.period() == 0  # nothing changed


def test_next_period_inside_forward_or_backward_is_refused():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    batch = llama_batch()
    layer = model.base_model.model.model.layers[0].mlp
    handle = layer.register_forward_hook(lambda *a: trady_peft.next_period(model))
    with pytest.raises(RuntimeError, match="inside a forward or backward"):
        model(**batch)
    handle.remove()
    loss = model(**batch)["loss"]
    bank = model.base_model.trady_bank["default"].weight
    errors = []

    def hook(grad):
        try:
            trady_peft.next_period(model)
        except RuntimeError as err:
            errors.append(err)

    bank.register_hook(hook)
    loss.backward()
    assert errors and "inside a forward or backward" in str(errors[0])
    trady_peft.next_period(model)  # between steps it works
    assert model.base_model.period() == 1


# ------------------------------------------------------------------- adapters mid-run
def test_an_adapter_added_after_the_probe_draws():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=400, strategy="d-full-random"))
    batch = llama_batch()
    model(**batch)
    model.add_adapter("second", trady_peft.TraDyConfig(memory_budget=400, strategy="d-full-random", seed=1))
    model.set_adapter("second")
    model(**batch)["loss"].backward()
    assert model.base_model.phase("second").value == "drawn"
    assert model.base_model.trady_bank["second"].weight.grad.abs().sum() > 0


def test_det_rgn_scoring_leaves_no_gradient_in_the_bank():
    config = trady_peft.TraDyConfig(memory_budget=400, strategy="d-det-rgn", modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config)
    batches = [cnn_batch() for _ in range(2)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trady_peft.next_period(model, optimizer, batches=batches, period=0)
    model(**batches[0])["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trady_peft.next_period(model, optimizer, batches=batches)
    assert model.base_model.trady_bank["default"].weight.grad is None


def test_loading_another_adapter_does_not_change_this_adapters_prices(tmp_path):
    config = dict(memory_budget="8KiB", strategy="d-full-random")
    other = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**config))
    other(input_ids=torch.zeros(16, 32, dtype=torch.long), labels=torch.zeros(16, 32, dtype=torch.long))
    other.save_pretrained(tmp_path / "other")
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**config))
    model(**llama_batch())
    before = dict(model.base_model.selection_states["default"].costs)
    model.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=False)
    trady_peft.next_period(model, adapter="default")
    assert model.base_model.selection_states["default"].costs == before
