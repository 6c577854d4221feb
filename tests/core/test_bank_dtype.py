"""Casting the model (``.to(torch.bfloat16)``, ``.half()``) keeps the bank and the stored deltas in fp32."""

from __future__ import annotations

import torch
from peft import get_peft_model
from safetensors.torch import load_file

import trady_peft
from tests.tiny_models import tiny_llama


def train(model, periods: int = 4) -> dict:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for period in range(periods):
        if period:
            trady_peft.next_period(model, optimizer)
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 8), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {n: m.fold("default") for n, m in model.base_model.trady_layers("default")}


def config():
    return trady_peft.TraDyConfig(channels_per_layer=2, target_modules=["q_proj", "v_proj"], strategy="d-full-random")


def test_casting_after_get_peft_model_keeps_the_adapter_fp32(tmp_path):
    cast_after = get_peft_model(tiny_llama(), config()).to(torch.bfloat16)
    tuner = cast_after.base_model
    assert tuner.trady_bank["default"].weight.dtype == torch.float32
    for _, layer in tuner.trady_layers("default"):
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.trady_values["default"].dtype == torch.float32
        assert layer.trady_indices["default"].dtype == torch.int32
    cast_before = get_peft_model(tiny_llama().to(torch.bfloat16), config())  # fp32 bank by construction
    after, before = train(cast_after), train(cast_before)
    for name in after:
        assert torch.equal(after[name][0], before[name][0])
        assert after[name][1].dtype == torch.float32
        assert torch.equal(after[name][1], before[name][1]), name
    cast_after.half()  # a second cast moves nothing either
    assert tuner.trady_bank["default"].weight.dtype == torch.float32
    cast_after.save_pretrained(tmp_path)
    values = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "trady_values" in k}
    assert values and all(v.dtype == torch.float32 for v in values.values())


def test_a_wider_cast_is_taken():
    model = get_peft_model(tiny_llama(), config()).double()
    assert model.base_model.trady_bank["default"].weight.dtype == torch.float64
    train(model, periods=2)
