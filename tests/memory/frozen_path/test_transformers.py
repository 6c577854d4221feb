"""transformers' frozen-path twins (gated MLPs, GELU variants, dropout, RMSNorm) equal the stock modules
and keep less; modules that train or compute something else keep the stock path."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
)
from transformers import activations as acts
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import trady_peft
from tests.tiny_models import Holder, tiny_bert, tiny_llama
from trady_peft.memory.frozen_path import apply_memory_saving, restore
from trady_peft.memory.frozen_path.transformers import twin_class


def _llama_mlp(act: str):
    return LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act=act))


TWINS = {
    "llama_mlp_silu": (lambda: _llama_mlp("silu"), (3, 5, 8)),
    "llama_mlp_gelu": (lambda: _llama_mlp("gelu"), (3, 5, 8)),
    "llama_mlp_gelu_new": (lambda: _llama_mlp("gelu_new"), (3, 5, 8)),  # a twin activation inside
    "gemma_mlp_gelu_tanh": (
        lambda: GemmaMLP(
            GemmaConfig(
                hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_activation="gelu_pytorch_tanh"
            )
        ),
        (3, 5, 8),
    ),
    "new_gelu": (acts.NewGELUActivation, (4, 6, 10)),
    "fast_gelu": (acts.FastGELUActivation, (4, 6, 10)),
    "quick_gelu": (acts.QuickGELUActivation, (4, 6, 10)),
    "accurate_gelu": (acts.AccurateGELUActivation, (4, 6, 10)),
    "gelu_python": (lambda: acts.GELUActivation(use_gelu_python=True), (4, 6, 10)),
    "gelu_tanh_python": (lambda: acts.GELUTanh(use_gelu_tanh_python=True), (4, 6, 10)),
    "dropout": (lambda: nn.Dropout(0.3).train(), (4, 6, 10)),
}


def _run(module, x, probe):
    torch.manual_seed(7)  # the same dropout draw for the twin and the stock module
    y = module(x)
    (y.float() * probe).sum().backward()
    return y


def _saved(module, x) -> int:
    """Bytes the module itself keeps (not the stand-in loss after it)."""
    torch.manual_seed(7)
    mem = trady_peft.measure_training_step(Holder(module), x.detach().requires_grad_(True))
    return sum(v for k, v in mem.saved_by_module.items() if k.startswith("layer"))


@pytest.mark.parametrize("kind", list(TWINS))
def test_twin_matches_stock_and_keeps_fewer_bytes(kind):
    torch.manual_seed(0)
    factory, shape = TWINS[kind]
    stock = factory().double().requires_grad_(False)
    twin = copy.deepcopy(stock)
    swapped = apply_memory_saving(twin)
    assert "" in swapped and type(twin) is not type(stock) and isinstance(twin, type(stock))

    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        probe = torch.randn(stock(x_ref).shape, dtype=torch.float64)
    y_ref = _run(stock, x_ref, probe)
    y = _run(twin, x, probe)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)

    kept, kept_ref = _saved(twin, x), _saved(stock, x_ref)
    assert kept < kept_ref, (kept, kept_ref)
    if kind == "dropout":
        assert kept == (x.numel() + 7) // 8  # one bit per element
    elif "mlp" not in kind:
        assert kept == x.numel() * x.element_size()  # the input only

    # The same under CPU bf16 autocast (float32 modules), within bf16 tolerance.
    stock32, twin32 = copy.deepcopy(stock).float(), copy.deepcopy(twin).float()
    x32, x32_ref = (x.detach().float().requires_grad_(True) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _run(stock32, x32_ref, probe.float())
        y = _run(twin32, x32, probe.float())
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x32.grad, x32_ref.grad, rtol=1e-2, atol=1e-2)

    assert restore(twin) >= 1 and type(twin) is type(stock)
    assert all("FrozenPath" not in type(m).__name__ for m in twin.modules())


@pytest.mark.parametrize(
    "factory",
    [nn.SiLU, acts.SiLUActivation, nn.GELU, lambda: nn.GELU(approximate="tanh"), acts.GELUActivation, acts.GELUTanh],
)
def test_activations_that_keep_only_their_input_have_no_twin(factory):
    module = factory()
    assert twin_class(module) is None
    x = torch.randn(4, 6, 10, requires_grad=True)
    assert _saved(module, x) == x.numel() * x.element_size()  # already the minimum


def test_dropout_twin_keeps_stock_behaviour_in_eval_and_leaves_the_random_stream_as_stock():
    drop = nn.Dropout(0.5)
    apply_memory_saving(drop)
    x = torch.randn(64, 32, requires_grad=True)
    assert torch.equal(drop.eval()(x), x)
    drop.train()
    torch.manual_seed(3)
    drop(x)
    after_twin = torch.rand(3)
    torch.manual_seed(3)
    nn.functional.dropout(x, 0.5, True)
    assert torch.equal(torch.rand(3), after_twin)


def test_modules_that_train_or_compute_something_else_are_left_alone():
    mlp = _llama_mlp("silu")
    mlp.act_fn = nn.PReLU()  # an activation with a trained parameter
    assert twin_class(mlp) is None

    class NotGated(nn.Module):  # the attributes, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert twin_class(NotGated()) is None


def test_swapped_models_deepcopy_and_pickle():
    model = tiny_llama()
    apply_memory_saving(model)
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "FrozenPathLlamaMLP"
    clone = pickle.loads(pickle.dumps(mlp))
    assert type(clone) is type(mlp) and type(copy.deepcopy(mlp)) is type(mlp)


def _llama():
    return tiny_llama().train()


def _gpt2():
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.2, embd_pdrop=0.2)
    return GPT2LMHeadModel(config).train()


def _bert():  # self-attention dropout, and BertSelfOutput's dropout and LayerNorm inside BertAttention
    return tiny_bert()


def _gemma():
    config = GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return GemmaForCausalLM(config).train()


MODELS = {
    "llama": (_llama, "LlamaMLP"),
    "gpt2": (_gpt2, "NewGELUActivation"),
    "bert": (_bert, "Dropout"),
    "gemma": (_gemma, "GemmaMLP"),
}


def _step(build, on: bool, inputs):
    torch.manual_seed(0)
    base = build()
    config = trady_peft.TraDyConfig(
        channels_per_layer=4, strategy="d-full-random", memory_saving_frozen_path=on, seed=0
    )
    model = get_peft_model(base, config).train()
    torch.manual_seed(1)
    mem = trady_peft.measure_training_step(model, inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return model, mem, grads


@pytest.mark.parametrize("family", list(MODELS))
def test_whole_tiny_model_keeps_fewer_bytes_with_the_same_loss_and_bank_gradients(family):
    build, stock_type = MODELS[family]
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0]) if family == "bert" else ids
    inputs = {"input_ids": ids, "labels": labels}
    model, mem, grads = _step(build, True, inputs)
    _, mem_ref, grads_ref = _step(build, False, inputs)
    assert any(k.startswith("FrozenPath") for k in mem.saved_by_module_type), mem.saved_by_module_type
    assert stock_type in mem_ref.saved_by_module_type
    assert mem.saved_activations < mem_ref.saved_activations, (mem.saved_by_module_type, mem_ref.saved_by_module_type)
    assert mem.loss == pytest.approx(mem_ref.loss, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7)

    base = model.unload()
    assert all("FrozenPath" not in type(m).__name__ for m in base.modules())
    assert any(type(m).__name__ == stock_type for m in base.modules())


def test_extra_code_trained_norms_and_empty_labels():
    """A gated MLP with more in its forward keeps its class; a norm unfrozen after wrapping still gets
    its gradient; a batch with no counted label gives finite (zero) gradients."""
    from peft import get_peft_model
    from transformers.models.llama.modeling_llama import LlamaMLP

    import trady_peft
    from tests.tiny_models import tiny_llama
    from trady_peft.memory.frozen_path.transformers import twin_class

    class DropoutMLP(LlamaMLP):
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return torch.nn.functional.dropout(down_proj, p=0.5, training=self.training)

    llama = tiny_llama()
    mlp = llama.model.layers[0].mlp
    assert twin_class(mlp) is not None
    mlp.__class__ = DropoutMLP
    assert twin_class(mlp) is None

    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    ids = torch.arange(8).view(1, 8)
    model(input_ids=ids, labels=ids)["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "norm" in n)

    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25))
    model(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=0)["loss"].backward()
    grad = model.base_model.trady_bank["default"].weight.grad
    assert grad is not None and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------- RMSNorm
NORMS = {"llama": LlamaRMSNorm, "qwen2": Qwen2RMSNorm, "mistral": MistralRMSNorm, "gemma": GemmaRMSNorm}
SHAPE = (3, 5, 16)


def _norm(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    module = NORMS[kind](SHAPE[-1], eps=1e-5)
    with torch.no_grad():
        module.weight.normal_()  # neither the ones (Llama) nor the zeros (Gemma) of the init
    return module.to(dtype).requires_grad_(False)


def _grad(module, x, probe, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    (y.float() * probe).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.float64, False), (torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
    ids=["float64", "float32", "float32-autocast-bf16", "bfloat16"],
)
def test_rms_norm_twin_matches_stock_and_keeps_only_its_input(kind, dtype, autocast):
    stock = _norm(kind, dtype)
    twin = copy.deepcopy(stock)
    assert apply_memory_saving(twin) == [""] and type(twin).__name__ == f"FrozenPath{type(stock).__name__}"
    torch.manual_seed(1)
    x = (torch.randn(SHAPE) * 3).to(dtype)
    probe = torch.randn(SHAPE)
    y_ref, g_ref = _grad(stock, x, probe, autocast)
    y, g = _grad(twin, x, probe, autocast)
    # The twin runs the stock forward, and recomputes it for backward: equal bit for bit.
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert g.dtype == g_ref.dtype and torch.equal(g, g_ref)

    kept, kept_ref = _saved(twin, x), _saved(stock, x)
    rows = x.numel() // x.shape[-1]
    if dtype == torch.float64:  # the stock forward keeps the float32 downcast, less than the input
        assert kept == kept_ref < x.numel() * x.element_size()
        return
    assert kept == x.numel() * x.element_size()  # the input, in its own dtype
    if dtype == torch.float32:
        assert kept_ref >= kept + rows * 4  # the input (its own float32 upcast) and the rsqrt
    else:  # the float32 upcast of the input and the rsqrt
        assert kept_ref >= x.numel() * 4 + rows * 4 and kept < kept_ref

    assert restore(twin) == 1 and type(twin) is type(stock)


def test_norms_that_train_or_compute_something_else_are_left_alone():
    assert twin_class(LlamaRMSNorm(8)) is None  # its weight trains

    class OtherRMSNorm(LlamaRMSNorm):  # the name and the structure, another formula
        def forward(self, hidden_states):
            return self.weight * hidden_states / hidden_states.norm(dim=-1, keepdim=True)

    assert twin_class(OtherRMSNorm(8).requires_grad_(False)) is None

    class LlamaNoEps(LlamaRMSNorm):
        pass

    norm = LlamaNoEps(8).requires_grad_(False)
    del norm.variance_epsilon
    assert twin_class(norm) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_already_keeps_only_input_mean_and_rstd(dtype):
    norm = nn.LayerNorm(16).to(dtype).requires_grad_(False)
    assert twin_class(norm) is None
    x = torch.randn(SHAPE, dtype=dtype)
    rows = x.numel() // x.shape[-1]
    assert _saved(norm, x) == x.numel() * x.element_size() + 2 * rows * x.element_size()


def _llama_step(on: bool, dtype, inputs):
    torch.manual_seed(0)
    base = tiny_llama().to(dtype).train()
    config = trady_peft.TraDyConfig(channels_per_layer=0.25, memory_saving_frozen_path=on, seed=0)
    model = get_peft_model(base, config).train()
    mem = trady_peft.measure_training_step(model, inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return model, mem, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_norms_keep_fewer_bytes_with_the_same_loss_and_bank_gradients(dtype):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    model, mem, grads = _llama_step(True, dtype, inputs)
    _, mem_ref, grads_ref = _llama_step(False, dtype, inputs)
    norms, norms_ref = mem.saved_by_module_type["FrozenPathLlamaRMSNorm"], mem_ref.saved_by_module_type["LlamaRMSNorm"]
    assert "LlamaRMSNorm" not in mem.saved_by_module_type
    assert norms < norms_ref and mem.saved_activations < mem_ref.saved_activations
    if dtype == torch.bfloat16:
        assert 2 * norms < norms_ref  # a bf16 input instead of its float32 upcast
    assert mem.loss == pytest.approx(mem_ref.loss, rel=1e-6)  # the fused LM-head loss sums in chunks
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:  # the MLP twins reorder some float sums; the norms do not
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=tol, atol=tol * 1e-2)

    base = model.unload()
    assert all("FrozenPath" not in type(m).__name__ for m in base.modules())
    assert any(type(m) is LlamaRMSNorm for m in base.modules())
