"""Backprop stops at the lowest trained layer, and `max_depth` raises that layer.

The instrument is `trady_peft.measure_training_step` (saved-tensor hooks, independent of the code
under test): every byte autograd keeps is attributed to the module that was running. Below the
lowest trained layer that must be zero, also when transformers' ``enable_input_require_grads`` or
gradient checkpointing make the input embeddings' output require grad.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama

TOP_BLOCK = ["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]


def _ids():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _below(mem, prefixes=("model.embed_tokens", "model.layers.0")) -> dict[str, int]:
    """Saved bytes of the modules under ``prefixes`` (names relative to the base model)."""
    out = {}
    for name, nbytes in mem.saved_by_module.items():
        rel = name.removeprefix("base_model.model.")
        if any(rel == p or rel.startswith(p + ".") for p in prefixes) and nbytes:
            out[rel] = nbytes
    return out


def _top_block_model(setting: str, **config):
    model = get_peft_model(
        tiny_llama().train(),
        trady_peft.TraDyConfig(target_modules=TOP_BLOCK, channels_per_layer=4, strategy="d-full-random", **config),
    ).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's deprecation
        if setting == "input_require_grads":
            model.enable_input_require_grads()
        elif setting.startswith("checkpoint"):
            reentrant = setting == "checkpoint_reentrant"
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def _bank_grad(model) -> torch.Tensor:
    return model.base_model.trady_bank["default"].weight.grad


@pytest.mark.parametrize("setting", ["plain", "input_require_grads", "checkpoint_reentrant"])
def test_nothing_is_kept_below_the_lowest_trained_block_and_its_channels_still_train(setting):
    """Only the top block's channels (and the head) train: the lower block and the embeddings keep
    nothing, and the bank's gradient is the one of the plain, uncheckpointed step."""
    reference = _top_block_model("plain", modules_to_save=["lm_head"])
    trady_peft.measure_training_step(reference, _ids())
    model = _top_block_model(setting, modules_to_save=["lm_head"])
    mem = trady_peft.measure_training_step(model, _ids())
    assert mem.saved_activations > 0
    assert _below(mem) == {}, _below(mem)
    torch.testing.assert_close(_bank_grad(model), _bank_grad(reference))
    assert _bank_grad(model).count_nonzero() == _bank_grad(model).numel()


def test_without_the_backprop_stop_enable_input_require_grads_keeps_the_lower_block():
    """The failure the hooks fix, measured: so the test above would fail without them."""
    model = _top_block_model("input_require_grads")
    model.base_model._backprop_stop.remove()
    mem = trady_peft.measure_training_step(model, _ids())
    assert sum(_below(mem).values()) > 0.3 * mem.saved_activations, mem.saved_by_module


def test_non_reentrant_checkpoint_lower_block_sees_no_input_that_requires_grad():
    """torch's non-reentrant checkpoint packs its block inputs whether they need a gradient or not,
    so here the instrument is which inputs require grad (a forward hook), not the packed bytes."""
    model = _top_block_model("checkpoint_plain")
    seen = {}
    layers = model.base_model.model.model.layers

    def record(i):
        def hook(module, args, output):
            seen.setdefault(i, args[0].requires_grad)

        return hook

    for i, layer in enumerate(layers):
        layer.input_layernorm.register_forward_hook(record(i))
    trady_peft.measure_training_step(model, _ids())
    assert seen == {0: False, 1: False}  # the lowest trained layer (q_proj) comes after block 1's norm
    assert _bank_grad(model).count_nonzero() == _bank_grad(model).numel()


def test_a_trained_embedding_keeps_its_gradient():
    model = _top_block_model("input_require_grads", modules_to_save=["embed_tokens"])
    trady_peft.measure_training_step(model, _ids())
    grads = [p.grad for n, p in model.named_parameters() if "embed_tokens" in n and p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cnn_twins_keep_nothing_below_the_trained_layer():
    model = get_peft_model(
        tiny_cnn().train(), trady_peft.TraDyConfig(target_modules=["pw"], channels_per_layer=2)
    ).train()
    x = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    mem = trady_peft.measure_training_step(model, x)
    below = {k: v for k, v in mem.saved_by_module.items() if k.rsplit(".", 1)[-1] in ("stem", "bn1", "act1", "dw")}
    assert mem.saved_activations > 0 and not any(below.values()), mem.saved_by_module


# ----------------------------------------------------------------------------- max_depth


@pytest.mark.parametrize("budget", [None, 300])
def test_max_depth_draws_only_from_the_top_blocks_and_keeps_less(budget):
    def step(depth):
        config = trady_peft.TraDyConfig(
            memory_budget=budget,
            channels_per_layer=None if budget else 4,
            strategy="d-full-random",
            max_depth=depth,
        )
        model = get_peft_model(tiny_llama().train(), config).train()
        return model, trady_peft.measure_training_step(model, _ids())

    deep, deep_mem = step(None)
    shallow, mem = step(1)
    tuner = shallow.base_model
    selected = [n for n, layer in tuner.trady_layers("default") if layer.trady_delta["default"].count]
    assert selected and all(n.startswith("model.layers.1.") for n in selected)
    assert {n for n, _ in tuner.candidate_layers()} == {n for n, _ in tuner.trady_layers("default") if ".1." in n}
    assert _below(mem) == {}
    assert mem.saved_activations < deep_mem.saved_activations
    if budget is None:  # without a budget every block draws, the lowest one included
        assert _below(deep_mem)


def test_max_depth_that_leaves_no_ranked_layer_says_so():
    config = trady_peft.TraDyConfig(
        memory_budget=300, layer_ranking=["layers.0.mlp.up_proj"], strategy="trady", max_depth=1
    )
    with pytest.raises(ValueError, match=r"max_depth=1 leaves no candidate layer.*Raise max_depth, or pass None"):
        get_peft_model(tiny_llama(), config)


def test_reentrant_checkpointing_keeps_one_hidden_state_per_block_from_the_lowest_trained_one_up():
    """The benchmark's instrument under checkpointing (benchmarks/transformer_frozen_path.py): with the
    reentrant checkpoint, LoRA keeps each block's input, TraDy with max_depth=1 only the top block's."""
    import transformer_frozen_path as bench  # benchmarks/, on pytest's pythonpath

    shape = bench.Shape(hidden=32, layers=2, heads=4, vocab=64, batch=2, seq=8)
    hidden_state = shape.batch * shape.seq * shape.hidden * 4
    budget = bench.budget_bytes(bench.parameter_count("llama", shape))
    kept = {}
    for method in (bench.Method("LoRA r=8", "lora"), bench.Method("TraDy", "trady", {"max_depth": 1})):
        model = bench.make("llama", shape, method, budget)
        bench._checkpointing(model, True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mem = trady_peft.measure_training_step(model, bench.batch_of("llama", shape))
        kept[method.kind] = [
            mem.saved_by_module.get(f"base_model.model.model.layers.{i}", 0) for i in range(shape.layers)
        ]
    assert kept["lora"] == [hidden_state, hidden_state]
    assert kept["trady"] == [0, hidden_state]


def test_a_users_own_hook_on_the_embeddings_keeps_its_gradient_in_training_and_eval():
    """Attribution-style code makes the embedding output require grad itself: TraDy must not detach it."""
    model = _top_block_model("plain")
    captured = {}

    def keep(module, args, output):  # not transformers' or peft's hook
        output.requires_grad_(True)
        output.retain_grad()
        captured["embeddings"] = output

    model.get_input_embeddings().register_forward_hook(keep)
    for train in (True, False):
        model.train(train)
        model(**_ids()).loss.backward()
        assert captured["embeddings"].grad is not None, f"training={train}"


def test_blocks_checkpointed_outside_transformers_keep_the_hooks_effect():
    """A custom model (no GradientCheckpointingLayer) that checkpoints its blocks reentrantly relies on
    the grad-requiring embedding output: its adapter must still get a gradient."""
    from torch.utils.checkpoint import checkpoint

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 16)
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(2)
            )
            self.head = torch.nn.Linear(16, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=True)
            return self.head(h).sum()

    base = Model()

    def make_inputs_require_grad(module, args, output):  # peft's prepare_model_for_kbit_training hook
        output.requires_grad_(True)

    base.embed.register_forward_hook(make_inputs_require_grad)
    model = get_peft_model(
        base, trady_peft.TraDyConfig(target_modules=["blocks.1.0"], channels_per_layer=4, strategy="d-full-random")
    ).train()
    model(torch.randint(0, 32, (2, 5))).backward()
    grad = _bank_grad(model)
    assert grad is not None and grad.abs().sum() > 0


def test_a_refused_quantized_merge_leaves_the_tuner_working():
    """`merge_and_unload` refused before anything merges must not have removed the tuner's hooks."""
    model = _top_block_model("plain")
    tuner = model.base_model
    hooks_before = (len(tuner.model._forward_pre_hooks), len(tuner.model._forward_hooks))
    from unittest import mock

    from trady_peft.core.layer import TraDyLayer

    with (
        mock.patch.object(TraDyLayer, "quantization", new_callable=mock.PropertyMock, return_value="int8"),
        mock.patch("trady_peft.model.requantize_refusal", return_value="a format TraDy cannot rebuild"),
        pytest.raises(TypeError, match="Nothing was merged"),
    ):
        model.merge_and_unload()
    assert (len(tuner.model._forward_pre_hooks), len(tuner.model._forward_hooks)) == hooks_before
    assert tuner._backprop_stop.handles  # the backprop stop still in place
