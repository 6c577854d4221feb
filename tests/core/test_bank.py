"""The bank's gradient is built once per backward pass, not once per TraDy layer.

Each layer reads its segment of the adapter's flat bank. Through one ``narrow`` view per layer,
autograd materialises a zero-filled gradient of the whole bank for every layer; through one
``split_with_sizes`` per forward (`DeltaBank.segment`), one node builds it once. The structural
check counts the autograd edges into the bank's gradient accumulator; the others check that the
gradients equal the per-layer ``narrow`` reference exactly, in the cases where the split is reused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_llama
from trady_peft.core.bank import DeltaBank


def _model(**config):
    return get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=0.25, **config))


def _bank(model):
    return model.base_model.trady_bank["default"].weight


def _loss(model, seed=0):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def _edges_into(root, target) -> int:
    """Number of autograd edges from nodes reachable from ``root`` into the node ``target``."""
    seen, stack, edges = set(), [root], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            edges += nxt is target
            stack.append(nxt)
    return edges


def _nodes(root) -> set:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return seen


def _accumulator(bank):
    return bank.view_as(bank).grad_fn.next_functions[0][0]  # the leaf's AccumulateGrad node


@pytest.fixture
def narrow_reference(monkeypatch):
    """Make every layer read its segment through its own ``narrow`` view (the previous behaviour)."""

    def use_narrow():
        monkeypatch.setattr(DeltaBank, "segment", lambda self, offset, numel: self.weight.narrow(0, offset, numel))

    return use_narrow


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_one_gradient_of_the_bank_per_backward(train, narrow_reference):
    """In training mode the attention blocks run as memory-saving twins that recompute in backward
    (`trady_peft.memory.frozen_path.attention`): they too must hand the bank's split segment gradients."""
    model = _model()
    model.train(train)
    bank = _bank(model)
    layers = [m for m in model.modules() if isinstance(m, trady_peft.TraDyLayer)]
    layers = [m for m in layers if m.current_delta_installed("default")]
    assert len(layers) > 4
    loss = _loss(model)
    assert _edges_into(loss.grad_fn, _accumulator(bank)) == 1
    names = {type(n).__name__ for n in _nodes(loss.grad_fn)}
    assert ("_RecomputeBackward" in names) == train  # the twins ran (training) or not (eval)
    grads = []
    bank.register_hook(grads.append)  # what reaches the bank's accumulator: one full-size gradient
    loss.backward()
    assert len(grads) == 1 and torch.equal(grads[0], bank.grad)
    narrow_reference()
    assert _edges_into(_loss(model).grad_fn, _accumulator(bank)) == len(layers)  # what the check catches


def _grads(model, steps):
    """Run ``steps`` (callables on the model) and return the bank's gradient after each."""
    out = []
    for step in steps:
        step(model)
        out.append(_bank(model).grad.clone())
    return out


def _compare(make, steps, narrow_reference):
    split = _grads(make(), steps)
    narrow_reference()
    reference = _grads(make(), steps)
    for a, b in zip(split, reference):
        assert a.abs().sum() > 0
        assert torch.equal(a, b)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_accumulation_and_reuse_across_forwards(train, narrow_reference):
    def two_forwards_one_backward(model):
        (_loss(model, 0) + _loss(model, 1)).backward()

    def backward_each(model):
        _loss(model, 2).backward()
        _loss(model, 3).backward()

    def step_then_backward(model):
        with torch.no_grad():
            _bank(model).add_(0.01)  # an in-place update, as an optimizer step does
        _bank(model).grad = None
        _loss(model, 4).backward()

    def advance_then_backward(model):
        model.base_model.next_period()
        _bank(model).grad = None
        _loss(model, 5).backward()

    def autocast_backward(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, 6)
        loss.backward()

    def make():
        return _model().train(train)

    steps = [two_forwards_one_backward, backward_each, step_then_backward, advance_then_backward, autocast_backward]
    _compare(make, steps, narrow_reference)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant, narrow_reference):
    def make():
        model = _model()
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        return model

    def backward(model):
        _loss(model, 0).backward()

    def forward_twice(model):
        (_loss(model, 1) + _loss(model, 2)).backward()

    _compare(make, [backward, forward_twice], narrow_reference)


def test_no_grad_forward_and_copies():
    model = _model()
    with torch.no_grad():
        plain = _loss(model)
    loss = _loss(model)
    torch.testing.assert_close(plain, loss.detach())
    clone = copy.deepcopy(model)  # the cached split outputs are not leaves: never copied
    assert torch.equal(_loss(clone), loss)
