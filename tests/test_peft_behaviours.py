"""Acceptance 5 and the peft behaviours LoRA users rely on."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_gpt2, tiny_llama

MODELS = {
    "cnn": (tiny_cnn, lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))}),
    "gpt2": (tiny_gpt2, lambda: {"input_ids": torch.arange(16).view(2, 8)}),
    "llama": (tiny_llama, lambda: {"input_ids": torch.arange(16).view(2, 8)}),
}


def logits(model, inputs):
    out = model(**inputs)
    return (out["logits"] if isinstance(out, dict) else out.logits).detach()


def trained_model(name: str):
    factory, make_inputs = MODELS[name]
    base_out = logits(factory(), make_inputs())
    model = get_peft_model(factory(), trady_peft.TraDyConfig(channels_per_layer=0.25, init_weights=False))
    tuner = model.base_model
    tuner.next_period()  # fold the random init into the store, then a new random period
    with torch.no_grad():
        tuner.trady_bank["default"].weight.normal_(0, 0.05)
    return model.eval(), make_inputs(), base_out


@pytest.mark.parametrize("name", list(MODELS))
def test_disable_merge_unmerge_unload(name):
    model, inputs, base_out = trained_model(name)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base_out)

    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base_out)
    assert torch.equal(logits(model, inputs), adapted)

    originals = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-6)

    base = model.unload()
    restored = dict(base.named_parameters())
    for n, p in originals.items():
        assert torch.equal(restored[n.replace(".base_layer", "")], p), n  # bit for bit
    assert torch.equal(logits(base, inputs), base_out)


def test_merge_and_unload_gives_a_plain_model_with_the_adapted_outputs():
    model, inputs, _ = trained_model("gpt2")
    adapted = logits(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, trady_peft.TraDyLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-6)


def test_add_set_delete_adapter():
    model, inputs, base_out = trained_model("llama")
    first = logits(model, inputs)
    model.add_adapter("other", trady_peft.TraDyConfig(channels_per_layer=2, init_weights=False, seed=7))
    assert torch.equal(logits(model, inputs), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, inputs)
    assert not torch.allclose(second, first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.trady_bank.other.weight"}
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), first)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert "other" not in model.base_model.trady_bank
    assert all("other" not in layer.trady_delta for _, layer in model.base_model.trady_layers("default"))
    assert torch.equal(logits(model, inputs), first)


def test_print_trainable_parameters_counts_the_bank_and_head(capsys):
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=1, modules_to_save=["classifier"]))
    model.print_trainable_parameters()
    bank = model.base_model.trady_bank["default"].weight.numel()
    head = 16 * 4 + 4
    assert f"trainable params: {bank + head:,}" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward_keeps_fp32_deltas(dtype):
    model = get_peft_model(tiny_llama().to(dtype), trady_peft.TraDyConfig(channels_per_layer=4))
    bank = model.base_model.trady_bank["default"].weight
    assert bank.dtype == torch.float32
    out = model(input_ids=torch.arange(16).view(2, 8), labels=torch.arange(16).view(2, 8))
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert bank.grad is not None and bank.grad.dtype == torch.float32 and bank.grad.abs().sum() > 0
    for _, layer in model.base_model.trady_layers("default"):
        assert layer.trady_values["default"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_bank_in_the_base_dtype_and_the_stores_in_fp32(dtype, tmp_path):
    config = trady_peft.TraDyConfig(channels_per_layer=4)
    model = get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=False)
    bank = model.base_model.trady_bank["default"].weight
    assert bank.dtype == dtype and bank.requires_grad
    batch = dict(input_ids=torch.arange(16).view(2, 8), labels=torch.arange(16).view(2, 8))
    model(**batch).loss.backward()
    assert bank.grad is not None and bank.grad.dtype == dtype and bank.grad.abs().sum() > 0
    torch.optim.SGD([bank], lr=1.0).step()
    model.base_model.next_period()
    assert all(layer.trady_values["default"].dtype == torch.float32 for _, layer in model.base_model.trady_layers())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, autocast_adapter_dtype=False)
    assert loaded.base_model.trady_bank["default"].weight.dtype == dtype


def test_tiny_update_survives_folding_over_bf16_base():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), trady_peft.TraDyConfig(channels_per_layer=4))
    tuner = model.base_model
    with torch.no_grad():
        tuner.trady_bank["default"].weight.fill_(1e-6)  # far below bf16's resolution near 1
    tuner.next_period()
    stored = [layer.trady_values["default"] for _, layer in tuner.trady_layers("default")]
    assert all(torch.all(v == 1e-6) for v in stored)


def test_resample_keeps_parameter_identity_and_resets_only_retargeted_moments():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    bank = model.base_model.trady_bank["default"].weight
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    model(**batch)["loss"].backward()
    optimizer.step()
    layers = model.base_model.trady_layers("default")
    before = {n: (layer.trady_idx["default"].clone(), layer.trady_delta["default"].offset) for n, layer in layers}
    exp_avg = optimizer.state[bank]["exp_avg"]
    assert exp_avg.abs().sum() > 0
    model.base_model.next_period(optimizer=optimizer)
    assert model.base_model.trady_bank["default"].weight is bank
    assert [p for p in model.parameters() if p.requires_grad] == params
    assert torch.all(bank == 0)
    for name, layer in layers:
        view = layer.trady_delta["default"]
        segment = exp_avg[view.offset : view.offset + view.numel]
        unchanged = torch.equal(before[name][0], layer.trady_idx["default"]) and before[name][1] == view.offset
        assert (segment.abs().sum() > 0) == unchanged, name


def test_static_strategy_keeps_its_channels():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, strategy="s-top-k-random"))
    layers = model.base_model.trady_layers("default")
    first = [layer.trady_idx["default"].clone() for _, layer in layers]
    model.base_model.next_period()
    assert all(torch.equal(a, layer.trady_idx["default"]) for a, (_, layer) in zip(first, layers))


def test_default_targets_skip_output_embedding_and_saved_modules():
    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig())
    names = [n for n, _ in model.base_model.trady_layers("default")]
    assert names and not any("lm_head" in n for n in names)
    cnn = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(modules_to_save=["classifier"]))
    assert [n for n, _ in cnn.base_model.trady_layers("default")] == ["stem", "dw", "pw"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels_per_layer": 0}, "at least 1"),
        ({"channels_per_layer": 1.5}, "(0, 1]"),
        ({"channels_per_layer": "10%"}, "must be an int"),
        ({"strategy": "greedy"}, "strategy='greedy' is unknown"),
        ({"seed": 1.5}, "seed=1.5"),
    ],
)
def test_bad_config_values_are_rejected_with_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=rf".*{__import__('re').escape(message)}"):
        trady_peft.TraDyConfig(**kwargs)


def test_unsupported_target_gets_a_clear_error():
    with pytest.raises(TypeError, match="Embedding.*cannot adapt"):
        get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(target_modules=["wte"]))
