"""A saved adapter holds only the channels it touched (int32 indices, their values, the selection
state) and reloads exactly: in a fresh process, with ``low_cpu_mem_usage``, as trainable, through
``AutoPeftModel``, and into the live model it was saved from."""

from __future__ import annotations

import json

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import trady_peft
from tests.processes import run_python
from tests.tiny_models import tiny_cnn, tiny_gpt2


def train_a_little(model, steps: int = 2, periods: int = 3) -> list[dict[str, set[int]]]:
    """SGD on random data for a few periods; returns each period's selection per layer."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tuner = model.base_model
    selections = []
    for period in range(periods):
        if period:
            tuner.next_period(optimizer=optimizer)
        selections.append({n: set(layer.trady_idx["default"].tolist()) for n, layer in tuner.trady_layers("default")})
        for _ in range(steps):
            batch = torch.randn(4, 3, 16, 16)
            loss = model(pixel_values=batch, labels=torch.tensor([0, 1, 2, 3]))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return selections


def test_fresh_process_reload_reproduces_outputs_and_file_is_sparse(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_cnn(seed=1), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"])
    )
    selections = train_a_little(model)  # the last period is saved mid-period (not folded yet)
    model.eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = model(pixel_values=x)["logits"].detach()
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    touched = {}
    for name, layer in model.base_model.trady_layers("default"):
        union = set().union(*(sel[name] for sel in selections))
        touched[name] = union
        key = name.removeprefix("model.")
        idx = tensors[f"base_model.model.{key}.trady_indices"]
        val = tensors[f"base_model.model.{key}.trady_values"]
        assert idx.dtype == torch.int32
        assert set(idx.tolist()) == union  # the union of every period's channels, and no more
        assert val.shape == (len(union), *layer.geometry.slice_shape)
    trady_keys = {k for k in tensors if ".trady_" in k}
    head_keys = {k for k in tensors if "classifier" in k}
    assert trady_keys | head_keys == set(tensors)
    state_keys = {k for k in trady_keys if not k.endswith((".trady_indices", ".trady_values"))}
    assert state_keys == {"base_model.trady_state"}  # the selection state, for exact resumes
    assert tensors["base_model.trady_state"].dtype == torch.uint8
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRADY"

    out = run_python(f"""
import torch, trady_peft
from peft import PeftModel
from tests.tiny_models import tiny_cnn
import warnings
io = torch.load({str(tmp_path / "io.pt")!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(tiny_cnn(seed=1), {str(tmp_path / "adapter")!r}).eval()
assert not [w for w in caught if "missing adapter keys" in str(w.message)], [str(w.message) for w in caught]
got = model(pixel_values=io["x"])["logits"]
assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
print("EXACT")
""")
    assert "EXACT" in out


def test_low_cpu_mem_usage_and_trainable_reload(tmp_path):
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, init_weights=False))
    model.base_model.next_period()
    x = torch.randn(2, 3, 16, 16)
    expected = model.eval()(pixel_values=x)["logits"].detach()
    model.save_pretrained(tmp_path)
    fast = PeftModel.from_pretrained(tiny_cnn(), tmp_path, low_cpu_mem_usage=True).eval()
    assert not [n for n, t in [*fast.named_parameters(), *fast.named_buffers()] if t.device.type == "meta"]
    torch.testing.assert_close(fast(pixel_values=x)["logits"], expected, rtol=1e-6, atol=1e-6)
    trainable = PeftModel.from_pretrained(tiny_cnn(), tmp_path, is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["base_model.trady_bank.default.weight"]
    trainable(pixel_values=x, labels=torch.tensor([0, 1]))["loss"].backward()
    assert trainable.base_model.trady_bank["default"].weight.grad.abs().sum() > 0


def test_file_grows_with_the_union_of_touched_channels(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=1))
    tuner = model.base_model
    seen: dict[str, set[int]] = {n: set() for n, _ in tuner.trady_layers("default")}
    counts = []
    for period in range(4):
        if period:
            tuner.next_period()
        with torch.no_grad():  # pretend a period of training moved every selected value
            tuner.trady_bank["default"].weight.add_(0.01)
        for name, layer in tuner.trady_layers("default"):
            seen[name] |= set(layer.trady_idx["default"].tolist())
        model.save_pretrained(tmp_path / f"p{period}")
        tensors = load_file(tmp_path / f"p{period}" / "adapter_model.safetensors")
        saved = sum(t.numel() for k, t in tensors.items() if k.endswith("trady_indices"))
        counts.append(saved)
        assert saved == sum(len(s) for s in seen.values())
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_config_and_automodel_load_after_import(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(channels_per_layer=4, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    ids = torch.arange(12).view(2, 6)
    expected = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    out = run_python(f"""
import torch, trady_peft
from peft import AutoPeftModelForCausalLM, PeftConfig
config = PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
assert type(config).__name__ == "TraDyConfig", type(config)
io = torch.load({str(tmp_path / "io.pt")!r})
model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}).eval()
torch.testing.assert_close(model(input_ids=io["ids"]).logits, io["expected"], rtol=0, atol=1e-6)
print("OK")
""")
    assert "OK" in out


def test_reload_into_live_model_does_not_double_count(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2))
    train_a_little(model, periods=2)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    expected = model(pixel_values=x)["logits"].detach()
    model.save_pretrained(tmp_path)
    # Loading the adapter into the same live model (current delta still in the bank) must not
    # add the folded delta a second time.
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    torch.testing.assert_close(model(pixel_values=x)["logits"], expected, rtol=1e-6, atol=1e-6)
    assert isinstance(model, PeftModel)
