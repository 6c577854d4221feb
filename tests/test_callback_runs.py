"""A second training run on a trained adapter continues its periods instead of replaying them."""

from __future__ import annotations

import logging

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import trady_peft
from tests.tiny_models import ColourImages, tiny_cnn


def trainer_for(model, tmp_path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=ColourImages(32), callbacks=[trady_peft.TraDyCallback()])


def touched(model) -> int:
    return model.base_model.selection_summary()["touched_channels"]


def test_train_twice_and_a_stage_two_trainer_continue_the_periods(tmp_path, caplog):
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(channels_per_layer=1, modules_to_save=["classifier"], strategy="d-full-random")
    model = get_peft_model(tiny_cnn(), config)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()
    tuner = model.base_model
    assert tuner.period() == 1  # epochs 0 and 1
    first_run = touched(model)
    model.save_pretrained(tmp_path / "stage1")

    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        trainer.train()  # again: periods 1 (continued) and 2, not 0 and 1 once more
    assert tuner.period() == 2
    assert touched(model) > first_run
    assert "carries period 1 from an earlier run" in caplog.text

    # Stage 2: a new Trainer on the reloaded stage-1 adapter.
    reloaded = PeftModel.from_pretrained(tiny_cnn(), tmp_path / "stage1", is_trainable=True)
    assert reloaded.base_model.period() == 1
    trainer_for(reloaded, tmp_path / "stage2").train()
    assert reloaded.base_model.period() == 2
    assert touched(reloaded) > first_run
