"""Loading an adapter file: damaged or foreign files are refused on every loading path with an error
naming the file, the layer and the remedy, and leave a live model unchanged; a good file loads exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from tests.tiny_models import tiny_cnn, tiny_cnn_adapter

FILE = "adapter_model.safetensors"
STEM = "base_model.model.stem"  # Conv2d(3, 8, 3): 3 input channels, slices of shape (8, 3, 3)
IDX, VAL = f"{STEM}.trady_indices", f"{STEM}.trady_values"
OTHER_MODEL = "saved from another base model"
DAMAGED = "damaged"


def _edited(saved, tmp_path, edit) -> str:
    path, tensors, _, _ = saved
    target = tmp_path / "edited"
    shutil.copytree(path, target)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors)
    save_file(tensors, target / FILE, metadata={"format": "pt"})
    return target


def _from_pretrained(path):
    PeftModel.from_pretrained(tiny_cnn(), path)


def _low_cpu_mem_usage(path):
    PeftModel.from_pretrained(tiny_cnn(), path, low_cpu_mem_usage=True)


def _load_adapter_new_name(path):
    tiny_cnn_adapter(seed=1).load_adapter(path, "other")


def _trainer_resume(path):
    # transformers' Trainer._load_from_checkpoint: model.load_adapter(checkpoint, active_adapter, is_trainable=True)
    tiny_cnn_adapter(seed=1).load_adapter(path, "default", is_trainable=True)


LOADERS = [_from_pretrained, _low_cpu_mem_usage, _load_adapter_new_name, _trainer_resume]


def _out_of_range(t):
    t[IDX][-1] = 3


def _negative(t):
    t[IDX][0] = -1


def _duplicated(t):
    t[IDX][1] = t[IDX][0]


def _unsorted(t):
    t[IDX] = t[IDX].flip(0).contiguous()


def _count_mismatch(t):
    t[VAL] = t[VAL][:-1].contiguous()


def _wrong_slice_shape(t):
    t[VAL] = torch.zeros(t[IDX].numel(), 4, 3, 3)


def _nan_values(t):
    t[VAL][0, 0, 0, 0] = float("nan")


def _float_indices(t):
    t[IDX] = t[IDX].float()


def _missing_values(t):
    del t[VAL]


CASES = {
    "out-of-range": (_out_of_range, "outside [0, 3)", OTHER_MODEL),
    "negative": (_negative, "input channel -1", OTHER_MODEL),
    "duplicated": (_duplicated, "more than once", DAMAGED),
    "unsorted": (_unsorted, "not sorted", DAMAGED),
    "count-mismatch": (_count_mismatch, "rows of values", DAMAGED),
    "wrong-slice-shape": (_wrong_slice_shape, "slices of shape (4, 3, 3)", OTHER_MODEL),
    "nan-values": (_nan_values, "non-finite", DAMAGED),
    "float-indices": (_float_indices, "integer dtype", DAMAGED),
    "missing-values": (_missing_values, "no trady_values", DAMAGED),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_or_foreign_file_is_refused_naming_file_layer_and_remedy(saved, tmp_path, case):
    edit, problem, remedy = CASES[case]
    path = _edited(saved, tmp_path, edit)
    with pytest.raises(ValueError) as info:
        _from_pretrained(path)
    message = str(info.value)
    assert str(path / FILE) in message, message
    assert f"layer {STEM!r}" in message, message
    assert problem in message, message
    assert remedy in message, message


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__.lstrip("_"))
@pytest.mark.parametrize("case", ["out-of-range", "nan-values", "wrong-slice-shape"])
def test_every_loading_path_checks_the_file(saved, tmp_path, load, case):
    edit, problem, _ = CASES[case]
    path = _edited(saved, tmp_path, edit)
    with pytest.raises(ValueError, match="saved from another base model|damaged") as info:
        load(path)
    assert str(path / FILE) in str(info.value) and STEM in str(info.value) and problem in str(info.value)


def _truncate(path):
    data = (path / FILE).read_bytes()
    (path / FILE).write_bytes(data[: len(data) // 2])


def _garbage(path):
    (path / FILE).write_bytes(b"this is not a safetensors file" * 4)


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__.lstrip("_"))
@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_a_corrupt_file_gives_an_error_naming_its_path(saved, tmp_path, damage, load):
    path = tmp_path / "corrupt"
    shutil.copytree(saved[0], path)
    damage(path)
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load(path)
    assert str(path / FILE) in str(info.value)


def test_a_good_file_loads_bit_exactly_on_every_path(saved):
    path, tensors, x, expected = saved
    model = PeftModel.from_pretrained(tiny_cnn(), path).eval()
    assert torch.equal(model(pixel_values=x)["logits"], expected)
    fast = PeftModel.from_pretrained(tiny_cnn(), path, low_cpu_mem_usage=True).eval()
    assert torch.equal(fast(pixel_values=x)["logits"], expected)
    other = tiny_cnn_adapter(seed=1)
    other.load_adapter(path, "loaded")
    layer = other.base_model.model.stem
    assert torch.equal(layer.trady_indices["loaded"], tensors[IDX])
    assert torch.equal(layer.trady_values["loaded"], tensors[VAL])


def test_a_refused_file_leaves_a_live_model_unchanged(saved, tmp_path):
    # The last layer is damaged: nothing before it may load, and the live delta must not restart.
    def damage_pw(t):
        t["base_model.model.pw.trady_values"][0].fill_(float("inf"))

    path = _edited(saved, tmp_path, damage_pw)
    model = tiny_cnn_adapter(seed=1)
    with torch.no_grad():
        model.base_model.trady_bank["default"].weight.normal_()  # mid-period: a live delta
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'base_model.model.pw'"):
        model.load_adapter(path, "default", is_trainable=True)  # as Trainer's resume does
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
