"""Issue 12: the RMSNorm twin equals the stock module bit for bit and keeps only its input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import trady_peft
from tests.tiny_models import Holder, tiny_llama
from trady_peft.memory.frozen_path import apply_memory_saving, restore
from trady_peft.memory.frozen_path.transformers import twin_class

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


def _saved(module, x) -> int:
    mem = trady_peft.measure_training_step(Holder(module), x.detach().requires_grad_(True))
    return sum(v for k, v in mem.saved_by_module.items() if k.startswith("layer"))


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


def _step(on: bool, dtype, inputs):
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
    model, mem, grads = _step(True, dtype, inputs)
    _, mem_ref, grads_ref = _step(False, dtype, inputs)
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
