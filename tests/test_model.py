"""`TraDyModel` as a peft method: what LoRA users rely on (disable, merge, unmerge, unload; add, set
and delete adapters; the trainable-parameter count), a matrix of models, budgets and strategies that
trains, holds its budget and round-trips through save/load, and the registration surviving a re-import."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import trady_peft
from tests.processes import run_python
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


def test_unsupported_target_gets_a_clear_error():
    with pytest.raises(TypeError, match="Embedding.*cannot adapt"):
        get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(target_modules=["wte"]))


TRAIN_CASES = {
    "gpt2": (tiny_gpt2, lambda: {"input_ids": torch.arange(8).view(1, 8), "labels": torch.arange(8).view(1, 8)}, {}),
    "llama": (tiny_llama, lambda: {"input_ids": torch.arange(8).view(1, 8), "labels": torch.arange(8).view(1, 8)}, {}),
    "cnn": (
        tiny_cnn,
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])},
        {"modules_to_save": ["classifier"]},
    ),
}


BUDGETS = {
    "channels_per_layer": {"channels_per_layer": 0.25},
    "values": {"memory_budget": 400},
    "bytes": {"memory_budget": "8KiB"},
    "step_memory": {"step_memory": "300KiB"},
    "default": {},  # the default budget: a bank of LoRA r=8's values
}


def train_steps(model, batch, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("model_name", list(TRAIN_CASES))
def test_deleting_the_active_adapter_leaves_the_other_trainable_like_lora(model_name, budget):
    factory, make_batch, extra = TRAIN_CASES[model_name]
    config = dict(strategy="d-full-random", **BUDGETS[budget], **extra)
    model = get_peft_model(factory(), trady_peft.TraDyConfig(**config))
    model.add_adapter("other", trady_peft.TraDyConfig(seed=1, **config))
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    bank = model.base_model.trady_bank["default"].weight
    assert bank.requires_grad
    batch = make_batch()
    model.train()
    train_steps(model, batch)
    assert bank.abs().sum() > 0  # it trained

    # LoRA, the reference behaviour: the remaining adapter keeps training.
    if model_name != "cnn":
        lora = get_peft_model(factory(), LoraConfig(target_modules=["c_attn"] if model_name == "gpt2" else ["q_proj"]))
        lora.add_adapter("other", LoraConfig(target_modules=["c_attn"] if model_name == "gpt2" else ["q_proj"]))
        lora.set_adapter("other")
        lora.delete_adapter("other")
        assert any(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)


def test_set_adapter_moves_training_between_adapters():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    model.add_adapter("other", trady_peft.TraDyConfig(channels_per_layer=0.25, seed=3))
    banks = model.base_model.trady_bank
    assert banks["default"].weight.requires_grad and not banks["other"].weight.requires_grad
    model.set_adapter("other")
    assert banks["other"].weight.requires_grad and not banks["default"].weight.requires_grad


# ------------------------------------------------------------------ the peft-style matrix
STRATEGY_NAMES = ["trady", "s-top-k-random", "d-full-random", "s-full-random", "d-det-rgn", "s-det-rgn", "medyate"]


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("model_name", ["llama", "cnn"])
def test_generic_checks_for_every_model_budget_and_strategy(model_name, budget, strategy, tmp_path):
    """Trains, stays within the budget over periods, and round-trips through save/load exactly."""
    from peft import PeftModel

    if budget == "channels_per_layer" and strategy in ("d-det-rgn", "s-det-rgn", "medyate"):
        pytest.skip("this strategy selects under a memory budget")
    factory, make_batch, extra = TRAIN_CASES[model_name]
    model = get_peft_model(factory(), trady_peft.TraDyConfig(strategy=strategy, **BUDGETS[budget], **extra))
    config = model.peft_config["default"]  # as resolved: a default budget is written in
    assert config.budgeted == (budget != "channels_per_layer")
    model.train()
    batches = [make_batch() for _ in range(2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = model.base_model
    for period in range(3):
        trady_peft.next_period(model, optimizer, batches=batches, period=period)
        for batch in batches:
            model(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        if config.budget is not None:
            assert 0 < tuner.selected_cost() <= config.budget.amount
        if config.step_memory is not None:  # the adapter's share: what the measured rest of the step leaves
            summary = tuner.selection_summary()
            assert 0 < tuner.selected_cost() <= summary["budget"] == summary["step_memory"] - summary["step_rest"]
        assert tuner.selection_summary()["selected_channels"] > 0
    assert tuner.selection_summary()["touched_channels"] > 0
    model.eval()
    expected = model(**batches[0])["logits"].detach()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(reloaded(**batches[0])["logits"], expected, rtol=1e-5, atol=1e-6)


def test_import_twice_and_reload_do_not_raise():
    out = run_python("""
import importlib, trady_peft, trady_peft as again
importlib.reload(trady_peft)
from peft import get_peft_model
from torch import nn
model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), trady_peft.TraDyConfig(target_modules=["0"]))
print(type(model.base_model).__name__)
""")
    assert "TraDyModel" in out


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


def test_a_model_with_nothing_to_adapt_is_told_so_and_a_target_that_matches_nothing_lists_what_would():
    import ast
    import re

    from torch import nn

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm = nn.Embedding(4, 4), nn.LayerNorm(4)

    with pytest.raises(ValueError, match="has no layer TraDy can adapt") as error:
        get_peft_model(NoLayers(), trady_peft.TraDyConfig(channels_per_layer=1))
    assert "target_modules" not in str(error.value)  # no fix that cannot work
    model = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # noqa: E731
    with pytest.raises(ValueError, match="matches no layer of this model") as error:
        get_peft_model(model(), trady_peft.TraDyConfig(channels_per_layer=1, target_modules=["nope"]))
    listed = ast.literal_eval(re.search(r"include (\[[^\]]*\])", str(error.value)).group(1))
    get_peft_model(model(), trady_peft.TraDyConfig(channels_per_layer=1, target_modules=listed))  # the fix works
    get_peft_model(model(), trady_peft.TraDyConfig(channels_per_layer=1))  # and so does the default
