"""Issue 4, acceptance 1: each memory-saving replacement equals the original and keeps less."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import trady_peft
from tests.tiny_models import tiny_cnn
from trady_peft.memory.frozen_path import apply_memory_saving, restore
from trady_peft.memory.frozen_path.common import pack_bits, unpack_bits

MODULES = {
    "relu": (lambda: nn.ReLU(), (4, 6, 5, 5)),
    "relu6": (lambda: nn.ReLU6(), (4, 6, 5, 5)),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 1.5), (4, 6, 5, 5)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), (4, 6, 5, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(6), (4, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (4, 6, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (4, 6, 9, 9)),
    "conv1d_grouped": (lambda: nn.Conv1d(6, 4, 3, groups=2), (4, 6, 11)),
}


class Holder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


@pytest.mark.parametrize("kind", list(MODULES))
def test_replacement_matches_the_original_and_keeps_fewer_bytes(kind):
    torch.manual_seed(0)
    factory, shape = MODULES[kind]
    original = factory().double()
    if isinstance(original, nn.modules.batchnorm._BatchNorm):
        original.running_mean.normal_()
        original.running_var.uniform_(0.5, 2.0)
        original.weight.data.normal_()
        original.bias.data.normal_()
    original.requires_grad_(False).eval()
    twin = copy.deepcopy(original)
    assert apply_memory_saving(twin) == [""]
    assert type(twin) is not type(original) and isinstance(twin, type(original))

    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    probe = torch.randn_like(original(x_ref))
    (original(x_ref) * probe).sum().backward()
    (twin(x) * probe).sum().backward()
    torch.testing.assert_close(twin(x), original(x_ref), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)

    kept = trady_peft.measure_training_step(Holder(twin), x.detach().requires_grad_(True)).saved_by_module.get("m", 0)
    kept_ref = trady_peft.measure_training_step(Holder(original), x_ref.detach().requires_grad_(True))
    kept_ref = kept_ref.saved_by_module.get("m", 0)
    assert kept < kept_ref, (kept, kept_ref)
    if "relu" in kind or kind == "hardtanh":
        assert kept == (x.numel() + 7) // 8  # one bit per element
    else:
        assert kept == 0

    assert restore(twin) == 1 and type(twin) is type(original)


def test_bit_packing_round_trips():
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_tuner_swaps_frozen_path_modules_and_unload_restores_them():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(target_modules=["pw"], channels_per_layer=2))
    inner = model.base_model.model
    assert type(inner.bn1).__name__ == "FrozenPathBatchNorm2d" and type(inner.act2).__name__ == "FrozenPathReLU6"
    assert type(inner.stem).__name__ == "FrozenPathConv2d"  # not a target: frozen
    assert type(inner.classifier) is nn.Linear
    base = model.unload()
    assert type(base.bn1) is nn.BatchNorm2d and type(base.stem) is nn.Conv2d and type(base.act2) is nn.ReLU6
    off = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, memory_saving_frozen_path=False))
    assert type(off.base_model.model.bn1) is nn.BatchNorm2d


def test_nothing_is_saved_below_the_lowest_trained_layer():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(target_modules=["pw"], channels_per_layer=2))
    model.train()
    mem = trady_peft.measure_training_step(model, torch.randn(4, 3, 16, 16))
    below = [
        k for k in mem.saved_by_module if any(k.endswith(n) for n in ("stem", "bn1", "act1", "dw", "bn2", "act2"))
    ]
    assert below == [], mem.saved_by_module


def test_frozen_conv_keeps_the_autocast_dtype():
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    twin = copy.deepcopy(conv)
    apply_memory_saving(twin)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin(x).dtype == conv(x).dtype == torch.bfloat16
