"""Atomic saves: a save that fails half-way keeps the adapter saved before, for TraDy and other methods."""

from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from tests.tiny_models import tiny_cnn, tiny_cnn_adapter

FILE = "adapter_model.safetensors"


def _fail_half_way(monkeypatch):
    """Make safetensors' writer write half of the file, then fail as a full disk would."""
    real = safetensors.torch.serialize_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "serialize_file", half_then_fail)


def test_a_failed_save_keeps_the_adapter_saved_before(saved, tmp_path, monkeypatch):
    path, tensors, x, expected = saved
    target = tmp_path / "adapter"
    shutil.copytree(path, target)
    changed = tiny_cnn_adapter(seed=7)
    _fail_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        changed.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == sorted(os.listdir(path))  # no temporary file left behind
    on_disk = load_file(target / FILE)
    assert on_disk.keys() == tensors.keys() and all(torch.equal(on_disk[k], tensors[k]) for k in tensors)
    model = PeftModel.from_pretrained(tiny_cnn(), target).eval()
    assert torch.equal(model(pixel_values=x)["logits"], expected)


def test_saves_of_other_methods_are_atomic_too(tmp_path, monkeypatch):
    config = LoraConfig(target_modules=["classifier"], r=2, init_lora_weights=False)
    model = get_peft_model(tiny_cnn(), config)
    model.save_pretrained(tmp_path)
    before = load_file(tmp_path / FILE)
    _fail_half_way(monkeypatch)
    with pytest.raises(OSError):
        get_peft_model(tiny_cnn(), config).save_pretrained(tmp_path)
    monkeypatch.undo()
    after = load_file(tmp_path / FILE)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    loaded = PeftModel.from_pretrained(tiny_cnn(), tmp_path)
    assert torch.equal(
        loaded.base_model.model.classifier.lora_A["default"].weight,
        before["base_model.model.classifier.lora_A.weight"],
    )
