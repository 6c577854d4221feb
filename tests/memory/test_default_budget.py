"""The default budget: an adapter whose config sets no memory_budget, step_memory or channels_per_layer
gets a byte budget whose bank holds as many trainable values as peft's LoRA r=8 trains on the same
layers. The LoRA side is counted by peft itself (its ``lora_`` parameters) and measured by
`measure_training_step`, not by the formula under test."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama
from trady_peft.memory.budget import parse_budget


class ConvAndLinear(nn.Module):
    """A plain convolution and a Linear, wide enough that LoRA r=8 trains fewer values than either weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 48)

    def forward(self, pixel_values):
        return self.fc(self.conv(pixel_values).mean(dim=(2, 3)))


def conv_and_linear() -> nn.Module:
    torch.manual_seed(0)
    return ConvAndLinear()


def lora_r8_values(build, names: list[str]) -> int:
    """What peft's LoRA r=8 trains on ``names`` of a fresh ``build()``, by its own parameters."""
    lora = get_peft_model(build(), LoraConfig(r=8, target_modules=names))
    return sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def bank_values(model, adapter: str = "default") -> int:
    return model.base_model.trady_bank[adapter].weight.numel()


@pytest.mark.parametrize("build", [tiny_llama, conv_and_linear])
def test_without_a_budget_the_bank_holds_the_values_lora_r8_trains_on_the_same_layers(build):
    model = get_peft_model(build(), trady_peft.TraDyConfig())
    names = [n for n, _ in model.base_model.trady_layers()]
    config = model.peft_config["default"]
    assert config.channels_per_layer is None and config.step_memory is None
    assert parse_budget(config.memory_budget).unit == "bytes"  # written into the config: a saved adapter keeps it
    assert bank_values(model) == lora_r8_values(build, names) > 0
    # A second adapter on fewer layers gets its own, smaller default.
    model.add_adapter("other", trady_peft.TraDyConfig(target_modules=[names[0]]))
    assert bank_values(model, "other") == lora_r8_values(build, [names[0]]) < bank_values(model)


@pytest.mark.parametrize(("optimizer_state_bytes", "bank_share"), [(8, 0.5), (0, 0.5), (8, 0.25), (4, 0.7)])
def test_the_default_bank_does_not_depend_on_the_optimizer_or_the_share_and_the_rest_bounds_saved_inputs(
    optimizer_state_bytes, bank_share
):
    config = trady_peft.TraDyConfig(optimizer_state_bytes=optimizer_state_bytes, bank_share=bank_share)
    model = get_peft_model(tiny_llama(), config)
    names = [n for n, _ in model.base_model.trady_layers()]
    values = bank_values(model)
    assert values == lora_r8_values(tiny_llama, names)
    budget = parse_budget(model.peft_config["default"].memory_budget).amount
    bank_bytes = values * (8 + optimizer_state_bytes)
    assert bank_bytes <= budget * bank_share < bank_bytes + 8 + optimizer_state_bytes  # the bank fills its share
    assert budget - bank_bytes == pytest.approx(bank_bytes * (1 - bank_share) / bank_share, abs=2)


def test_a_training_step_keeps_the_trainable_state_lora_r8_keeps_on_the_same_layers():
    batch = {"input_ids": torch.randint(0, 64, (2, 12)), "labels": torch.randint(0, 64, (2, 12))}
    trady = get_peft_model(tiny_llama(), trady_peft.TraDyConfig()).train()
    names = [n for n, _ in trady.base_model.trady_layers()]
    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=names)).train()
    kept = {}
    for label, model in (("trady", trady), ("lora", lora)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        mem = trady_peft.measure_training_step(model, batch, optimizer)
        kept[label] = (mem.trainable_parameters, mem.gradients, mem.optimizer_state)
    (params, grads, state), (lora_params, lora_grads, lora_state) = kept["trady"], kept["lora"]
    assert (params, grads) == (lora_params, lora_grads) and params > 0
    # AdamW's two moments in both; beyond them only its step counters (one per LoRA factor, one for the bank)
    assert 0 < state - 2 * params <= lora_state - 2 * lora_params
    summary = trady.base_model.selection_summary()
    assert 0 < summary["selected_cost"] <= summary["budget"]


def test_the_default_budget_is_saved_and_a_loaded_adapter_holds_the_same_bank(tmp_path):
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    budget = model.peft_config["default"].memory_budget
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["memory_budget"] == budget
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=trainable)
        assert loaded.peft_config["default"].memory_budget == budget
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert bank_values(loaded) == bank_values(model)  # resumed training: the same bank


def test_a_default_budget_that_holds_every_channel_of_a_small_model_does_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(modules_to_save=["classifier"]))
    assert not [w for w in caught if "memory_budget" in str(w.message)]
    # LoRA r=8 would train more values than these small weights hold: the bank holds each weight whole.
    weights = sum(layer.base_layer.weight.numel() for _, layer in model.base_model.trady_layers())
    assert bank_values(model) == weights


def test_a_channel_count_or_a_budget_given_leaves_no_default():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.5))
    config = model.peft_config["default"]
    assert config.memory_budget is None and config.strategy == "trady"  # MeDyate needs a budget
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="16KiB"))
    assert model.peft_config["default"].memory_budget == "16KiB"


def test_a_config_given_the_default_of_one_model_refuses_a_model_of_another_size():
    config = trady_peft.TraDyConfig()
    first = get_peft_model(tiny_llama(), config)
    assert first.peft_config["default"] is config  # peft keeps the caller's object: the default is written there
    budget = config.memory_budget
    same = get_peft_model(tiny_llama(seed=1), config)  # the same layers: the same default, accepted
    assert same.peft_config["default"].memory_budget == budget and bank_values(same) == bank_values(first)
    with pytest.raises(
        ValueError,
        match=rf"memory_budget='{budget}' as the default budget of another model's .* "
        r"Pass a new TraDyConfig\(\) for each model",
    ):
        get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128), config)
    wide = get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128), trady_peft.TraDyConfig())  # the fix
    assert bank_values(wide) > bank_values(first)
