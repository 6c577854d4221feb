"""Mixed precision: forward AND backward under ``torch.autocast`` (CPU bf16/fp16 here).

Every TraDy layer kind and every frozen-path twin must run its backward under autocast, agree
with an fp32 dense reference within the narrow dtype's tolerance, and keep the trainable bank,
its gradient and the accumulated store in fp32. The HF Trainer with ``bf16=True`` must train.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

import trady_peft
from tests.test_gradients import INPUTS, LAYERS, StaticSamePaddingConv, channel_slices, dense_reference
from tests.test_gradients import reference_output as _reference_output
from tests.test_trainer import CountingText
from tests.tiny_models import Holder, tiny_cnn, tiny_gpt2, tiny_llama
from trady_peft.memory import frozen_path


def _cpu_autocast_works(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            a = torch.randn(2, 2)
            return (a @ a).dtype == dtype
    except (RuntimeError, ValueError):
        return False


DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(
        torch.float16,
        id="fp16",
        marks=pytest.mark.skipif(
            not _cpu_autocast_works(torch.float16), reason="this torch has no float16 autocast on CPU"
        ),
    ),
]
#: relative tolerance (of the reference's largest magnitude) for one narrow-dtype layer
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}

KINDS = {**LAYERS, "static_padding_conv": lambda: StaticSamePaddingConv(4, 6, 3, stride=2, groups=2)}
SHAPES = {**INPUTS, "static_padding_conv": (2, 4, 8, 8)}


def reference_output(base, x, weight):
    if isinstance(base, StaticSamePaddingConv):
        return torch.nn.functional.conv2d(base.static_padding(x), weight, base.bias, base.stride, 0, 1, base.groups)
    return _reference_output(base, x, weight)


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str):
    got, expected = got.float(), expected.float()
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    assert math.isfinite(err) and err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_trady_layer_backward_under_autocast_matches_fp32_reference(kind, dtype, backward_inside):
    torch.manual_seed(0)
    base = KINDS[kind]()
    reference_base = KINDS[kind]()
    reference_base.load_state_dict(base.state_dict())
    model = get_peft_model(
        Holder(base),
        trady_peft.TraDyConfig(
            target_modules=["layer"], channels_per_layer=0.5, init_weights=False, strategy="d-full-random"
        ),
    )
    tuner, layer = model.base_model, model.base_model.model.layer
    tuner.next_period()  # non-empty accumulated store, then a new selection
    bank = tuner.trady_bank["default"].weight
    with torch.no_grad():
        bank.normal_(0, 0.3)
    channels = layer.trady_idx["default"].long()
    assert channels.numel() > 0 and layer.trady_indices["default"].numel() > 0

    x = torch.randn(SHAPES[kind], requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        assert out.dtype == dtype
        probe = torch.randn(out.shape)
        if backward_inside:
            (out.float() * probe).sum().backward()
    if not backward_inside:
        (out.float() * probe).sum().backward()

    view = layer.trady_delta["default"]
    x_ref, w_eff, out_ref = dense_reference(layer, base, reference_base, x, probe, reference_output)  # fp32

    tol = TOL[dtype]
    assert_close_rel(out, out_ref, tol, "output")
    assert x.grad.dtype == torch.float32
    assert_close_rel(x.grad, x_ref.grad, tol, "input gradient")
    assert bank.dtype == torch.float32 and bank.grad.dtype == torch.float32
    got = bank.grad[view.offset : view.offset + view.numel].view(channels.numel(), *view.slice_shape)
    assert_close_rel(got, channel_slices(reference_base, w_eff.grad, channels), tol, "delta gradient")
    assert layer.base_layer.weight.grad is None
    tuner.next_period()  # folding after a mixed-precision step keeps the store in fp32
    assert layer.trady_values["default"].dtype == torch.float32


TWINS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4, bias=False), (2, 4, 7, 7)),
    "conv2d_same_reflect": (lambda: nn.Conv2d(4, 5, 4, padding="same", padding_mode="reflect"), (2, 4, 7, 6)),
    "conv1d_circular": (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2), (2, 4, 9)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (2, 4, 5, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "relu": (lambda: nn.ReLU(), (2, 4, 5)),
    "relu6": (lambda: nn.ReLU6(), (2, 4, 5)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), (2, 4, 5)),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.5), (2, 4, 5)),
}


def _randomise_bn(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.normal_()
            module.bias.normal_()


@pytest.mark.parametrize("narrow_input", [False, True], ids=["fp32_input", "narrow_input"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(TWINS))
def test_frozen_path_twin_backward_under_autocast(kind, dtype, narrow_input):
    """Each twin alone, fed an fp32 input or the narrow output of an autocast layer before it."""
    torch.manual_seed(0)
    make, shape = TWINS[kind]
    twin = make().eval()
    _randomise_bn(twin)
    twin.requires_grad_(False)
    reference = make().eval()
    reference.load_state_dict(twin.state_dict())
    holder = Holder(twin)
    assert frozen_path.apply_memory_saving(holder) == ["layer"]

    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        inp = x.to(dtype) if narrow_input else x
        out = holder(inp)
        probe = torch.randn(out.shape)
    (out.float() * probe).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = reference(x_ref.to(dtype).float() if narrow_input else x_ref)
    (out_ref * probe).sum().backward()
    tol = TOL[dtype]
    assert_close_rel(out, out_ref, tol, "output")
    assert x.grad.dtype == torch.float32
    assert_close_rel(x.grad, x_ref.grad, tol, "input gradient")


def test_frozen_path_cnn_with_trady_backward_under_autocast():
    """The whole SmallCNN (TraDy convs + frozen BN/ReLU6 twins) under bf16 autocast vs fp32."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=0.5, init_weights=False, strategy="d-full-random")
    )
    for module in model.modules():
        _randomise_bn(module)
    bank = model.base_model.trady_bank["default"].weight
    with torch.no_grad():
        bank.normal_(0, 0.3)
    x = torch.randn(4, 3, 16, 16)
    out_ref = model(pixel_values=x)["logits"]
    grad_ref = torch.autograd.grad(out_ref.square().sum(), bank)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=x)["logits"]
    (grad,) = torch.autograd.grad(out.float().square().sum(), bank)
    assert grad.dtype == torch.float32
    assert_close_rel(out, out_ref, 5e-2, "logits")
    assert_close_rel(grad, grad_ref, 1e-1, "bank gradient")


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.images = torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


TRAINER_CASES = {
    "gpt2": (tiny_gpt2, lambda: CountingText(n=32), {}),
    "llama": (tiny_llama, lambda: CountingText(n=32), {}),
    "cnn": (tiny_cnn, RandomImages, {"modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_trainer_bf16_trains_the_adapter(name, tmp_path):
    factory, data, extra = TRAINER_CASES[name]
    model = get_peft_model(factory(), trady_peft.TraDyConfig(channels_per_layer=0.5, **extra))
    tuner = model.base_model
    bank = tuner.trady_bank["default"].weight
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data(), callbacks=[trady_peft.TraDyCallback(resample_every_steps=2)]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert bank.dtype == torch.float32
    assert bank.detach().abs().sum() > 0  # step 3 trained it after the resample at step 2 zeroed it
    stored = [layer.trady_values["default"] for _, layer in tuner.trady_layers("default")]
    assert all(v.dtype == torch.float32 for v in stored)
    assert sum(v.abs().sum() for v in stored) > 0  # the first period's update was folded in
