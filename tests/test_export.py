"""export_lora: a TraDy adapter written as a stock peft LoRA adapter gives the same outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForSequenceClassification

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def trained(base, **kwargs):
    """A TraDy model after two periods with non-zero deltas, so that layers touch different counts."""
    options = dict(init_weights=False, channels_per_layer=0.1, strategy="d-full-random", seed=1)
    options.update(kwargs)
    model = get_peft_model(base, trady_peft.TraDyConfig(**options))
    tuner = trady_peft.find_tuner(model)
    tuner.next_period()  # folds the first period's deltas, draws new channels (some overlap)
    with torch.no_grad():
        tuner.trady_bank["default"].weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    return model


def logits(model, **inputs):
    with torch.no_grad():
        return model(**(inputs or {"input_ids": IDS})).logits


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_reloaded_lora_matches_trady(make, tmp_path):
    model = trained(make())
    reference = logits(model)
    trady_peft.export_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    torch.testing.assert_close(logits(lora), reference, atol=1e-5, rtol=0)
    # the merged delta has the right orientation too (fan_in_fan_out for Conv1D)
    torch.testing.assert_close(logits(lora.merge_and_unload()), reference, atol=1e-5, rtol=0)


def test_files_hold_one_hot_rows_and_deltas_with_rank_per_layer(tmp_path):
    model = trained(tiny_gpt2())
    tuner = trady_peft.find_tuner(model)
    trady_peft.export_lora(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    layers = dict(tuner.trady_layers("default"))
    touched = {name: layer.touched_channels("default") for name, layer in layers.items()}
    assert len(set(touched.values())) > 1  # the test exercises different ranks
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["rank_pattern"] == touched and config["alpha_pattern"] == touched
    assert config["r"] == config["lora_alpha"] == max(touched.values())
    assert sorted(config["target_modules"]) == sorted(touched)
    assert config["fan_in_fan_out"] is True
    assert len(weights) == 2 * len(layers)
    for name, layer in layers.items():
        indices, values = layer.fold("default")
        a = weights[f"base_model.model.{name}.lora_A.weight"]
        b = weights[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (touched[name], layer.in_features) and b.shape == (layer.out_features, touched[name])
        assert torch.equal(a.argmax(1), indices.long()) and torch.equal(a.sum(1), torch.ones(touched[name]))
        assert torch.equal(b, values.t())
        # B @ A is TraDy's dense delta, in the base weight's orientation ([in, out] for Conv1D)
        torch.testing.assert_close((b @ a).t(), layer.get_delta_weight("default"))


def test_max_rank_refusal_names_layer_rank_and_limit_and_writes_nothing(tmp_path):
    model = trained(tiny_llama())
    layers = trady_peft.find_tuner(model).trady_layers("default")
    name, layer = max(layers, key=lambda item: item[1].touched_channels("default"))
    rank = layer.touched_channels("default")
    with pytest.raises(ValueError, match="max_rank") as error:
        trady_peft.export_lora(model, tmp_path / "out", max_rank=rank - 1)
    assert f"{name}: rank {rank} > max_rank {rank - 1}" in str(error.value)
    assert not (tmp_path / "out").exists()
    trady_peft.export_lora(model, tmp_path / "out", max_rank=rank)  # at the limit: fine


def test_convolutions_are_refused_with_merge_route(tmp_path):
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(init_weights=False, channels_per_layer=2, seed=0))
    with pytest.raises(ValueError, match="merge_and_unload") as error:
        trady_peft.export_lora(model, tmp_path / "out")
    assert "stem" in str(error.value) and "pw" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_skip_unsupported_exports_the_linear_layers_only(tmp_path):
    config = trady_peft.TraDyConfig(
        init_weights=False, channels_per_layer=2, target_modules=["stem", "classifier"], strategy="d-full-random"
    )
    model = get_peft_model(tiny_cnn(), config)
    with pytest.warns(UserWarning, match="stem"):
        trady_peft.export_lora(model, tmp_path, skip_unsupported=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["classifier"]


def test_merged_adapter_is_refused(tmp_path):
    model = trained(tiny_llama())
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        trady_peft.export_lora(model, tmp_path)


def tiny_classifier():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def test_sequence_classification_carries_the_head(tmp_path):
    model = trained(tiny_classifier(), task_type="SEQ_CLS")
    head = model.base_model.model.score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(1.0)  # a trained head, different from the base model's
    reference = logits(model)
    trady_peft.export_lora(model, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(weights["base_model.model.score.weight"], head.weight)
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    lora = PeftModel.from_pretrained(tiny_classifier(), tmp_path).eval()
    torch.testing.assert_close(logits(lora), reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fresh_process_loads_the_export_without_trady_peft(tmp_path):
    models = {"gpt2": tiny_gpt2, "llama": tiny_llama}
    for key, make in models.items():
        model = trained(make())
        torch.save(logits(model), tmp_path / f"{key}.pt")
        trady_peft.export_lora(model, tmp_path / key)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from tests.tiny_models import tiny_gpt2, tiny_llama
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        for key, make in {{"gpt2": tiny_gpt2, "llama": tiny_llama}}.items():
            model = PeftModel.from_pretrained(make(), {str(tmp_path)!r} + "/" + key).eval()
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(tmp_path)!r} + f"/{{key}}.reloaded.pt")
        assert not any(m.startswith("trady_peft") for m in sys.modules), "trady_peft was imported"
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in models:
        reloaded = torch.load(tmp_path / f"{key}.reloaded.pt")
        torch.testing.assert_close(reloaded, torch.load(tmp_path / f"{key}.pt"), atol=1e-5, rtol=0)


def test_rank_pattern_keys_resolve_to_their_own_layer_only():
    from peft.utils.other import get_pattern_key

    from trady_peft.export import _patterns

    plain = {"model.layers.1.q": 2, "model.layers.11.q": 5}
    assert _patterns(plain) == plain
    nested = {"a.b": 2, "x.a.b": 5}  # "a.b" would also match "x.a.b"
    keys = _patterns(nested)
    assert {name: keys[get_pattern_key(list(keys), name)] for name in nested} == nested
