"""FSDP2 placement of the bank in one process (a world of 1): fast checks of the helper and the refusals.

The two-process runs (equality with one process, resume, accelerate) are in tests/core/distributed/test_two_ranks.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import trady_peft
from tests.tiny_models import tiny_llama
from trady_peft.core.collectives import average_gradient


@contextlib.contextmanager
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def model_and_batch():
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget=600, strategy="d-full-random"))
    model.train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_helper_leaves_the_bank_whole_and_training_saving_work(tmp_path):
    model, ids = model_and_batch()
    bank = model.base_model.trady_bank["default"].weight
    with world_of_one():
        ignored = trady_peft.fsdp_ignored_params(model)
        assert ignored == {bank}
        for block in model.base_model.model.model.layers:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, DTensor)
        assert model.base_model.trady_bank["default"].weight is bank  # same Parameter, not sharded
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        trady_peft.next_period(model, optimizer)
        model(input_ids=ids, labels=ids).loss.backward()
        model.save_pretrained(tmp_path)
    assert all(bank.averages_gradients for bank in model.base_model.trady_bank.values())
    assert sum(layer.trady_indices["default"].numel() for _, layer in model.base_model.trady_layers("default"))


def test_a_bank_fsdp_sharded_is_refused_at_the_period_change():
    model, ids = model_and_batch()
    with world_of_one():
        fully_shard(model)  # no ignored_params
        assert isinstance(model.base_model.trady_bank["default"].weight, DTensor)
        model(input_ids=ids, labels=ids).loss.backward()
        with pytest.raises(RuntimeError, match=r"FSDP sharded adapter 'default'.*fsdp_ignored_params\(model\)"):
            trady_peft.next_period(model)
        with pytest.raises(RuntimeError, match="FSDP sharded adapter 'default'"):
            model.save_pretrained("/nonexistent/never-written")
        with pytest.raises(RuntimeError, match=r"FSDP sharded adapter 'default'.*while taking a state dict"):
            model.state_dict()


def test_average_gradient_is_a_no_op_alone():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradient(p)  # no process group
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    with world_of_one():
        average_gradient(p)
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_det_rgn_scores_under_fsdp2_as_without_it():
    config = trady_peft.TraDyConfig(memory_budget="32KiB", strategy="d-det-rgn")
    ids = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    batches = [{"input_ids": i, "labels": i} for i in ids]
    plain = get_peft_model(tiny_llama(), config).base_model.score_channels(batches)
    model = get_peft_model(tiny_llama(), config)
    with world_of_one():
        ignored = trady_peft.fsdp_ignored_params(model)
        for block in model.base_model.model.model.layers:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, DTensor)
        trady_peft.next_period(model, batches=batches)  # prices and scores through the FSDP root
        sharded = model.base_model.selection_states["default"].scores
        assert model.base_model.selection_summary()["selected_channels"] > 0
    assert sharded.keys() == plain.keys()
    for name, norms in plain.items():
        torch.testing.assert_close(sharded[name], norms, rtol=1e-5, atol=1e-7)
