"""What a redraw does to the optimizer: re-targeted bank entries restart as under a fresh optimizer."""

from __future__ import annotations

import copy
import io
import warnings
from functools import partial

import pytest
import torch
from peft import get_peft_model

import trady_peft
import trady_peft.model
from tests.tiny_models import tiny_cnn
from trady_peft.core import optim
from trady_peft.core.optim import reset_optimizer_state

N = 40
RESETS = {6: [(0, 10), (20, 25)], 11: [(5, 15), (30, 40)]}  # step -> segments reset before it

OPTIMIZERS = {
    "adam": partial(torch.optim.Adam, lr=1e-2, foreach=False),
    "adam-foreach": partial(torch.optim.Adam, lr=1e-2, foreach=True),
    "adam-fused": partial(torch.optim.Adam, lr=1e-2, fused=True),
    "adam-l2-amsgrad-maximize": partial(torch.optim.Adam, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    "adamw": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    "adamw-foreach-betas": partial(torch.optim.AdamW, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, foreach=True),
    "sgd-momentum": partial(torch.optim.SGD, lr=1e-1, momentum=0.9, weight_decay=0.01),
    "sgd-dampening": partial(torch.optim.SGD, lr=1e-1, momentum=0.9, dampening=0.5),
    "sgd-dampening-foreach": partial(torch.optim.SGD, lr=1e-1, momentum=0.8, dampening=0.3, foreach=True),
    "sgd-nesterov": partial(torch.optim.SGD, lr=1e-1, momentum=0.9, nesterov=True),
}


def _grads(steps, n=N, seed=0):
    # always the same draw: a shorter one may differ in its tail (torch draws in blocks)
    return torch.randn(max(steps, 512), n, generator=torch.Generator().manual_seed(seed))


def _train(make, steps, resets, reset=True, grads=None, start=None, optimizer=None, param=None, first=0):
    """Steps a raw parameter; before step k in ``resets`` its segments are zeroed (and reset)."""
    grads = _grads(steps) if grads is None else grads
    if param is None:
        param = torch.nn.Parameter(
            torch.randn(N, generator=torch.Generator().manual_seed(1)) if start is None else start
        )
    optimizer = optimizer or make([param])
    for k in range(first, steps):
        if k in resets:
            with torch.no_grad():
                for a, b in resets[k]:
                    param[a:b].zero_()
            if reset:
                reset_optimizer_state(optimizer, param, resets[k])
            if reset == "zero-only":  # a plain reset: moments zeroed, no step correction
                optimizer.state[param].pop(optim._KEY, None)
        param.grad = grads[k] + 0.5 * param.detach()  # depends on the entry's own value only
        optimizer.step()
    return param.detach(), optimizer


def _births(steps, resets):
    birth = torch.zeros(N, dtype=torch.long)
    for k in sorted(resets):
        for a, b in resets[k]:
            birth[a:b] = k
    return birth


def _fresh(make, steps, birth_step, index):
    """A freshly created optimizer over the entries ``index``, from their reset on."""
    grads = _grads(steps)
    param = torch.nn.Parameter(torch.zeros(len(index)))
    optimizer = make([param])
    for k in range(birth_step, steps):
        param.grad = grads[k, index] + 0.5 * param.detach()
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_retargeted_entries_update_as_under_a_fresh_optimizer(name):
    make, steps = OPTIMIZERS[name], 16
    trained, _ = _train(make, steps, RESETS)
    birth = _births(steps, RESETS)
    for k in RESETS:
        index = torch.nonzero(birth == k).flatten()
        torch.testing.assert_close(trained[index], _fresh(make, steps, k, index), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_entries_that_keep_their_channel_are_untouched(name):
    make, steps = OPTIMIZERS[name], 16
    trained, _ = _train(make, steps, RESETS)
    plain, _ = _train(make, steps, RESETS, reset=False)
    kept = _births(steps, RESETS) == 0
    assert torch.equal(trained[kept], plain[kept])


def _first_update_ratio(reset):
    """|first update after a reset at step 300| / |a fresh Adam's first update|, on the reset entries."""
    steps, at = 301, 300
    trained, _ = _train(OPTIMIZERS["adam"], steps, {at: [(0, 20)]}, reset=reset)
    index = torch.arange(20)
    return (trained[index].abs() / _fresh(OPTIMIZERS["adam"], steps, at, index).abs()).mean().item()


def test_no_step_size_discrepancy_after_a_late_reset():
    # zeroed moments under the global step's bias correction: 0.1 * sqrt((1 - 0.999**301) / 0.001)
    assert _first_update_ratio(reset="zero-only") == pytest.approx(1.6124, rel=1e-3)
    assert _first_update_ratio(reset=True) == pytest.approx(1.0, rel=1e-5)


def test_sgd_dampening_needs_the_correction():
    make, steps = OPTIMIZERS["sgd-dampening"], 16
    trained, _ = _train(make, steps, RESETS)
    index = torch.arange(30, 40)
    fresh = _fresh(make, steps, 11, index)
    torch.testing.assert_close(trained[index], fresh, rtol=1e-5, atol=1e-7)
    zeroed_only, _ = _train(make, steps, RESETS, reset="zero-only")  # buf = (1 - dampening) * grad
    assert not torch.allclose(zeroed_only[index], fresh, rtol=1e-3)
    optimizer = _train(make, steps, RESETS)[1]
    assert optim._KEY not in optimizer.state[optimizer.param_groups[0]["params"][0]]  # one-shot


@pytest.mark.parametrize("name", ["adam", "adamw", "adam-fused", "sgd-dampening"])
def test_state_dict_round_trip_mid_period_keeps_the_correction(name):
    make, steps, cut = OPTIMIZERS[name], 16, 11  # saved right after the second reset, before its first step
    full, _ = _train(make, steps, RESETS)
    param, optimizer = _train(make, cut, RESETS)
    live = optimizer.param_groups[0]["params"][0]
    with torch.no_grad():
        for a, b in RESETS[cut]:
            live[a:b].zero_()
    reset_optimizer_state(optimizer, live, RESETS[cut])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = torch.nn.Parameter(live.detach().clone())
    again = make([restored])
    again.load_state_dict(torch.load(buffer, weights_only=True))  # casts every state tensor to fp32
    assert optim._KEY in again.state[restored]
    later = {k: v for k, v in RESETS.items() if k != cut}
    resumed, _ = _train(make, steps, later, optimizer=again, param=restored, first=cut)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)


def test_through_accelerated_optimizer():
    from accelerate import Accelerator

    make, steps = OPTIMIZERS["adamw"], 16
    accelerator = Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.randn(N, generator=torch.Generator().manual_seed(1)))
    wrapped = accelerator.prepare_optimizer(make([param]))
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    trained, _ = _train(make, steps, RESETS, optimizer=wrapped, param=param)
    expected, _ = _train(make, steps, RESETS)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)


def test_records_merge_and_survive_a_float_cast():
    state = {}
    big = 2**40 + 3  # beyond what fp32 (or bf16) holds exactly
    optim._add_records(state, [(0, 10), (10, 20), (30, big)], 5)
    assert optim._read(state) == [[0, 20, 5, 5], [30, big, 5, 5]]
    optim._add_records(state, [(15, 35)], 9)
    assert optim._read(state) == [[0, 15, 5, 5], [15, 35, 9, 9], [35, big, 5, 5]]
    state[optim._KEY] = state[optim._KEY].to(torch.bfloat16)  # what load_state_dict does
    assert optim._read(state) == [[0, 15, 5, 5], [15, 35, 9, 9], [35, big, 5, 5]]
    assert state[optim._KEY].dtype == torch.uint8 and state[optim._KEY].shape == (3, 32)


def test_records_are_dropped_once_bias_corrections_agree():
    _, optimizer = _train(OPTIMIZERS["adam-foreach"], 2, {1: [(0, 5)]})
    param = optimizer.param_groups[0]["params"][0]
    assert optim._KEY in optimizer.state[param]
    optimizer.param_groups[0]["betas"] = (0.1, 0.2)  # corrections converge within a few steps
    for _ in range(20):
        param.grad = torch.ones(N)
        optimizer.step()
    assert optim._KEY not in optimizer.state[optimizer.param_groups[0]["params"][0]]


def test_other_optimizers_warn_once_and_zero_their_state(monkeypatch):
    monkeypatch.setattr(optim, "_warned", set())
    _, optimizer = _train(partial(torch.optim.RMSprop, lr=1e-2, momentum=0.9), 3, {})
    param = optimizer.param_groups[0]["params"][0]
    with pytest.warns(UserWarning, match="RMSprop.*not step-corrected"):
        assert reset_optimizer_state(optimizer, param, [(0, 5)]) >= 2
    assert torch.all(optimizer.state[param]["square_avg"][:5] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reset_optimizer_state(optimizer, param, [(0, 5)])


def test_tiny_model_periods_match_a_fresh_optimizer(monkeypatch):
    """Over three periods of a real model, each period's re-targeted entries follow a fresh AdamW."""
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2))
    tuner = model.base_model
    bank = tuner.trady_bank["default"].weight
    make = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    optimizer = make([bank])
    changed = []
    real_reset = trady_peft.core.optim.reset_optimizer_state
    monkeypatch.setattr(
        trady_peft.periods.lifecycle,
        "reset_optimizer_state",
        lambda o, p, s: changed.append(list(s)) or real_reset(o, p, s),
    )
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(6)]
    for period in range(3):
        if period:
            tuner.next_period(optimizer=optimizer)
            assert changed[-1], "the draw re-targeted nothing"
            index = torch.cat([torch.arange(a, b) for a, b in changed[-1]])
            kept = torch.ones(bank.numel(), dtype=torch.bool)
            kept[index] = False
            plain_bank = torch.nn.Parameter(bank.detach().clone())  # the same state, no correction
            plain = make([plain_bank])
            plain_state = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the tensors
            plain_state["state"][0].pop(optim._KEY)
            plain.load_state_dict(plain_state)
            fresh_bank = torch.nn.Parameter(torch.zeros(len(index)))
            fresh = make([fresh_bank])
        for images, labels in batches:
            model(pixel_values=images, labels=labels)["loss"].backward()
            optimizer.step()
            if period:
                plain_bank.grad, fresh_bank.grad = bank.grad.clone(), bank.grad[index].clone()
                plain.step()
                fresh.step()
            optimizer.zero_grad()
        if period:
            torch.testing.assert_close(bank.detach()[index], fresh_bank.detach(), rtol=1e-5, atol=1e-8)
            assert torch.equal(bank.detach()[kept], plain_bank.detach()[kept])
            moved = fresh_bank.detach() != 0  # entries whose gradient is always zero do not move
            ratio = (plain_bank.detach()[index][moved].abs() / fresh_bank.detach()[moved].abs()).median()
            assert not 0.95 < ratio < 1.05, ratio  # without the correction: ~0.68x this early in training


def test_trainer_resumed_mid_period_keeps_correcting(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.references import folded_adapter
    from tests.tiny_models import ColourImages

    def make(output_dir):
        model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2))
        args = TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=3,
            per_device_train_batch_size=16,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=6,  # 4 steps an epoch: mid-way through period 1
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=ColourImages(64), callbacks=[trady_peft.TraDyCallback()]
        )
        return model, trainer

    full_model, full = make(tmp_path / "full")
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert any(optim._KEY in entry for entry in saved["state"].values())
    resumed_model, resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    for (name, (idx_a, val_a)), (_, (idx_b, val_b)) in zip(
        folded_adapter(full_model).items(), folded_adapter(resumed_model).items()
    ):
        assert torch.equal(idx_a, idx_b), name
        torch.testing.assert_close(val_a, val_b, rtol=1e-5, atol=1e-7)


def test_resample_keeps_parameter_identity_and_resets_only_retargeted_moments():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, modules_to_save=["classifier"]))
    bank = model.base_model.trady_bank["default"].weight
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    model(**batch)["loss"].backward()
    optimizer.step()
    layers = model.base_model.trady_layers("default")
    before = {n: (layer.trady_idx["default"].clone(), layer.trady_delta["default"].offset) for n, layer in layers}
    exp_avg = optimizer.state[bank]["exp_avg"]
    assert exp_avg.abs().sum() > 0
    model.base_model.next_period(optimizer=optimizer)
    assert model.base_model.trady_bank["default"].weight is bank
    assert [p for p in model.parameters() if p.requires_grad] == params
    assert torch.all(bank == 0)
    for name, layer in layers:
        view = layer.trady_delta["default"]
        segment = exp_avg[view.offset : view.offset + view.numel]
        unchanged = torch.equal(before[name][0], layer.trady_idx["default"]) and before[name][1] == view.offset
        assert (segment.abs().sum() > 0) == unchanged, name


def test_forget_optimizer_state_drops_only_state_of_another_shape():
    parameter = torch.nn.Parameter(torch.zeros(6))
    optimizer = torch.optim.AdamW([parameter], lr=1e-2)
    parameter.grad = torch.ones(6)
    optimizer.step()
    optim.reset_optimizer_state(optimizer, parameter, [(0, 2)])  # adds TraDy's records, of their own shape
    assert optim._KEY in optimizer.state[parameter]
    assert not optim.forget_optimizer_state(optimizer, parameter)
    with torch.no_grad():
        parameter.data = torch.zeros(4)
    assert optim.forget_optimizer_state(optimizer, parameter) and parameter not in optimizer.state
