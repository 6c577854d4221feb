"""Acceptance 6: tiny GPT-2 (Conv1D), Llama (Linear) and a CNN train with the HF Trainer."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_gpt2, tiny_llama


class CountingText(Dataset):
    """Token sequences that count upward mod the vocabulary: easy to learn, so loss must drop."""

    def __init__(self, n=128, length=16, vocab=64):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class ColourImages(Dataset):
    """Images whose class is the colour channel that is brightest."""

    def __init__(self, n=128):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images = torch.randn(n, 3, 16, 16, generator=g) * 0.5
        self.images[torch.arange(n), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


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


def _folded(model):
    return {name: layer.fold("default") for name, layer in model.base_model.trady_layers("default")}


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
        _folded(full_model).items(), _folded(resumed_model).items()
    ):
        assert torch.equal(idx_a, idx_b), name
        torch.testing.assert_close(val_a, val_b, rtol=1e-4, atol=1e-6)
