"""`measure_training_step` counts what trains: parameters, gradients and optimizer state hold the
selected channels and the head, and nothing dense."""

from __future__ import annotations

import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn


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
