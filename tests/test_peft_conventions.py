"""The conventions peft's own test suite checks for every tuner, over every layer kind TraDy wraps.

peft's generic suite (``tests/test_custom_models.py`` in peft's repository) is not shipped with
peft; these tests check the same conventions on tiny models built here, so that a regression, or
a peft upgrade that changes a convention, fails in CI. Layer kinds: ``nn.Linear``, transformers'
``Conv1D``, ``nn.Conv1d``, ``nn.Conv2d``, grouped and depthwise ``nn.Conv2d``; sizes: a channel
count or fraction (with a trained head in ``modules_to_save``) and a budget in values or bytes.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

import trady_peft
from trady_peft.memory.budget import memory_accounting


class Net(nn.Module):
    """``layer`` (the layer TraDy wraps) -> ReLU -> flatten -> ``head`` (a Linear to 3 logits)."""

    def __init__(self, layer: nn.Module, features: int):
        super().__init__()
        self.layer = layer
        self.act = nn.ReLU()
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        return self.head(self.act(self.layer(x)).flatten(1))


@dataclass(frozen=True)
class Kind:
    """A layer kind: how to build a seeded tiny model around it, and an input batch."""

    name: str
    layer: callable
    features: int
    input_shape: tuple

    def model(self) -> Net:
        torch.manual_seed(0)
        return Net(self.layer(), self.features).eval()

    def inputs(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(seed))


KINDS = {
    "linear": Kind("linear", lambda: nn.Linear(10, 12), 12, (4, 10)),
    "conv1d_hf": Kind("conv1d_hf", lambda: Conv1D(12, 10), 12, (4, 10)),  # transformers' Conv1D: nf=12, nx=10
    "conv1d": Kind("conv1d", lambda: nn.Conv1d(6, 8, 3), 8 * 6, (4, 6, 8)),
    "conv2d": Kind("conv2d", lambda: nn.Conv2d(6, 8, 3), 8 * 9, (4, 6, 5, 5)),
    "conv2d_grouped": Kind("conv2d_grouped", lambda: nn.Conv2d(8, 8, 3, groups=2), 8 * 9, (4, 8, 5, 5)),
    "conv2d_depthwise": Kind("conv2d_depthwise", lambda: nn.Conv2d(8, 8, 3, groups=8), 8 * 9, (4, 8, 5, 5)),
}
SIZES = ["channels", "values", "bytes"]


def config(kind: Kind, size: str, **extra) -> trady_peft.TraDyConfig:
    """A non-identity adapter on ``layer``: 3 channels (or half of them, alternately) with the head
    trained, or a third of everything the layer could train under a budget in values or bytes."""
    common = dict(target_modules=["layer"], init_weights=False, **extra)
    if size == "channels":
        count = 3 if kind.name in ("linear", "conv1d", "conv2d") else 0.5
        return trady_peft.TraDyConfig(channels_per_layer=count, modules_to_save=["head"], **common)
    unit = "values" if size == "values" else "bytes"
    total = memory_accounting(kind.model(), kind.inputs(), unit=unit, target_modules=["layer"]).total
    budget = total // 3 if unit == "values" else f"{total // 2}B"
    return trady_peft.TraDyConfig(memory_budget=budget, **common)


CASES = [(k, s) for k in KINDS for s in SIZES if s != "bytes" or k in ("linear", "conv2d_grouped")]
IDS = [f"{k}-{s}" for k, s in CASES]


def build(kind_name: str, size: str, **extra):
    """The wrapped model with its channels drawn (a training forward prices a budget), in eval mode."""
    kind = KINDS[kind_name]
    model = get_peft_model(kind.model(), config(kind, size, **extra))
    model.train()
    model(kind.inputs(seed=2))
    return model.eval(), kind


def output(model, kind) -> torch.Tensor:
    with torch.no_grad():
        return model(kind.inputs())


def train(model, kind, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        model(kind.inputs(seed=10 + step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def assert_same_state_dict(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_only_adapter_tensors_train_and_they_carry_the_prefix(kind_name, size):
    model, kind = build(kind_name, size)
    names = trainable_names(model)
    assert "base_model.trady_bank.default.weight" in names
    assert all("trady_" in n or ".modules_to_save.default." in n for n in names), names
    before = copy.deepcopy(model.state_dict(keep_vars=False))
    raw_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(kind.inputs()).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == names
    train(model, kind, steps=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, raw_before[n])}
    assert changed == names
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if ".trady_values." in k)


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_save_load_round_trip_reproduces_the_state_dict_and_outputs(kind_name, size, trainable, tmp_path):
    model, kind = build(kind_name, size)
    train(model, kind)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(kind.model(), tmp_path, is_trainable=trainable).eval()
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
    assert torch.equal(output(loaded, kind), output(model, kind))
    names = trainable_names(loaded)
    if trainable:
        assert "base_model.trady_bank.default.weight" in names
        assert names == trainable_names(model)
    else:
        assert not names


@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_pickle_keeps_outputs_and_state_dict(kind_name, size):
    model, kind = build(kind_name, size)
    train(model, kind)
    copied = pickle.loads(pickle.dumps(model))
    assert_same_state_dict(copied.state_dict(), model.state_dict())
    assert torch.equal(output(copied, kind), output(model, kind))


@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_low_cpu_mem_usage_leaves_the_bank_on_meta_until_a_load_fills_it(kind_name, size, tmp_path):
    model, kind = build(kind_name, size)
    train(model, kind)
    model.save_pretrained(tmp_path)
    cfg = config(kind, size)
    empty = PeftModel(kind.model(), cfg, low_cpu_mem_usage=True)
    assert empty.base_model.trady_bank["default"].weight.device.type == "meta"
    set_peft_model_state_dict(empty, load_peft_weights(str(tmp_path)), low_cpu_mem_usage=True)
    assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"cpu"}
    assert torch.equal(output(empty.eval(), kind), output(model, kind))

    loaded = PeftModel.from_pretrained(kind.model(), tmp_path, low_cpu_mem_usage=True, is_trainable=True).eval()
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
    assert torch.equal(output(loaded, kind), output(model, kind))
    assert trainable_names(loaded) == trainable_names(model)
    train(loaded, kind)  # the materialised bank trains
    assert loaded.base_model.trady_bank["default"].weight.abs().sum() > 0


@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_disable_merge_unmerge(kind_name, size):
    model, kind = build(kind_name, size)
    train(model, kind)
    base = kind.model()
    expected_base, adapted = output(base, kind), output(model, kind)
    assert not torch.allclose(adapted, expected_base)
    with model.disable_adapter():
        assert torch.equal(output(model, kind), expected_base)  # bit for bit, convolutions included
    assert torch.equal(output(model, kind), adapted)
    layer = model.base_model.model.layer
    weight = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(output(model, kind), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, weight)
    assert torch.equal(output(model, kind), adapted)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, trady_peft.TraDyLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, kind), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind_name, size", CASES, ids=IDS)
def test_several_adapters_switch_and_round_trip(kind_name, size):
    model, kind = build(kind_name, size)
    first = output(model, kind)
    model.add_adapter("other", config(kind, size, seed=5))
    assert torch.equal(output(model, kind), first)  # adding does not activate
    model.set_adapter("other")
    model.train()
    model(kind.inputs(seed=2))  # prices and draws the other adapter under a budget
    second = output(model.eval(), kind)
    assert not torch.allclose(second, first)
    assert "base_model.trady_bank.other.weight" in trainable_names(model)
    assert "base_model.trady_bank.default.weight" not in trainable_names(model)
    train(model, kind)
    second = output(model, kind)

    fresh = get_peft_model(kind.model(), config(kind, size))
    fresh.add_adapter("other", config(kind, size, seed=5))
    fresh.load_state_dict(model.state_dict())
    fresh.set_adapter("other")
    fresh.eval()
    assert_same_state_dict(fresh.state_dict(), model.state_dict())
    assert torch.equal(output(fresh, kind), second)
    model.set_adapter("default")
    fresh.set_adapter("default")
    assert torch.equal(output(model, kind), first)
    assert torch.equal(output(fresh, kind), first)
