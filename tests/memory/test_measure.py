"""Acceptance 2-3: what autograd keeps and what trains, measured with measure_training_step."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft
from tests.tiny_models import Holder, tiny_cnn

CASES = {
    # name: (layer factory, input shape, k channels)
    "linear": (lambda: nn.Linear(64, 32), (8, 16, 64), 8),
    "conv2d": (lambda: nn.Conv2d(32, 16, 3, padding=1), (4, 32, 12, 12), 4),
    "conv2d_depthwise": (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32), (4, 32, 12, 12), 4),
    "hf_conv1d": (lambda: Conv1D(32, 64), (8, 16, 64), 8),
}


def saved_by_layer(model, x) -> int:
    mem = trady_peft.measure_training_step(model, x)
    return sum(v for k, v in mem.saved_by_module.items() if k.endswith("layer") or ".layer." in k)


@pytest.mark.parametrize("kind", list(CASES))
def test_sparse_layer_keeps_only_selected_input_channels(kind):
    factory, shape, k = CASES[kind]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)  # as if the layer sat inside a network
    model = get_peft_model(Holder(factory()), trady_peft.TraDyConfig(target_modules=["layer"], channels_per_layer=k))
    channels = x.shape[-1] if kind in ("linear", "hf_conv1d") else x.shape[1]
    full_input_bytes = x.numel() * x.element_size()

    saved = saved_by_layer(model, x)

    # The index tensor is a resident buffer of the layer, so it is not part of the saved bytes.
    assert saved == full_input_bytes * k // channels


@pytest.mark.parametrize("kind", list(CASES))
def test_lora_on_the_same_layer_keeps_the_full_input(kind):
    factory, shape, _ = CASES[kind]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    # peft LoRA needs a rank divisible by the groups of a grouped conv.
    rank = 32 if kind == "conv2d_depthwise" else 4
    model = get_peft_model(Holder(factory()), LoraConfig(target_modules=["layer"], r=rank))
    assert saved_by_layer(model, x) >= x.numel() * x.element_size()


def test_trainable_state_holds_only_selected_channels_and_the_head():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_cnn(),
        trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    mem = trady_peft.measure_training_step(model, batch, optimizer)

    tuner = model.base_model
    layers = tuner.trady_layers("default")
    assert [n.split(".")[-1] for n, _ in layers] == ["stem", "dw", "pw"]
    selected_values = sum(layer.trady_delta["default"].numel for _, layer in layers)
    head = model.base_model.model.classifier.modules_to_save["default"]
    head_values = sum(p.numel() for p in head.parameters())
    assert selected_values == 2 * (8 * 3 * 3) + 2 * (1 * 3 * 3) + 2 * (8 * 1 * 1)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == selected_values + head_values
    for _, layer in layers:  # nothing dense per sparse layer is trainable
        assert not layer.base_layer.weight.requires_grad
    assert mem.trainable_parameters == 4 * (selected_values + head_values)
    assert mem.gradients == 4 * (selected_values + head_values)
    # AdamW: two moments per trained value, plus one scalar step counter per parameter.
    assert mem.optimizer_state == 2 * 4 * (selected_values + head_values) + 4 * len(trainable)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
