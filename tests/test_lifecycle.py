"""The peft lifecycle and selectors, misuse of periods, and what the Trainer sees."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import trady_peft
from tests.test_trainer import CountingText
from tests.tiny_models import tiny_cnn, tiny_gpt2, tiny_llama

MODELS = {
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
}


def wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, trady_peft.TraDyLayer)}


@pytest.mark.parametrize(
    "factory, pattern, prefix",
    [(tiny_gpt2, "h", "transformer.h."), (tiny_llama, "layers", "model.layers.")],
)
def test_layers_to_transform_with_default_targets(factory, pattern, prefix):
    model = get_peft_model(factory(), trady_peft.TraDyConfig(layers_to_transform=[1], layers_pattern=pattern))
    names = wrapped(model)
    assert names and all(f"{prefix}1." in n for n in names)
    everything = wrapped(get_peft_model(factory(), trady_peft.TraDyConfig()))
    assert names == {n for n in everything if f"{prefix}1." in n}


def train_steps(model, batch, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_deleting_the_active_adapter_leaves_the_other_trainable_like_lora(model_name, budget):
    factory, make_batch, extra = MODELS[model_name]
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


# ------------------------------------------------------------------------------- misuse
def test_next_period_refuses_an_optimizer_that_does_not_hold_the_bank():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    stray = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold adapter 'default'"):
        trady_peft.next_period(model, stray)
    assert model.base_model.period() == 0  # nothing changed


def test_next_period_inside_forward_or_backward_is_refused():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    batch = MODELS["llama"][1]()
    layer = model.base_model.model.model.layers[0].mlp
    handle = layer.register_forward_hook(lambda *a: trady_peft.next_period(model))
    with pytest.raises(RuntimeError, match="inside a forward or backward"):
        model(**batch)
    handle.remove()
    loss = model(**batch)["loss"]
    bank = model.base_model.trady_bank["default"].weight
    errors = []

    def hook(grad):
        try:
            trady_peft.next_period(model)
        except RuntimeError as err:
            errors.append(err)

    bank.register_hook(hook)
    loss.backward()
    assert errors and "inside a forward or backward" in str(errors[0])
    trady_peft.next_period(model)  # between steps it works
    assert model.base_model.period() == 1


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


# ---------------------------------------------------------------------- MeDyate's layers
def llama_like_smollm2():
    """A tiny Llama with SmolLM2-135M's 30 layers: the built-in `llama` table applies to it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).eval()


def test_medyate_uses_the_family_importance_table():
    from trady_peft.selection.importance import builtin_entry

    model = get_peft_model(llama_like_smollm2(), trady_peft.TraDyConfig(memory_budget=2000, strategy="medyate"))
    tuner = model.base_model
    ranking = builtin_entry("llama").ranking
    assert tuner.peft_config["default"].layer_ranking[:5] == ranking[:5]
    model(input_ids=torch.arange(8).view(1, 8))  # probe: K from the alpha rule
    candidates = {n.removeprefix("model.") for n, _ in tuner.candidate_layers()}
    k = len(candidates)
    assert 0 < k < 210
    assert candidates == {r.removeprefix("model.") for r in ranking[:k]}  # the table's most important first


def test_medyate_without_a_ranking_warns(caplog):
    from trady_peft import periods

    periods._warn_once.cache_clear()  # the warning is given once per process
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=300, strategy="medyate"))
    assert "module order" in caplog.text and "rank-layers" in caplog.text


def test_an_adapter_added_after_the_probe_draws():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=400, strategy="d-full-random"))
    batch = MODELS["llama"][1]()
    model(**batch)
    model.add_adapter("second", trady_peft.TraDyConfig(memory_budget=400, strategy="d-full-random", seed=1))
    model.set_adapter("second")
    model(**batch)["loss"].backward()
    assert model.base_model.phase("second").value == "drawn"
    assert model.base_model.trady_bank["second"].weight.grad.abs().sum() > 0


def test_det_rgn_scoring_leaves_no_gradient_in_the_bank():
    config = trady_peft.TraDyConfig(memory_budget=400, strategy="d-det-rgn", modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config)
    batches = [MODELS["cnn"][1]() for _ in range(2)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trady_peft.next_period(model, optimizer, batches=batches, period=0)
    model(**batches[0])["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trady_peft.next_period(model, optimizer, batches=batches)
    assert model.base_model.trady_bank["default"].weight.grad is None


def test_loading_another_adapter_does_not_change_this_adapters_prices(tmp_path):
    config = dict(memory_budget="8KiB", strategy="d-full-random")
    other = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**config))
    other(input_ids=torch.zeros(16, 32, dtype=torch.long), labels=torch.zeros(16, 32, dtype=torch.long))
    other.save_pretrained(tmp_path / "other")
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**config))
    model(**MODELS["llama"][1]())
    before = dict(model.base_model.selection_states["default"].costs)
    model.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=False)
    trady_peft.next_period(model, adapter="default")
    assert model.base_model.selection_states["default"].costs == before


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
    factory, make_batch, extra = MODELS[model_name]
    config = trady_peft.TraDyConfig(strategy=strategy, **BUDGETS[budget], **extra)
    model = get_peft_model(factory(), config)
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
        assert tuner.selection_summary()["selected_channels"] > 0
    assert tuner.selection_summary()["touched_channels"] > 0
    model.eval()
    expected = model(**batches[0])["logits"].detach()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(reloaded(**batches[0])["logits"], expected, rtol=1e-5, atol=1e-6)
