"""The byte budget follows whether gradients flow, not the modules' training mode."""

from __future__ import annotations

import torch
from peft import get_peft_model

import trady_peft
from tests.references import measured_footprint
from tests.tiny_models import tiny_cnn

BUDGET = 32 * 1024


def images(size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(size, 3, 32, 32, generator=g),
        "labels": torch.randint(0, 4, (size,), generator=g),
    }


def test_a_loop_that_never_calls_train_keeps_the_byte_budget_for_a_larger_batch():
    """A model left in eval mode (as from_pretrained returns it) and trained with batch 2, then 8: the
    larger batch is priced before it runs, so the measured footprint stays within the budget."""
    config = trady_peft.TraDyConfig(
        memory_budget=f"{BUDGET}B", strategy="d-full-random", modules_to_save=["classifier"]
    )
    model = get_peft_model(tiny_cnn(), config).eval()  # never model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = model.base_model
    for step, size in enumerate([2, 8]):
        footprint, saved = measured_footprint(model, images(size, step), optimizer)
        optimizer.step()
        optimizer.zero_grad()
        assert saved > 0
        assert footprint <= BUDGET, (size, footprint)
        assert tuner.selected_cost() <= BUDGET
    assert all(cost.batch_size == 8 for cost in tuner.layer_costs.values())
