"""An exception or a KeyboardInterrupt anywhere in forward or backward leaves the adapter usable."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn


def adapter():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=400, modules_to_save=["classifier"]))
    model.train()
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def step(model, optimizer, size: int = 4) -> None:
    model(pixel_values=torch.randn(size, 3, 16, 16), labels=torch.zeros(size, dtype=torch.long))["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()


def interrupt(error: BaseException):
    def hook(module, args):
        raise error

    return hook


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "exception"])
def test_an_interrupted_forward_leaves_the_adapter_usable(error):
    model, optimizer = adapter()
    step(model, optimizer)
    tuner = model.base_model
    handle = tuner.model.dw.register_forward_pre_hook(interrupt(error))  # inside the model's forward
    with pytest.raises(type(error)):
        step(model, optimizer, size=8)  # a larger batch: the forward also reprices
    handle.remove()
    assert not tuner.in_forward
    assert trady_peft.next_period(model, optimizer) == 1
    step(model, optimizer)
    assert trady_peft.next_period(model, optimizer) == 2


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "exception"])
def test_an_interrupted_backward_leaves_the_adapter_usable(error):
    model, optimizer = adapter()
    step(model, optimizer)
    loss = model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.zeros(4, dtype=torch.long))["loss"]

    def fail(grad):
        raise error

    loss.register_hook(fail)
    with pytest.raises(type(error)):
        loss.backward()
    optimizer.zero_grad()
    assert trady_peft.next_period(model, optimizer) == 1
    step(model, optimizer)


def test_next_period_inside_a_forward_is_still_refused():
    model, optimizer = adapter()
    step(model, optimizer)
    calls = []

    def inside(module, args):
        with pytest.raises(RuntimeError, match="inside a forward or backward pass"):
            trady_peft.next_period(model, optimizer)
        calls.append(1)

    model.base_model.model.pw.register_forward_pre_hook(inside)
    step(model, optimizer)
    assert calls
