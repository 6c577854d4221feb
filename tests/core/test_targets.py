"""Which layers TraDy wraps by default, with peft's layer selectors, and how layers group into depth blocks."""

from __future__ import annotations

import pytest
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_gpt2, tiny_llama
from trady_peft.core.targets import depth_blocks


def test_default_targets_skip_output_embedding_and_saved_modules():
    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig())
    names = [n for n, _ in model.base_model.trady_layers("default")]
    assert names and not any("lm_head" in n for n in names)
    cnn = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(modules_to_save=["classifier"]))
    assert [n for n, _ in cnn.base_model.trady_layers("default")] == ["stem", "dw", "pw"]


def wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, trady_peft.TraDyLayer)}


@pytest.mark.parametrize(
    "factory, pattern, prefix",
    [(tiny_gpt2, "h", "transformer.h."), (tiny_llama, "layers", "model.layers.")],
)
def test_layers_to_transform_with_default_targets(factory, pattern, prefix):
    model = get_peft_model(factory(), trady_peft.TraDyConfig(layers_to_transform=[1], layers_pattern=pattern))
    names = wrapped(model)
    assert names and all(f"{prefix}1." in n for n in names)
    everything = wrapped(get_peft_model(factory(), trady_peft.TraDyConfig()))
    assert names == {n for n in everything if f"{prefix}1." in n}


def test_depth_blocks_group_consecutive_layers_by_their_first_number():
    names = ["stem", "features.1.conv.0", "features.1.conv.1", "features.12.conv", "head", "model.layers.4.q"]
    assert depth_blocks(names) == [
        ["stem"],
        ["features.1.conv.0", "features.1.conv.1"],
        ["features.12.conv"],
        ["head"],
        ["model.layers.4.q"],
    ]
