"""TraDy under transformers' gradient checkpointing trains exactly as without it, and keeps less.

Checkpointing recomputes each decoder (or encoder) block's forward inside the backward pass, TraDy's
own autograd functions and memory-saving twins included, and replays the block's dropout draws. In
float64, a few AdamW steps of an adapter with checkpointing (torch's reentrant and non-reentrant
variants) must give the bank the same gradients as without it, MeDyate's recorded channel norms
must be the same (its hook on the bank fires once per backward, not once per recomputed block),
and the next period must draw the same channels. The instrument for memory is
`trady_peft.measure_training_step`: with checkpointing, no TraDy layer inside a checkpointed block
keeps a saved input.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_bert, tiny_llama

STEPS = 3
BLOCK = re.compile(r"\.layers?\.\d+\.")  # model.layers.0. (Llama), bert.encoder.layer.0. (BERT)


def _llama_batch():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _bert_batch():
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}


MODELS = {"llama": (tiny_llama, _llama_batch), "bert": (tiny_bert, _bert_batch)}


def _train(model_name: str, strategy: str, checkpointing: str | None) -> dict:
    """``STEPS`` AdamW steps of a float64 adapter (``checkpointing``: None, "reentrant" or
    "non-reentrant"); the bank's gradient at each step, MeDyate's statistics, the next period's
    channels and one measured step."""
    build, batch = MODELS[model_name]
    torch.manual_seed(0)  # the same weights every call (tiny_bert draws them from the global generator)
    base = build().double()
    if checkpointing is not None:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = trady_peft.TraDyConfig(memory_budget="40KB", strategy=strategy, seed=3, layer_ranking=None)
    model = get_peft_model(base, config).train()
    torch.manual_seed(0)  # the dropout draws (BERT)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trady_peft.next_period(model, optimizer, period=0)
    bank = model.base_model.trady_bank["default"].weight
    grads = []
    for _ in range(STEPS):
        model(**batch()).loss.backward()
        grads.append(bank.grad.clone())
        optimizer.step()
        optimizer.zero_grad()
    statistics = model.base_model.periods.states["default"].statistics
    norms = None
    if statistics is not None:  # MeDyate
        norms = {k: v.clone() for k, v in statistics.period_sum.items()}, statistics.steps
    trady_peft.next_period(model, optimizer, period=1)
    channels = {n: layer.trady_idx["default"].clone() for n, layer in model.base_model.trady_layers()}
    mem = trady_peft.measure_training_step(model, batch(), optimizer)
    # The TraDy layers inside the blocks checkpointing recomputes (the BERT pooler, say, is outside).
    layers = {f"base_model.model.{n}" for n, _ in model.base_model.trady_layers() if BLOCK.search(n)}
    return {
        "grads": grads,
        "norms": norms,
        "channels": channels,
        "saved": mem.saved_activations,
        "saved_in_layers": sum(b for n, b in mem.saved_by_module.items() if n in layers),
    }


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("strategy", ["d-full-random", "medyate"])
@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_checkpointing_trains_as_without_it_and_keeps_no_layer_input(model_name, strategy, checkpointing):
    plain = _train(model_name, strategy, None)
    checkpointed = _train(model_name, strategy, checkpointing)
    for a, b in zip(plain["grads"], checkpointed["grads"], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a)
    if strategy == "medyate":
        (sums, steps), (sums_gc, steps_gc) = plain["norms"], checkpointed["norms"]
        assert steps == steps_gc == STEPS
        assert sums.keys() == sums_gc.keys() and sums
        for name in sums:
            torch.testing.assert_close(sums_gc[name], sums[name])
    assert plain["channels"].keys() == checkpointed["channels"].keys()
    for name, channels in plain["channels"].items():
        assert torch.equal(checkpointed["channels"][name], channels)
    # Without checkpointing the layers keep their inputs; with it, the blocks keep only their own inputs.
    assert plain["saved_in_layers"] > 0 and checkpointed["saved_in_layers"] == 0
    assert checkpointed["saved"] < plain["saved"] / 2
