"""TraDy on quantized base models: bitsandbytes 4-bit (NF4, FP4) and 8-bit, torchao int8 weight-only.

Each backend is probed once on this machine (quantize a layer, run it forward and backward on CPU);
where the library is missing or its CPU backend cannot run, the tests of that backend are skipped
with the library's own reason.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from quantized_memory import quantize_linear  # benchmarks/, on pytest's pythonpath
from torch import nn
from transformers import LlamaForCausalLM

import trady_peft
from tests.tiny_models import Holder, tiny_llama
from trady_peft.core.layer import QuantizedMergeWarning, TraDyLayer
from trady_peft.core.quantized import dequantize, quantization_of, storage_bytes

BACKENDS = ["bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8"]


def quantize_model(model: nn.Module, backend: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by its quantized copy."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(module, child_name, quantize_linear(child, backend))
    return model


@functools.cache
def _unsupported(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can): the library's own error."""
    module = "torchao" if backend.startswith("torchao") else "bitsandbytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
            layer = quantize_linear(nn.Linear(64, 16), backend)
            x = torch.randn(2, 64, requires_grad=True)
            layer(x).sum().backward()
            dequantize(layer)
    except Exception as exc:  # noqa: BLE001 -- any failure of the backend is a reason to skip
        return f"{module} cannot run {backend} on this machine: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _unsupported(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def llama(seed: int = 0) -> LlamaForCausalLM:
    """A Llama-style model whose linear layers are wide enough for bitsandbytes' 64-value blocks."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128, num_hidden_layers=1, max_position_embeddings=32)


def config(**kwargs) -> trady_peft.TraDyConfig:
    return trady_peft.TraDyConfig(channels_per_layer=4, strategy="d-full-random", **kwargs)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the stored (quantized) data of every wrapped base weight."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TraDyLayer):
            weight = module.base_layer.weight
            out[name] = weight.qdata.clone() if hasattr(weight, "qdata") else weight.data.clone()
    return out


def test_wraps_quantized_layers_and_starts_at_the_quantized_base(backend):
    base = quantize_model(llama(), backend)
    with torch.no_grad():
        expected = base(input_ids=ids()).logits
    model = get_peft_model(base, config())
    layers = [m for m in model.modules() if isinstance(m, TraDyLayer)]
    assert len(layers) == 7  # q, k, v, o, gate, up, down; the lm_head is a head
    assert all(m.quantization is not None for m in layers)
    calls = []
    for m in layers:
        m.base_layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got = model(input_ids=ids()).logits
    assert len(calls) == len(layers)  # the base forward is the quantized layer's own
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_delta_gradient_and_input_gradient_match_a_dense_reference(backend):
    torch.manual_seed(1)
    dense = nn.Linear(64, 24)
    model = get_peft_model(
        Holder(quantize_linear(dense, backend)), config(target_modules=["layer"], init_weights=False)
    )
    layer = model.base_model.model.layer
    idx = layer.trady_idx["default"].long()
    delta = layer.current_delta("default")  # [k, out]
    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 24)
    (model(x) * upstream).sum().backward()

    # Reference: the dequantized weight plus the delta on the selected columns, in plain autograd.
    w = dequantize(layer.base_layer).detach()
    bias = layer.base_layer.bias.detach().float()
    x_ref = x.detach().clone().requires_grad_(True)
    delta_ref = delta.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.t() + bias + x_ref[..., idx] @ delta_ref
    (y_ref * upstream).sum().backward()

    bank_grad = model.base_model.trady_bank["default"].weight.grad
    view = layer.trady_delta["default"]
    grad_delta = bank_grad.narrow(0, view.offset, view.numel).view_as(delta)
    # The delta's gradient needs only x[..., idx] and the output gradient: x_sel^T @ upstream.
    exact = x.detach()[..., idx].reshape(-1, idx.numel()).t() @ upstream.reshape(-1, 24)
    torch.testing.assert_close(grad_delta, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_delta, delta_ref.grad, rtol=1e-5, atol=1e-5)
    # The input gradient goes through the quantized kernel's own backward (int8 backends quantize
    # the output gradient too, hence the wider tolerance there).
    atol = 5e-2 if backend == "bnb-int8" else 1e-4
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=atol)


def test_a_training_step_changes_only_the_selected_deltas(backend):
    model = get_peft_model(quantize_model(llama(), backend), config())
    model.train()
    before = base_weights(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.numel() for p in trainable] == [model.base_model.trady_bank["default"].weight.numel()]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    mem = trady_peft.measure_training_step(model, {"input_ids": ids(), "labels": ids()}, optimizer)
    assert mem.trainable_parameters == trainable[0].numel() * 4
    # The frozen quantized layers keep nothing for backward (torchao's own linear would keep a
    # dense dequantized weight): the step keeps exactly what it keeps on the fp32 base.
    assert not [name for name in mem.saved_by_module if name.endswith("base_layer")]
    fp32 = get_peft_model(llama(), config()).train()
    reference = trady_peft.measure_training_step(fp32, {"input_ids": ids(), "labels": ids()})
    assert mem.saved_activations == reference.saved_activations
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), f"the quantized base weight of {name} changed"
    changed = 0
    for _, layer in model.base_model.trady_layers("default"):
        update = layer.get_delta_weight("default")  # [out, in]
        assert update.shape == (layer.out_features, layer.in_features)
        touched = update.abs().sum(0).nonzero().flatten()
        assert set(touched.tolist()) <= set(layer.trady_idx["default"].tolist())
        changed += touched.numel()
    assert changed > 0


def test_save_and_load_roundtrip(backend, tmp_path):
    model = get_peft_model(quantize_model(llama(), backend), config(init_weights=False))
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantize_model(llama(), backend), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids()).logits
    # The loaded adapter adds the same delta through its stored channels (sorted, so summed in another
    # order); bitsandbytes 8-bit quantizes every layer input to int8, which can turn that last-bit
    # difference into one int8 step.
    atol = 1e-2 if backend == "bnb-int8" else 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_merge_requantizes_reports_the_rounding_and_unmerges_exactly(backend):
    model = get_peft_model(quantize_model(llama(), backend), config(init_weights=False))
    layers = dict(model.base_model.trady_layers("default"))
    exact = {}
    for name, layer in layers.items():  # the fp32 merge, computed independently of merge()
        exact[name] = dequantize(layer.base_layer) + layer.get_delta_weight("default")
    originals = {name: layer.base_layer.weight for name, layer in layers.items()}
    with torch.no_grad():
        unmerged = model(input_ids=ids()).logits

    with pytest.warns(QuantizedMergeWarning, match=r"Merged 7 quantized layer\(s\).*largest relative error") as rec:
        model.merge_adapter()
    assert len(rec) == 1  # one summary, not one warning per layer
    for name, layer in layers.items():
        assert layer.quantization is not None  # still quantized, in its own format
        error = layer.merge_rounding_errors["default"]
        got = dequantize(layer.base_layer)
        assert error.max_abs == pytest.approx(float((got - exact[name]).abs().max()), rel=1e-5)
        assert error.relative == pytest.approx(float((got - exact[name]).norm() / exact[name].norm()), rel=1e-5)
        assert error.relative < 0.2
    with torch.no_grad():
        merged = model(input_ids=ids()).logits
    assert not torch.equal(merged, unmerged)
    torch.testing.assert_close(merged, unmerged, rtol=0.2, atol=0.2)  # close, not exact: rounded

    model.unmerge_adapter()
    for name, layer in layers.items():
        assert layer.base_layer.weight is originals[name]
        assert not layer.merge_rounding_errors
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, rtol=0, atol=0)

    with pytest.warns(QuantizedMergeWarning):
        plain = model.merge_and_unload()
    assert not any(isinstance(m, TraDyLayer) for m in plain.modules())
    assert quantization_of(plain.model.layers[0].mlp.down_proj) is not None
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids()).logits, merged, rtol=0, atol=0)


def dequantized_twin(quantized: nn.Module, model: nn.Module) -> nn.Module:
    """``model`` (same architecture as ``quantized``) with each quantized linear's weight and bias
    replaced by the dequantized ones, in float32."""
    for name, module in quantized.named_modules():
        if quantization_of(module) is not None:
            twin = model.get_submodule(name)
            twin.weight.data = dequantize(module).float()
            if module.bias is not None:
                twin.bias.data = module.bias.detach().float()
    return model


def test_det_rgn_scores_a_quantized_base_as_its_dequantized_float_model(backend):
    batches = [{"input_ids": ids(s), "labels": ids(s)} for s in range(2)]
    det_rgn = trady_peft.TraDyConfig(strategy="d-det-rgn", memory_budget="32KiB")
    quantized = quantize_model(llama(), backend)
    dense = dequantized_twin(quantized, llama())
    models = [get_peft_model(m, det_rgn) for m in (quantized, dense)]
    scores = [m.base_model.score_channels(batches) for m in models]
    assert any(m.quantization is not None for _, m in models[0].base_model.trady_layers("default"))
    assert models[0].base_model.selection_summary()["selected_channels"] > 0
    # int8 backends quantize the output gradient in backward, so the gradient reaching earlier layers differs.
    tol = 5e-2 if backend == "bnb-int8" else 1e-4
    for name, norms in scores[1].items():
        torch.testing.assert_close(scores[0][name], norms, rtol=tol, atol=tol * float(norms.max()))


def test_storage_bytes_count_the_quantized_format(backend):
    layer = quantize_linear(nn.Linear(128, 64, bias=False), backend)
    nbytes = storage_bytes(layer)
    values = 128 * 64
    if backend.startswith("bnb-") and backend != "bnb-int8":
        assert values // 2 < nbytes < values  # half a byte a value plus the block statistics
    else:
        assert values < nbytes < 2 * values  # a byte a value plus the row scales
    assert nbytes < values * 4 // 2


@pytest.mark.parametrize("backend_name", ["bnb-nf4"])
def test_bnb_4bit_is_not_repacked_for_cpu_inference_once_wrapped(backend_name):
    if _unsupported(backend_name):
        pytest.skip(_unsupported(backend_name))
    model = get_peft_model(quantize_model(llama(), backend_name), config(init_weights=False))
    model.train()
    with torch.no_grad():
        train_mode = model(input_ids=ids()).logits
    model.eval()
    with torch.no_grad():
        eval_mode = model(input_ids=ids()).logits
    torch.testing.assert_close(eval_mode, train_mode, rtol=0, atol=0)
    for _, layer in model.base_model.trady_layers("default"):
        assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    with pytest.warns(QuantizedMergeWarning):
        model.merge_adapter()  # the weight can still be dequantized


def _transformers_config(backend: str):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if backend == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    kind = backend.removeprefix("bnb-")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)


def test_a_model_quantized_by_transformers_trains_and_merges(backend, tmp_path):
    from transformers import AutoModelForCausalLM

    llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=_transformers_config(backend), device_map="cpu"
    )
    model = get_peft_model(base, config())
    layers = [m for m in model.modules() if isinstance(m, TraDyLayer)]
    assert len(layers) == 7 and all(m.quantization is not None for m in layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids(), labels=ids()).loss.backward()
    optimizer.step()
    assert any(m.get_delta_weight("default").abs().sum() > 0 for m in layers)
    with pytest.warns(QuantizedMergeWarning):
        merged = model.merge_and_unload()
    assert quantization_of(merged.model.layers[0].self_attn.q_proj) is not None


def test_export_lora_serves_the_adapter_on_the_same_quantized_base(backend, tmp_path):
    model = get_peft_model(quantize_model(llama(), backend), config(init_weights=False))
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    trady_peft.export_lora(model, tmp_path)
    base = quantize_model(llama(), backend)
    base.is_loaded_in_4bit = backend in ("bnb-nf4", "bnb-fp4")  # as transformers marks it: peft's bnb LoRA layers
    base.is_loaded_in_8bit = backend == "bnb-int8"
    lora = PeftModel.from_pretrained(base, tmp_path)
    # Train mode (no dropout in the export): in eval mode bitsandbytes would repack the 4-bit weights
    # for its bf16 CPU kernel (see test_bnb_4bit_is_not_repacked_for_cpu_inference_once_wrapped).
    lora.train()
    with torch.no_grad():
        got = lora(input_ids=ids()).logits
    atol = 1e-2 if backend == "bnb-int8" else 1e-5  # int8 inputs: see test_save_and_load_roundtrip
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_a_torchao_format_that_cannot_be_rebuilt_is_refused_before_anything_merges():
    if _unsupported("torchao-int8"):
        pytest.skip(_unsupported("torchao-int8"))
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    base = llama()
    quantize_(base.model, Int8DynamicActivationInt8WeightConfig())
    model = get_peft_model(base, config(init_weights=False))
    weights = {n: m.base_layer.weight for n, m in model.base_model.trady_layers("default")}
    with pytest.raises(TypeError, match=r"Cannot merge into the quantized layer '.*q_proj'.*export_lora.*Nothing was"):
        model.merge_adapter()
    assert all(m.base_layer.weight is weights[n] for n, m in model.base_model.trady_layers("default"))
    assert not any(m.merged for _, m in model.base_model.trady_layers("default"))
    plain = model.unload()  # unloading without merging needs no requantization
    assert quantization_of(plain.model.layers[0].self_attn.q_proj) is not None


def test_a_byte_budget_prices_and_bounds_the_step_on_a_quantized_base(backend):
    from tests.references import measured_footprint

    budget = 48 * 1024
    quantized = get_peft_model(
        quantize_model(llama(), backend), trady_peft.TraDyConfig(memory_budget=f"{budget}B", strategy="d-full-random")
    )
    fp32 = get_peft_model(llama(), trady_peft.TraDyConfig(memory_budget=f"{budget}B", strategy="d-full-random"))
    quantized.train()
    optimizer = torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=1e-3)
    for step, (size, length) in enumerate([(2, 8), (4, 16)]):
        batch = {"input_ids": ids(step).repeat(2, 2)[:size, :length], "labels": ids(step).repeat(2, 2)[:size, :length]}
        footprint, saved = measured_footprint(quantized, batch, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        assert 0 < saved and footprint <= budget, (step, footprint)
    # The prices do not depend on the weights' format: the same layers, channels and input sizes.
    fp32.train()
    fp32(**batch)
    assert len(quantized.base_model.layer_costs) == 7
    assert quantized.base_model.layer_costs == fp32.base_model.layer_costs
