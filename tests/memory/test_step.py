"""step_memory bounds the whole training step, measured here by an instrument of the test's own.

The instrument (`measured_step`) runs a real step (forward, backward, AdamW step) and counts, by
distinct storage: the model's parameters and buffers, the tensors autograd saved for backward
(caught with ``saved_tensors_hooks``, outside the parameters and buffers), every gradient and every
optimizer state tensor. The adapter's part is its bank (with gradient and moments) and what the
TraDy layers saved (the selected channels' inputs).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama
from trady_peft import TraDyConfig
from trady_peft.core.layer import TraDyLayer


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _resident(model) -> dict:
    return {_key(t): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}


def measured_step(model, batch: dict, optimizer) -> dict:
    """One training step of ``model`` on ``batch``, measured (see the module docstring), in bytes."""
    saved, stack = {}, []

    def leave(module, args, output):
        stack.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: stack.append(m)),
        torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
    ]

    def pack(t):
        if _key(t) not in saved:
            saved[_key(t)] = (t.untyped_storage().nbytes(), any(isinstance(m, TraDyLayer) for m in stack))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch)["loss"]
    finally:
        for h in hooks:
            h.remove()
    resident = _resident(model)  # after the forward: a redraw at its start may replace buffers
    saved = {k: v for k, v in saved.items() if k not in resident}
    loss.backward()
    optimizer.step()
    banks = [b.weight for b in model.base_model.trady_bank.values()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = {id(p): p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None}
    states = {
        id(p): sum(v.numel() * v.element_size() for v in optimizer.state[p].values() if torch.is_tensor(v))
        for p in trainable
    }
    adapter = sum(
        b.numel() * b.element_size()
        + grads.get(id(b), 0)
        + sum(v.numel() * v.element_size() for v in optimizer.state[b].values() if torch.is_tensor(v) and v.dim())
        for b in banks
    )
    adapter += sum(nbytes for nbytes, inside in saved.values() if inside)
    optimizer.zero_grad()
    figures = {
        "weights": sum(resident.values()),
        "saved": sum(nbytes for nbytes, _ in saved.values()),
        "grads": sum(grads.values()),
        "optimizer": sum(states.values()),
        "adapter": adapter,
    }
    figures["step"] = figures["weights"] + figures["saved"] + figures["grads"] + figures["optimizer"]
    return figures


def images(batch: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32), "labels": torch.randint(0, 4, (batch,))}


def tokens(batch: int, length: int, labels: str) -> dict:
    ids = torch.randint(0, 64, (batch, length))
    return {"input_ids": ids, "labels": ids if labels == "tokens" else torch.randint(0, 3, (batch,))}


# name: (model, head trained in full, step_memory, two batches: the second larger)
MODELS = {
    "cnn": (tiny_cnn, ["classifier"], "48KiB", [lambda: images(4), lambda: images(8)]),
    "bert": (tiny_bert, ["classifier"], "600KiB", [lambda: tokens(4, 16, "class"), lambda: tokens(8, 16, "class")]),
    "llama": (tiny_llama, None, "600KiB", [lambda: tokens(2, 16, "tokens"), lambda: tokens(4, 24, "tokens")]),
}


def build(name: str, step_memory: str | None = None, **options):
    make, heads, bound, batches = MODELS[name]
    torch.manual_seed(0)
    config = TraDyConfig(step_memory=step_memory or bound, modules_to_save=heads, strategy="d-full-random", **options)
    model = get_peft_model(make(), config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches


@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_stays_within_step_memory_and_the_adapter_gets_what_the_rest_leaves(name, capsys):
    model, optimizer, batches = build(name)
    bound = model.peft_config["default"].step_budget.amount
    for make_batch in batches:
        batch = make_batch()
        step = measured_step(model, batch, optimizer)
        summary = model.base_model.selection_summary()
        share, rest = summary["budget"], summary["step_rest"]
        with capsys.disabled():
            print(
                f"\n{name} input {list(next(iter(batch.values())).shape)}: step_memory {bound:,} B, measured step "
                f"{step['step']:,} B (weights {step['weights']:,}, saved {step['saved']:,}, gradients "
                f"{step['grads']:,}, optimizer {step['optimizer']:,}); adapter share {share:,} B, adapter measured "
                f"{step['adapter']:,} B, rest priced {rest:,} B; {summary['selected_channels']} of "
                f"{summary['total_channels']} channels"
            )
        assert step["step"] <= bound
        assert share == bound - rest  # the adapter gets what the measured rest leaves
        assert step["adapter"] <= share
        assert step["step"] - step["adapter"] <= rest  # the rest priced bounds the rest measured
        assert 0 < summary["selected_channels"] < summary["total_channels"]  # the bound decided the draw


def test_a_larger_batch_reprices_the_rest_and_shrinks_the_adapter_share(caplog):
    model, optimizer, batches = build("llama")
    bank = model.base_model.trady_bank["default"].weight
    measured_step(model, batches[0](), optimizer)
    before = model.base_model.selection_summary()
    capacity = bank.numel()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        step = measured_step(model, batches[1](), optimizer)
    after = model.base_model.selection_summary()
    assert "redraws period 0" in caplog.text and "step_memory='600KiB'" in caplog.text
    assert after["step_rest"] > before["step_rest"]  # re-measured for the larger input
    assert after["budget"] == after["step_memory"] - after["step_rest"] < before["budget"]
    assert bank is model.base_model.trady_bank["default"].weight  # the optimizer's parameter, resized in place
    assert bank.numel() < capacity and optimizer.state[bank]["exp_avg"].shape == bank.shape
    assert model.base_model.selected_cost() <= after["budget"]
    assert step["step"] <= after["step_memory"] and step["adapter"] <= after["budget"]
    # The larger input stays priced: a batch no larger does not redraw.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        measured_step(model, batches[0](), optimizer)
    assert "redraws" not in caplog.text and model.base_model.selection_summary()["budget"] == after["budget"]


def _suggested(message: str) -> str:
    found = re.search(r"Pass step_memory='(\d+B)'", message)
    assert found, message
    return found.group(1)


def test_a_step_memory_the_rest_alone_exceeds_is_refused_with_the_numbers_and_the_suggested_one_works():
    model, optimizer, batches = build("llama", step_memory="64KiB")
    batch = batches[0]()
    with pytest.raises(ValueError) as refused:
        model(**batch)
    message = str(refused.value)
    for part in ("step_memory='64KiB' (65,536 bytes) does not hold this training step", "model weights and buffers",
                 "saved activations", "outside the adapter", "smaller batches"):  # fmt: skip
        assert part in message, message
    suggested = _suggested(message)
    model, optimizer, _ = build("llama", step_memory=suggested)
    step = measured_step(model, batch, optimizer)
    assert step["step"] <= trady_peft.memory.budget.parse_step_memory(suggested).amount
    assert model.base_model.selection_summary()["selected_channels"] >= 1


def test_a_refused_batch_leaves_the_adapter_to_price_a_smaller_one():
    model, _, _ = build("bert", step_memory="64KiB")
    small = tokens(1, 16, "class")
    with pytest.raises(ValueError) as refused:
        model(**small)
    model, optimizer, _ = build("bert", step_memory=_suggested(str(refused.value)))
    with pytest.raises(ValueError, match="does not hold this training step"):
        model(**tokens(8, 16, "class"))  # the suggestion was for one sample
    step = measured_step(model, small, optimizer)  # the smaller batch the message suggests
    summary = model.base_model.selection_summary()
    assert summary["selected_channels"] >= 1 and step["step"] <= summary["step_memory"]


def test_step_memory_and_memory_budget_together_are_refused_and_step_memory_alone_works():
    with pytest.raises(ValueError, match="not both: drop memory_budget to bound the step"):
        TraDyConfig(step_memory="600KiB", memory_budget="100KiB")
    model, optimizer, batches = build("llama")  # the same step_memory, memory_budget dropped
    assert measured_step(model, batches[0](), optimizer)["step"] <= 600 * 1024


@pytest.mark.parametrize("bad, suggested, fixed", [("600Kb", "'KiB'", "600KiB"), (614400, "'614400B'", "614400B")])
def test_a_bad_step_memory_is_refused_with_a_fix_that_works(bad, suggested, fixed):
    with pytest.raises(ValueError) as refused:
        TraDyConfig(step_memory=bad)
    assert suggested in str(refused.value), str(refused.value)
    model, optimizer, batches = build("llama", step_memory=fixed)
    assert measured_step(model, batches[0](), optimizer)["step"] <= 614400


@pytest.mark.parametrize("strategy", ["medyate", "d-det-rgn", "trady"])
def test_the_strategies_that_need_a_budget_accept_step_memory(strategy):
    config = TraDyConfig(step_memory="48KiB", strategy=strategy, modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = images(4)
    if strategy == "d-det-rgn":
        model.base_model.probe(batch)
        model.base_model.score_channels([batch])
    step = measured_step(model, batch, optimizer)
    summary = model.base_model.selection_summary()
    assert summary["selected_channels"] >= 1 and step["step"] <= summary["step_memory"]


def test_step_memory_survives_the_adapter_config_file(tmp_path):
    model, optimizer, batches = build("cnn")
    measured_step(model, batches[0](), optimizer)
    model.save_pretrained(tmp_path)
    loaded = TraDyConfig.from_pretrained(tmp_path)
    assert loaded.step_memory == "48KiB" and loaded.memory_budget is None and loaded.channels_per_layer is None
    assert loaded.step_budget.amount == 48 * 1024


def test_a_loaded_adapter_measures_its_step_again_and_trains_within_it():
    model, optimizer, batches = build("llama")
    batch = batches[0]()
    measured_step(model, batch, optimizer)
    state, optimizer_state = model.state_dict(), optimizer.state_dict()
    loaded, loaded_optimizer, _ = build("llama")
    assert loaded.base_model.trady_bank["default"].weight.numel() == 0  # sized by the probe, not yet run
    loaded.load_state_dict(state, strict=False)
    loaded_optimizer.load_state_dict(optimizer_state)  # moments of the saved bank's size
    step = measured_step(loaded, batch, loaded_optimizer)
    summary = loaded.base_model.selection_summary()
    assert step["step"] <= summary["step_memory"] and step["adapter"] <= summary["budget"]
    assert summary["period"] == 0 and summary["selected_channels"] >= 1


def test_an_input_no_measured_one_covers_is_measured_though_no_dimension_grew():
    model, optimizer, _ = build("llama")
    for batch, length in ((2, 32), (8, 8)):  # each side's largest is seen: (8, 32) is the largest of each
        measured_step(model, tokens(batch, length, "tokens"), optimizer)
    before = model.base_model.selection_summary()["step_rest"]
    step = measured_step(model, tokens(4, 24, "tokens"), optimizer)  # 96 tokens: more than either
    summary = model.base_model.selection_summary()
    assert summary["step_rest"] > before
    assert step["step"] <= summary["step_memory"] and step["adapter"] <= summary["budget"]


def test_measuring_the_rest_leaves_no_trace_in_batch_norm_statistics_or_random_streams():
    from trady_peft.memory.step import measure_saved_activations

    model = get_peft_model(tiny_cnn(), TraDyConfig(channels_per_layer=2, memory_saving_frozen_path=False)).train()
    norm, batch = model.base_model.model.bn1, images(4)
    mean, count, rng = norm.running_mean.clone(), int(norm.num_batches_tracked), torch.get_rng_state()
    saved = measure_saved_activations(model, batch, [m for _, m in model.base_model.trady_layers()])
    assert saved > 0  # the batch norms of this model keep their inputs (no memory-saving twins)
    assert torch.equal(norm.running_mean, mean) and int(norm.num_batches_tracked) == count
    assert torch.equal(torch.get_rng_state(), rng)
    model(**batch)  # a real forward does move them: the test would see a trace
    assert not torch.equal(norm.running_mean, mean)
