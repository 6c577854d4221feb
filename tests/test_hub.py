"""Pushing an adapter uploads the adapter files and a PEFT model card (offline); the card of a saved
adapter says that ``import trady_peft`` is needed."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import trady_peft
from tests.tiny_models import tiny_gpt2


def test_push_to_hub_uploads_adapter_files_and_a_peft_card(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, folder_path, repo_id, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploaded[str(path.relative_to(folder_path))] = path.read_bytes()
        return type("Commit", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(channels_per_layer=4))
    with torch.no_grad():
        model.base_model.trady_bank["default"].weight.fill_(0.01)
    memory = trady_peft.measure_training_step(model, {"input_ids": torch.arange(8).view(1, 8)})
    url = trady_peft.push_to_hub(model, "me/my-sparse-adapter", memory=memory, base_model="openai-community/gpt2")

    assert url.endswith("/commit/1")
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = uploaded["README.md"].decode()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: openai-community/gpt2" in front
    assert "## TraDy adapter" in card and f"{memory.saved_activations:,} B" in card
    (tmp_path / "a.safetensors").write_bytes(uploaded["adapter_model.safetensors"])
    assert all(".trady_" in k for k in load_file(tmp_path / "a.safetensors"))


def test_a_saved_adapters_card_says_import_trady_peft_is_needed(tmp_path):
    from peft import get_peft_model

    from tests.tiny_models import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(channels_per_layer=4))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again replaces the section, never repeats it
    card = (tmp_path / "README.md").read_text()
    assert "import trady_peft" in card and card.count("## TraDy adapter") == 1
    assert "library_name: peft" in card.split("---")[1] and "- trady" in card.split("---")[1]
