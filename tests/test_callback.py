"""`TraDyCallback` under the Hugging Face Trainer: tiny GPT-2 (Conv1D), Llama (Linear) and a CNN train
(also with ``bf16=True``), a resumed run matches the uninterrupted one, ``report_to`` integrations
receive TraDy's metrics as numbers, and a dynamic strategy trained without the callback is warned about."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import trady_peft
from tests.references import folded_adapter
from tests.tiny_models import ColourImages, CountingText, tiny_cnn, tiny_gpt2, tiny_llama

CASES = {
    "gpt2": (tiny_gpt2, CountingText, {}),
    "llama": (tiny_llama, CountingText, {}),
    "cnn": (tiny_cnn, ColourImages, {"modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_epoch_with_trainer_lowers_the_loss(name, tmp_path):
    factory, dataset_cls, extra = CASES[name]
    model = get_peft_model(factory(), trady_peft.TraDyConfig(channels_per_layer=0.5, **extra))
    data = dataset_cls()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[trady_peft.TraDyCallback(resample_every_steps=4)],
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    # Untrained adapters leave the loss exactly where it was; a working one moves it clearly.
    assert after < before - 0.1, (before, after)
    assert model.base_model.period() == 4  # 16 steps, a new period every 4
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["trady/period"] for h in logged[:5]] == [0, 0, 0, 1, 1]  # the resample at step 4 runs before its log
    assert all(h["trady/selected_channels"] > 0 for h in logged)
    touched = model.base_model.selection_summary()["touched_channels"]
    assert touched > model.base_model.selection_summary()["selected_channels"]


def test_resumed_run_matches_the_uninterrupted_one(tmp_path):
    def make(output_dir, epochs):
        model = get_peft_model(
            tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"])
        )
        args = TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            save_strategy="epoch",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
        )
        return model, Trainer(
            model=model, args=args, train_dataset=ColourImages(64), callbacks=[trady_peft.TraDyCallback()]
        )

    full_model, full = make(tmp_path / "full", 3)
    full.train()
    _, interrupted = make(tmp_path / "cut", 2)
    interrupted.train()
    resumed_model, resumed = make(tmp_path / "cut", 3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))

    assert resumed_model.base_model.period() == full_model.base_model.period() == 2
    for (name, (idx_a, val_a)), (_, (idx_b, val_b)) in zip(
        folded_adapter(full_model).items(), folded_adapter(resumed_model).items()
    ):
        assert torch.equal(idx_a, idx_b), name
        torch.testing.assert_close(val_a, val_b, rtol=1e-4, atol=1e-6)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.images = torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


TRAINER_CASES = {
    "gpt2": (tiny_gpt2, lambda: CountingText(n=32), {}),
    "llama": (tiny_llama, lambda: CountingText(n=32), {}),
    "cnn": (tiny_cnn, RandomImages, {"modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_trainer_bf16_trains_the_adapter(name, tmp_path):
    factory, data, extra = TRAINER_CASES[name]
    model = get_peft_model(factory(), trady_peft.TraDyConfig(channels_per_layer=0.5, **extra))
    tuner = model.base_model
    bank = tuner.trady_bank["default"].weight
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data(), callbacks=[trady_peft.TraDyCallback(resample_every_steps=2)]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert bank.dtype == torch.float32
    assert bank.detach().abs().sum() > 0  # step 3 trained it after the resample at step 2 zeroed it
    stored = [layer.trady_values["default"] for _, layer in tuner.trady_layers("default")]
    assert all(v.dtype == torch.float32 for v in stored)
    assert sum(v.abs().sum() for v in stored) > 0  # the first period's update was folded in


class Recorder(TrainerCallback):
    """Stands for a report_to integration: registered before user callbacks, reads the logs."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def trainer_for(model, tmp_path, callbacks, epochs=2):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=CountingText(n=32), callbacks=callbacks)


def test_report_to_integrations_receive_trady_metrics_as_numbers(tmp_path):
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="8KiB", strategy="d-full-random"))
    recorder = Recorder()
    trainer_for(model, tmp_path, [recorder, trady_peft.TraDyCallback()]).train()
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged and all("trady/period" in log for log in logged)
    assert {log["trady/period"] for log in logged} == {0, 1}
    for log in logged:
        assert isinstance(log["trady/budget_used"], float) and 0 < log["trady/budget_used"] <= 1
        assert isinstance(log["trady/footprint_bytes"], int) and log["trady/footprint_bytes"] <= 8 * 1024


def test_a_dynamic_strategy_without_the_callback_is_warned_about(tmp_path, caplog):
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        trainer_for(model, tmp_path, [], epochs=2).train()
    assert "never redrawn" in caplog.text and "TraDyCallback" in caplog.text


def test_the_trainer_trains_under_step_memory_and_logs_the_measured_rest(tmp_path):
    # The Trainer builds its optimizer before the first forward, while the bank is still unsized.
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(step_memory="1MiB", strategy="d-full-random"))
    recorder = Recorder()
    trainer_for(model, tmp_path, [recorder, trady_peft.TraDyCallback()]).train()
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged and {log["trady/period"] for log in logged} == {0, 1}
    bank = model.base_model.trady_bank["default"].weight
    assert bank.numel() > 0 and bool(bank.ne(0).any() or model.base_model.selection_summary()["touched_channels"])
    for log in logged:
        assert log["trady/budget_bytes"] + log["trady/step_rest_bytes"] == 2**20
        assert 0 < log["trady/footprint_bytes"] <= log["trady/budget_bytes"]
