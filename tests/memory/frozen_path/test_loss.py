"""A frozen LM head's fused cross-entropy equals the stock loss path and keeps no logits for backward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import get_peft_model
from transformers.loss.loss_utils import ForCausalLMLoss

import trady_peft
from tests.tiny_models import tiny_gpt2, tiny_llama
from trady_peft.memory.frozen_path import apply_memory_saving, restore
from trady_peft.memory.frozen_path.loss import FrozenPathLMHead, FusedCausalLMLoss

BUILDS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
VOCAB, HIDDEN = 64, 32


def _inputs(num_items: bool):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # padding
    labels[2, -3:] = -100
    inputs = {"input_ids": ids, "labels": labels}
    if num_items:
        inputs["num_items_in_batch"] = torch.tensor(50)
    return inputs


def _trady(family: str, on: bool):
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(
        channels_per_layer=0.25, strategy="d-full-random", memory_saving_frozen_path=on, seed=0
    )
    return get_peft_model(BUILDS[family](), config).train()


def _step(family: str, on: bool, inputs):
    model = _trady(family, on)
    mem = trady_peft.measure_training_step(model, inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return model, mem, grads


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("family", list(BUILDS))
def test_trady_step_has_the_stock_loss_and_bank_gradients_without_the_logits_saved(family, num_items):
    inputs = _inputs(num_items)
    model, mem, grads = _step(family, True, inputs)
    _, mem_ref, grads_ref = _step(family, False, inputs)
    base = model.base_model.model
    assert type(base.lm_head) is FrozenPathLMHead and isinstance(base.loss_function, FusedCausalLMLoss)

    assert mem.loss == pytest.approx(mem_ref.loss, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7)

    # The loss path (the top-level model) kept the fp32 [tokens, vocab] log-softmax; now [tokens, hidden].
    top = type(base).__name__
    tokens = inputs["input_ids"].numel()
    assert mem_ref.saved_by_module_type[top] >= tokens * VOCAB * 4
    assert mem.saved_by_module_type[top] == tokens * HIDDEN * 4
    drop = mem_ref.saved_activations - mem.saved_activations
    lm_drop = mem_ref.saved_by_module_type[top] - mem.saved_by_module_type[top]
    assert lm_drop >= tokens * (VOCAB - HIDDEN) * 4 and drop >= lm_drop

    # unload: the stock head class and loss function again
    plain = model.unload()
    assert type(plain.lm_head) is torch.nn.Linear
    assert "_loss_function" not in plain.__dict__ and plain.loss_function is ForCausalLMLoss
    assert all("FrozenPath" not in type(m).__name__ for m in plain.modules())


def _pair(family: str, dtype=torch.float64):
    stock = BUILDS[family]().to(dtype).requires_grad_(False)
    twin = copy.deepcopy(stock)
    assert "lm_head" in apply_memory_saving(twin)
    return stock, twin


def _loss_and_input_grad(model, inputs, **kwargs):
    x = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=x, labels=inputs["labels"], **kwargs)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("family", list(BUILDS))
def test_float64_and_bf16_autocast_match_the_stock_path(family):
    inputs = _inputs(False)
    stock, twin = _pair(family)
    for kwargs in ({}, {"num_items_in_batch": 37}):
        out_ref, g_ref = _loss_and_input_grad(stock, inputs, **kwargs)
        out, g = _loss_and_input_grad(twin, inputs, **kwargs)
        assert out.loss.dtype == out_ref.loss.dtype == torch.float32  # ForCausalLMLoss upcasts
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)  # fp32 loss (stock upcast)
        torch.testing.assert_close(out.logits, out_ref.logits, rtol=0, atol=0)
        assert "Fused" in type(out.loss.grad_fn).__name__ and "Fused" not in type(out_ref.loss.grad_fn).__name__

    stock, twin = stock.float(), twin.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, g_ref = _loss_and_input_grad(stock, inputs)
        out, g = _loss_and_input_grad(twin, inputs)
    assert out.logits.dtype == out_ref.logits.dtype and g.dtype == g_ref.dtype
    assert "Fused" in type(out.loss.grad_fn).__name__
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("family", list(BUILDS))
def test_logits_evaluation_and_generation_are_unchanged(family):
    inputs = _inputs(False)
    stock, twin = _pair(family, torch.float32)
    with torch.no_grad():  # evaluation
        ref, out = stock(**inputs), twin(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)

    # A caller who backpropagates through the returned logits (a distillation term, no labels).
    grads = []
    for model in (stock, twin):
        x = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=x, labels=inputs["labels"])
        (out.loss + out.logits.square().mean()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

    prompt = inputs["input_ids"][:2, :5]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(twin.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def test_other_logits_and_trained_heads_keep_the_stock_path():
    stock, twin = _pair("llama", torch.float32)
    fused = twin.loss_function
    logits = torch.randn(2, 6, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(fused(logits, labels, VOCAB), ForCausalLMLoss(logits, labels, VOCAB))

    # logits changed after the head (e.g. soft-capping in place): the original loss on them
    x = torch.randn(2, 6, HIDDEN, requires_grad=True)
    head_logits = twin.lm_head(x)
    head_logits.mul_(0.5)
    loss = fused(head_logits, labels, VOCAB)
    assert loss.grad_fn is not None and "Fused" not in type(loss.grad_fn).__name__

    # explicit shift_labels, and labels of the wrong length (the stock loss's error)
    head_logits = twin.lm_head(x)
    shifted = torch.randint(0, VOCAB, (2, 6))
    loss = fused(head_logits, labels, VOCAB, shift_labels=shifted)
    assert "Fused" in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, ForCausalLMLoss(head_logits, labels, VOCAB, shift_labels=shifted))
    with pytest.raises((ValueError, RuntimeError)):
        fused(twin.lm_head(x), labels[:, :4], VOCAB)

    trained = tiny_llama()
    trained.lm_head.weight.requires_grad_(True)
    assert "lm_head" not in apply_memory_saving(trained)
    assert type(trained.lm_head) is torch.nn.Linear and "_loss_function" not in trained.__dict__


def test_swapped_model_pickles_deepcopies_and_restores():
    _, twin = _pair("gpt2", torch.float32)
    for clone in (pickle.loads(pickle.dumps(twin)), copy.deepcopy(twin)):
        assert type(clone.lm_head) is FrozenPathLMHead and isinstance(clone.loss_function, FusedCausalLMLoss)
        restore(clone)
        assert type(clone.lm_head) is torch.nn.Linear and clone.loss_function is ForCausalLMLoss


def _from_config(name: str):
    import transformers

    kw = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**kw))


@pytest.mark.parametrize(("name", "fused"), [("Qwen2", True), ("Gemma", True), ("Gemma2", False)])
def test_other_families_fuse_or_fall_back_by_their_loss_path(name, fused):
    """Gemma2 soft-caps its logits after the head: the original loss runs on them."""
    stock = _from_config(name).double().requires_grad_(False)
    twin = copy.deepcopy(stock)
    assert "lm_head" in apply_memory_saving(twin)
    inputs = _inputs(False)
    out_ref, g_ref = _loss_and_input_grad(stock, inputs)
    out, g = _loss_and_input_grad(twin, inputs)
    assert ("Fused" in type(out.loss.grad_fn).__name__) is fused
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)


def test_a_model_without_a_loss_of_its_own_is_not_asked_for_one():
    """Wrapping a BERT classifier must not make transformers log that ``loss_type=None`` is unrecognized
    (its ``loss_function`` property logs that for any model whose class maps to no loss)."""
    import logging

    from transformers.utils import logging as hf_logging

    from tests.tiny_models import tiny_bert

    logging.Logger.warning_once.cache_clear()  # transformers logs each message once per process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        get_peft_model(tiny_bert(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "loss_type" in r.getMessage()]
