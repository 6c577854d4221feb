"""The recomputing attention twin gives the stock outputs and gradients and keeps only its inputs."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

import trady_peft
from tests.tiny_models import tiny_bert, tiny_llama
from trady_peft.memory.frozen_path import apply_memory_saving
from trady_peft.memory.frozen_path.attention import attention_twin_class
from trady_peft.memory.frozen_path.transformers import original_class

# ----------------------------------------------------------------------------- tiny families


def _llama():  # attention dropout on, to check the recomputation draws the same SDPA dropout
    return tiny_llama(attention_dropout=0.2)


def _gpt2():  # c_attn is a Conv1D; attention and residual dropout
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.2, resid_pdrop=0.2)
    return GPT2LMHeadModel(config)


def _bert():  # self-attention dropout, and BertSelfOutput's dropout and LayerNorm inside BertAttention
    return tiny_bert()


def _qwen2():
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(config)


# family -> (builder, TraDy targets inside the attention, targets outside it, twins expected)
FAMILIES = {
    "llama": (
        _llama,
        ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        ["gate_proj", "up_proj", "down_proj"],
        {"LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "LMHead"},
    ),
    "gpt2": (
        _gpt2,
        ["c_attn", "attn.c_proj", "c_fc"],
        ["c_fc", "mlp.c_proj"],
        {"GPT2Attention", "Dropout", "NewGELUActivation", "LMHead"},
    ),
    "bert": (
        _bert,
        ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
        ["intermediate.dense"],
        {"BertAttention", "BertSelfAttention", "Dropout"},
    ),
    "qwen2": (
        _qwen2,
        ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
        ["gate_proj", "up_proj", "down_proj"],
        {"Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm", "LMHead"},
    ),
}


def _model(family: str, inside: bool):
    build, targets_in, targets_out, _ = FAMILIES[family]
    torch.manual_seed(0)
    base = build().double()  # config.use_cache as built: a causal LM fills a cache in training too
    config = trady_peft.TraDyConfig(
        target_modules=targets_in if inside else targets_out,
        channels_per_layer=4,
        strategy="d-full-random",
        seed=0,
        init_weights=False,  # a non-zero bank, so that the deltas inside change the outputs
    )
    return get_peft_model(base, config).train()


def _attention_twins(model) -> list[nn.Module]:
    names = {m: type(m).__name__ for m in model.modules()}
    return [m for m, name in names.items() if name.startswith("FrozenPath") and "Attention" in name]


def _step(model, family: str, seed: int = 1):
    """One step on inputs_embeds (a leaf, for the input gradient): loss, bank grad, input grad, RNG after."""
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    labels = torch.tensor([0, 1, 2]) if family == "bert" else ids
    bank = model.base_model.trady_bank["default"].weight
    bank.grad = None
    torch.manual_seed(seed)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    return out.loss.detach(), bank.grad.clone(), embeds.grad, torch.rand(4)


@pytest.mark.parametrize("inside", [True, False], ids=["channels_inside", "channels_outside"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_twin_gives_stock_loss_and_exact_gradients(family, inside):
    model = _model(family, inside)
    twins = _attention_twins(model)
    assert twins, "no attention twin swapped in"
    used = []
    hooks = [m.register_forward_hook(lambda m, a, out: used.append(type(out[0].grad_fn).__name__)) for m in twins]
    loss, bank_grad, input_grad, rng_after = _step(model, family)
    for h in hooks:
        h.remove()
    outer = [m for m in twins if not any(m in set(o.modules()) for o in twins if o is not m)]
    assert used.count("_RecomputeBackward") == len(outer), used  # BertSelfAttention runs inside BertAttention's
    assert bank_grad.abs().sum() > 0
    for m in twins:  # the same model with its stock attention classes
        m.__class__ = original_class(m)
    loss_ref, bank_grad_ref, input_grad_ref, rng_after_ref = _step(model, family)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    # Channels inside the attention get their gradient once (a double count would be 2x).
    torch.testing.assert_close(bank_grad, bank_grad_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(rng_after, rng_after_ref)  # the recomputation leaves the random stream alone


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gets_its_twins_and_unload_restores_them(family):
    model = _model(family, inside=True)
    names = {type(m).__name__ for m in model.modules()}
    kinds = {name.removeprefix("FrozenPath") for name in names if name.startswith("FrozenPath")}
    assert kinds == FAMILIES[family][3]  # BERT's GELU (F.gelu) and LayerNorm already keep only their input
    base = model.unload()
    assert all("FrozenPath" not in type(m).__name__ for m in base.modules())


# ----------------------------------------------------------------------------- one attention module


class _OneLlamaAttention(nn.Module):
    """A Llama attention block fed by its own rotary embedding: ``x -> attn(x, cos, sin)``."""

    def __init__(self, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.rotary = LlamaRotaryEmbedding(config)
        self.attn = LlamaAttention(config, layer_idx=0).to(dtype).requires_grad_(False)

    def forward(self, x, **kwargs):
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        return self.attn(x, position_embeddings=(cos, sin), attention_mask=None, **kwargs)[0]


def _kept_by(module, x, name="attn") -> int:
    torch.manual_seed(0)
    mem = trady_peft.measure_training_step(module, x)
    return sum(v for k, v in mem.saved_by_module.items() if k == name or k.startswith(name + "."))


def test_the_instrument_sees_exactly_what_the_twin_keeps():
    stock = _OneLlamaAttention().train()
    twin = _OneLlamaAttention().train()
    assert apply_memory_saving(twin) == ["attn"]
    x = torch.randn(4, 64, 32, requires_grad=True)
    kept, kept_ref = _kept_by(twin, x), _kept_by(stock, x)
    cos, sin = twin.rotary(x, torch.arange(64).unsqueeze(0))
    rng_bytes = torch.get_rng_state().numel()
    # The input, the rotary cos/sin and the RNG state, all through save_for_backward: nothing else.
    assert kept == x.numel() * 4 + cos.numel() * 4 + sin.numel() * 4 + rng_bytes
    assert kept < kept_ref / 2, (kept, kept_ref)  # stock: q, k, v, attention output and logsumexp


def test_eval_no_grad_attention_weights_caches_and_trained_weights_take_the_stock_path():
    twin = _OneLlamaAttention(dropout=0.2).train()
    apply_memory_saving(twin)
    x = torch.randn(2, 8, 32, requires_grad=True)
    recomputed = "_RecomputeBackward"
    assert type(twin(x).grad_fn).__name__ == recomputed
    assert type(twin.eval()(x).grad_fn).__name__ != recomputed  # eval: stock
    twin.train()
    with torch.no_grad():
        assert twin(x).grad_fn is None
    assert type(twin(x, output_attentions=True).grad_fn).__name__ != recomputed
    filled = DynamicCache()
    twin(x.detach(), cache=filled)  # a cache already holding this layer's keys: stock
    assert type(twin(x, cache=filled).grad_fn).__name__ != recomputed
    assert type(twin(x, cache=DynamicCache()).grad_fn).__name__ == recomputed  # filled by this call: fine
    twin.attn.q_proj.weight.requires_grad_(True)  # a trained weight (LoRA, scoring): stock backward
    y = twin(x)
    assert type(y.grad_fn).__name__ != recomputed
    y.sum().backward()
    assert twin.attn.q_proj.weight.grad is not None


def test_recomputation_under_cpu_bf16_autocast_matches_stock_autocast():
    stock = _OneLlamaAttention(dropout=0.2).train()
    twin = _OneLlamaAttention(dropout=0.2).train()
    apply_memory_saving(twin)
    x = torch.randn(2, 8, 32)
    probe = torch.randn(2, 8, 32)
    results = []
    for module in (twin, stock):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        (y.float() * probe).sum().backward()  # outside the region: the twin restores its state
        results.append((y, xi.grad))
    (y, g), (y_ref, g_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_the_bank_hook_runs_once_per_backward():
    counts = []
    for on in (True, False):
        model = _model("llama", inside=True)
        if not on:
            for m in _attention_twins(model):
                m.__class__ = original_class(m)
        calls = []
        model.base_model.trady_bank["default"].weight.register_hook(lambda g, calls=calls: calls.append(1))
        _step(model, "llama")
        counts.append(len(calls))
    assert counts == [1, 1]


def test_non_attention_modules_and_unknown_classes_have_no_attention_twin():
    class MyAttention(nn.Module):  # not a transformers class: its forward is unknown
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    assert attention_twin_class(MyAttention().requires_grad_(False)) is None
    assert attention_twin_class(nn.Linear(4, 4).requires_grad_(False)) is None
    llama_attn = LlamaAttention(LlamaConfig(hidden_size=32, num_attention_heads=4), layer_idx=0)
    assert attention_twin_class(llama_attn) is None  # its weights train
    assert attention_twin_class(llama_attn.requires_grad_(False)) is not None


def test_an_output_it_cannot_rebuild_falls_back_to_the_stock_graph():
    from transformers.modeling_outputs import BaseModelOutput

    class DictOutputAttention(LlamaAttention):  # a subclass returning a ModelOutput, not a tuple
        def forward(self, *args, **kwargs):
            out, _ = super().forward(*args, **kwargs)
            return BaseModelOutput(last_hidden_state=out)

    twin = _OneLlamaAttention(dropout=0.2).train()
    stock = _OneLlamaAttention(dropout=0.2).train()
    for m in (twin, stock):
        m.attn.__class__ = DictOutputAttention
        m.forward = lambda x, m=m: m.attn(x, position_embeddings=m.rotary(x, torch.arange(8)[None]))[0]
    from trady_peft.memory.frozen_path.attention import _RecomputedAttention
    from trady_peft.memory.frozen_path.common import make_twin

    twin.attn.__class__ = make_twin(DictOutputAttention, _RecomputedAttention)  # as if it were recognised
    x = torch.randn(2, 8, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(3)
    twin(x).sum().backward()
    torch.manual_seed(3)
    stock(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def test_attention_twins_pickle_deepcopy_and_restore():
    import copy
    import pickle

    from trady_peft.memory.frozen_path import restore

    module = _OneLlamaAttention()
    apply_memory_saving(module)
    twin_type = type(module.attn)
    assert twin_type.__name__ == "FrozenPathLlamaAttention"
    assert type(pickle.loads(pickle.dumps(module)).attn) is twin_type
    assert type(copy.deepcopy(module).attn) is twin_type
    assert restore(module) == 1 and type(module.attn) is LlamaAttention


def test_position_embeddings_in_a_namedtuple_that_require_grad_take_the_stock_path():
    """A tensor inside a container the twin does not flatten (a namedtuple) would get no gradient from
    the recomputation: such a call must go the stock way, and the gradient must arrive."""
    from collections import namedtuple

    PE = namedtuple("PE", "cos sin")
    twin = _OneLlamaAttention().train()
    apply_memory_saving(twin)
    x = torch.randn(2, 8, 32, requires_grad=True)
    cos, sin = twin.rotary(x, torch.arange(8).unsqueeze(0))
    cos, sin = cos.detach().requires_grad_(True), sin.detach().requires_grad_(True)
    y = twin.attn(x, position_embeddings=PE(cos, sin), attention_mask=None)[0]
    assert type(y.grad_fn).__name__ != "_RecomputeBackward"
    y.sum().backward()
    assert cos.grad is not None and cos.grad.abs().sum() > 0
    # plain tuples are still recomputed
    y = twin.attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
    assert type(y.grad_fn).__name__ == "_RecomputeBackward"
