"""The defaults the accuracy-memory front gives: `recommended_learning_rate` (from the bank's size),
the callback's warning about a rate far from it, and ``strategy="auto"``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import trady_peft
from tests.tiny_models import CountingText, tiny_cnn, tiny_llama
from trady_peft.recommend import HEAD_LEARNING_RATE, LEARNING_RATE_RULES, learning_rate_for, model_kind


@given(st.integers(1, 10**9), st.integers(1, 10**9), st.sampled_from(sorted(LEARNING_RATE_RULES)))
def test_more_trainable_values_never_get_a_larger_rate_and_the_rate_stays_in_range(a, b, kind):
    small, large = sorted((a, b))
    rule = LEARNING_RATE_RULES[kind]
    assert learning_rate_for(large, kind) <= learning_rate_for(small, kind)
    assert rule.low <= learning_rate_for(a, kind) <= rule.high


def test_between_the_clips_the_rate_falls_as_the_rule_says():
    assert learning_rate_for(500_000, "causal_lm") == pytest.approx(3e-3)
    assert learning_rate_for(8_000_000, "causal_lm") == pytest.approx(3e-3 / 8)  # as the values to the 3/4
    assert learning_rate_for(360_000, "classifier") == pytest.approx(3e-3)
    assert learning_rate_for(1_440_000, "classifier") == pytest.approx(3e-3 / 4)  # as the values
    with pytest.raises(ValueError, match="choose one of"):
        learning_rate_for(1_000, "regressor")


def test_a_classifier_and_a_causal_lm_of_the_same_bank_get_their_own_rule():
    lm = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="64KiB"))
    classifier = _head_model()
    cnn = get_peft_model(tiny_cnn(0), trady_peft.TraDyConfig(memory_budget="16KiB", modules_to_save=["classifier"]))
    assert (model_kind(lm), model_kind(classifier), model_kind(cnn)) == ("causal_lm", "classifier", "classifier")
    for model, kind in ((lm, "causal_lm"), (classifier, "classifier")):
        values = model.base_model.trady_bank["default"].weight.numel()
        assert trady_peft.recommended_learning_rate(model) == learning_rate_for(values, kind)


def test_the_recommended_rate_follows_the_bank_of_the_budget():
    rates = []
    for budget in ("16KiB", "64KiB"):
        model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=budget))
        values = model.base_model.trady_bank["default"].weight.numel()
        assert trady_peft.recommended_learning_rate(model) == learning_rate_for(values, "causal_lm")
        rates.append(trady_peft.recommended_learning_rate(model.base_model))
    assert rates[1] <= rates[0]  # a larger bank never trains at a larger rate


def test_an_unknown_adapter_is_refused_with_the_adapters_there_are():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="16KiB"))
    with pytest.raises(ValueError, match=r"'other' is not a TraDy adapter of this model; pass one of \['default'\]"):
        trady_peft.recommended_learning_rate(model, "other")


def _train(
    model, tmp_path, learning_rate, data=None, optimizer=None, callback=None, resume=None, **arguments
) -> Trainer:
    """Two steps of 8 rows (``arguments`` override the TrainingArguments), ``resume``: a checkpoint."""
    args = TrainingArguments(
        **{
            "output_dir": str(tmp_path),
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "learning_rate": learning_rate,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            **arguments,
        }
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=CountingText(n=16) if data is None else data,
        optimizers=(optimizer, None),
        callbacks=[callback or trady_peft.TraDyCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_the_callback_warns_once_about_a_rate_far_from_the_recommended_one_and_not_at_it(tmp_path, caplog):
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="16KiB"))
    recommended = trady_peft.recommended_learning_rate(model)
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        _train(model, tmp_path, 5e-5)  # the Trainer's default
    warnings = [r for r in caplog.records if "learning_rate=5e-05" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert f"{recommended:.1e}" in message and "below" in message
    caplog.clear()
    fresh = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="16KiB"))
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        _train(fresh, tmp_path, float(f"{recommended:.1e}"))  # the fix the message gives
    assert "recommends" not in caplog.text


def _bert_classifier():
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_labels=2
    )
    return BertForSequenceClassification(config)


@pytest.mark.parametrize(
    ("build", "options", "picked"),
    [
        (tiny_llama, {"memory_budget": "16KiB"}, "medyate"),  # a causal language model under a budget
        (tiny_llama, {}, "medyate"),  # the default budget is a budget
        (tiny_llama, {"channels_per_layer": 0.5}, "trady"),  # MeDyate needs a budget
        (_bert_classifier, {"memory_budget": "16KiB"}, "trady"),
        (tiny_cnn, {}, "trady"),
    ],
)
def test_auto_picks_the_strategy_the_front_recommends_and_writes_it_into_the_config(build, options, picked, tmp_path):
    config = trady_peft.TraDyConfig(**options)
    assert config.strategy == "auto"
    model = get_peft_model(build(), config)
    assert model.peft_config["default"].strategy == picked
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["strategy"] == picked
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert loaded.peft_config["default"].strategy == picked


def test_an_unknown_strategy_lists_auto_among_the_choices():
    with pytest.raises(ValueError, match=r"Choose one of \('auto', 'trady'"):
        trady_peft.TraDyConfig(strategy="bogus")


def test_under_step_memory_the_rate_waits_for_the_probe_and_the_message_says_so():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(step_memory="600KiB"))
    with pytest.raises(ValueError, match=r"call model.base_model.probe\(batch\) first"):
        trady_peft.recommended_learning_rate(model)
    batch = CountingText(n=4)[0]
    model.base_model.probe({k: v.unsqueeze(0) for k, v in batch.items()})  # the fix the message gives
    values = model.base_model.trady_bank["default"].weight.numel()
    assert values > 0 and trady_peft.recommended_learning_rate(model) == learning_rate_for(values, "causal_lm")


def _head_model():
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    base = BertForSequenceClassification(config)
    return get_peft_model(base, trady_peft.TraDyConfig(memory_budget="16KiB", modules_to_save=["classifier"]))


def test_create_optimizer_trains_the_bank_at_the_recommended_rate_and_a_fresh_head_at_the_head_rate():
    model = _head_model()
    optimizer = trady_peft.create_optimizer(model)
    bank, head = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert bank["params"] == [model.base_model.trady_bank["default"].weight]
    assert bank["lr"] == trady_peft.recommended_learning_rate(model)
    assert head["lr"] == HEAD_LEARNING_RATE and head["params"]
    assert all(".modules_to_save.default." in names[id(p)] for p in head["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable  # each one, once
    assert isinstance(optimizer, torch.optim.AdamW)


def test_create_optimizer_takes_given_rates_another_class_and_its_arguments():
    model = _head_model()
    optimizer = trady_peft.create_optimizer(model, torch.optim.SGD, lr=0.5, head_lr=0.25, momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_create_optimizer_refuses_a_bad_rate_and_a_model_without_a_trained_bank():
    with pytest.raises(ValueError, match=r"head_lr=0 must be a positive learning rate"):
        trady_peft.create_optimizer(_head_model(), head_lr=0)
    model = _head_model()
    model.base_model.trady_bank["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no TraDy adapter of this model trains"):
        trady_peft.create_optimizer(model)


def test_the_trainer_trains_with_create_optimizers_rates_and_the_callback_accepts_them(tmp_path, caplog):
    model = _head_model()
    optimizer = trady_peft.create_optimizer(model)
    data = [{"input_ids": torch.randint(0, 64, (6,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        trainer = _train(model, tmp_path, 5e-5, data, optimizer)  # not the Trainer's rate: the optimizer's
    assert trainer.optimizer.optimizer is optimizer  # accelerate wraps it
    assert [g["initial_lr"] for g in optimizer.param_groups] == [
        trady_peft.recommended_learning_rate(model),
        HEAD_LEARNING_RATE,
    ]
    assert not [r for r in caplog.records if "learning_rate" in r.getMessage()]  # not the Trainer's 5e-5
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, head_before)


def test_a_run_resumed_with_create_optimizer_ends_as_the_uninterrupted_one(tmp_path):
    data = [{"input_ids": torch.randint(0, 64, (6,)), "labels": torch.tensor(i % 3)} for i in range(16)]

    def run(resume: bool):
        torch.manual_seed(1)
        model = _head_model()
        _train(
            model,
            tmp_path,
            5e-5,
            data,
            trady_peft.create_optimizer(model),
            trady_peft.TraDyCallback(resample_every_steps=2),
            str(tmp_path / "checkpoint-2") if resume else None,
            max_steps=4,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
        )
        return model.state_dict()

    whole, resumed = run(False), run(True)
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)
