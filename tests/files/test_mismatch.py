"""An adapter file that does not match its adapter_config.json is refused instead of loading as a no-op:
another method's weights beside a TraDy config (or the reverse), and a narrower target_modules."""

from __future__ import annotations

import json
import shutil

import pytest
from peft import LoraConfig, PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_llama
from trady_peft.files.format import AdapterFileError

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    config = trady_peft.TraDyConfig(channels_per_layer=2, target_modules=TARGETS, init_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(root / "trady")
    get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=False)).save_pretrained(
        root / "lora"
    )
    return root


def mixed(saved, weights: str, config: str):
    out = saved / f"{weights}-weights-{config}-config"
    if not out.exists():
        shutil.copytree(saved / weights, out)
        shutil.copy(saved / config / "adapter_config.json", out / "adapter_config.json")
    return out


def test_lora_weights_beside_a_trady_config_are_refused(saved):
    with pytest.raises(AdapterFileError, match=r"holds no TraDy tensor .*lora_A.*saved by another method"):
        PeftModel.from_pretrained(tiny_llama(), mixed(saved, "lora", "trady"))


def test_trady_weights_beside_a_lora_config_are_refused(saved):
    with pytest.raises(AdapterFileError, match=r"holds TraDy tensors .*trady_indices.*says peft_type 'LORA'"):
        PeftModel.from_pretrained(tiny_llama(), mixed(saved, "trady", "lora"))


def test_a_narrower_target_modules_does_not_drop_the_other_layers_deltas(saved, tmp_path):
    narrow = tmp_path / "narrow"
    shutil.copytree(saved / "trady", narrow)
    config = json.loads((narrow / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (narrow / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"deltas for 2 layer\(s\) .*v_proj.*add those layers back"):
        PeftModel.from_pretrained(tiny_llama(), narrow)


def test_the_matching_files_still_load(saved):
    PeftModel.from_pretrained(tiny_llama(), saved / "trady")
    PeftModel.from_pretrained(tiny_llama(), saved / "lora")
