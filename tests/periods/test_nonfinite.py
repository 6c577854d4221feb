"""Non-finite gradients and deltas: MeDyate's statistics skip the steps an optimizer skipped, and a
bank holding NaN or infinite values is refused at the period change and at save, keeping the store."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cnn_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def medyate_cnn():
    model = get_peft_model(
        tiny_cnn(), trady_peft.TraDyConfig(memory_budget=400, strategy="medyate", modules_to_save=["classifier"])
    )
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def norms_of(model) -> dict[str, torch.Tensor]:
    return dict(model.base_model.selection_states["default"].statistics.norms)


def test_medyate_keeps_exploring_after_a_step_the_grad_scaler_skipped(caplog):
    """Tiny Llama, fp16 autocast and GradScaler, one overflowing step: the norms stay finite and every
    period touches new channels (before, the overflow's NaN norms froze the draw on one layer)."""
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(memory_budget="96KiB", strategy="medyate", target_modules=LLAMA_TARGETS)
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(0)
    touched = []
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        for period in range(4):
            if period:
                trady_peft.next_period(model, optimizer)
            for step in range(3):
                ids = torch.randint(0, 64, (2, 12), generator=g)
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = model(input_ids=ids, labels=ids).loss
                if (period, step) == (0, 1):
                    loss = loss * float("inf")  # the scaler finds inf gradients and skips this step
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            touched.append(model.base_model.selection_summary()["touched_channels"])
    assert scaler.get_scale() < 65536.0  # the step really was skipped
    assert all(torch.isfinite(n).all() for n in norms_of(model).values())
    assert all(b > a for a, b in zip(touched, touched[1:])), touched
    assert "a training step was skipped or its gradient was not finite" in caplog.text


@pytest.mark.parametrize("skipped", [0, 2])  # before the first optimizer step, and after it
def test_a_backward_skipped_by_a_non_finite_loss_guard_is_left_out_of_the_statistics(skipped):
    """A loop that runs backward, finds a non-finite loss and skips the step ends with the statistics of
    a loop that never saw that batch."""
    runs = []
    for guard in (True, False):
        torch.manual_seed(0)
        model, optimizer = medyate_cnn()
        for period in range(2):
            if period:
                trady_peft.next_period(model, optimizer)
            for step, (x, y) in enumerate(cnn_batches(4, seed=period)):
                if period == 0 and step == skipped:
                    if not guard:
                        continue
                    loss = model(pixel_values=x, labels=y)["loss"] * float("nan")
                    loss.backward()
                    assert not torch.isfinite(loss)
                    optimizer.zero_grad()  # the guard: skip the step
                    continue
                model(pixel_values=x, labels=y)["loss"].backward()
                optimizer.step()
                optimizer.zero_grad()
        runs.append(norms_of(model))
    guarded, reference = runs
    assert guarded.keys() == reference.keys() and guarded
    for name in guarded:
        torch.testing.assert_close(guarded[name], reference[name], rtol=1e-6, atol=0.0)


def test_gradient_accumulation_counts_every_micro_batch_of_a_step():
    torch.manual_seed(0)
    model, optimizer = medyate_cnn()
    statistics = model.base_model.selection_states["default"].statistics
    for x, y in cnn_batches(3):
        model(pixel_values=x, labels=y)["loss"].backward()
    optimizer.step()  # the first step seen: the backwards before it were committed one by one
    assert statistics.steps == 3 and statistics.pending_steps == 0
    optimizer.zero_grad()
    for x, y in cnn_batches(2, seed=1):
        model(pixel_values=x, labels=y)["loss"].backward()
    assert statistics.steps == 3 and statistics.pending_steps == 2  # provisional until the step
    optimizer.step()
    assert statistics.steps == 5 and statistics.pending_steps == 0


def diverged_cnn(tmp_path):
    """A CNN adapter saved after period 0, then a period whose second SGD step was NaN."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = cnn_batches(3)
    for x, y in batches:
        model(pixel_values=x, labels=y)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    trady_peft.next_period(model, optimizer)
    model.save_pretrained(tmp_path / "good")
    for step, (x, y) in enumerate(batches):
        loss = model(pixel_values=x, labels=y)["loss"]
        (loss * float("nan") if step == 1 else loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_a_nan_step_is_refused_at_the_period_change_and_at_save_and_the_store_is_kept(tmp_path):
    model, optimizer = diverged_cnn(tmp_path)
    tuner = model.base_model
    store = {n: m.trady_values["default"].clone() for n, m in tuner.trady_layers("default")}
    with pytest.raises(FloatingPointError, match=r"period 1 .*layer 'stem'.*optimizer step 2 of the period") as info:
        trady_peft.next_period(model, optimizer)
    assert "lower the learning rate" in str(info.value)
    assert tuner.period() == 1  # nothing changed
    for n, m in tuner.trady_layers("default"):
        assert torch.equal(m.trady_values["default"], store[n]) and torch.isfinite(store[n]).all()
    with pytest.raises(FloatingPointError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()
    # The last good file loads.
    PeftModel.from_pretrained(tiny_cnn(), tmp_path / "good")
