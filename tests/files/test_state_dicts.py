"""A state dict is the whole adapter: a checkpoint never changes the model.

``model.state_dict()`` -> ``load_state_dict()``, accelerate's ``save_state``/``load_state`` and
``save_pretrained``/``from_pretrained`` each give a freshly wrapped model the outputs and the
next draws of the model the checkpoint was taken from, at any point of a run (right after
``get_peft_model``, mid-period, after several periods, with several adapters), for every strategy,
on a CNN and a decoder; the loaded model's state dict equals the saved one (keys, shapes,
values). A dict that cannot say where the adapter stands is refused before anything is loaded.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama

STRATEGIES = ["trady", "s-top-k-random", "d-full-random", "s-full-random", "d-det-rgn", "s-det-rgn", "medyate"]
MECHANISMS = ["state_dict", "accelerate", "save_pretrained"]


def cnn_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1])}


def llama_batch(seed: int) -> dict:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


MODELS = {
    "cnn": (tiny_cnn, cnn_batch, {"modules_to_save": ["classifier"]}),
    "llama": (tiny_llama, llama_batch, {}),
}


@pytest.fixture(autouse=True)
def quiet(caplog):
    """The tiny models have no importance table and small budgets: TraDy says so, which is not tested here."""
    caplog.set_level(logging.ERROR, logger="trady_peft")


def make(model_name: str, strategy: str, **overrides):
    factory, batch, extra = MODELS[model_name]
    config = trady_peft.TraDyConfig(strategy=strategy, memory_budget=400, gradient_batches=2, **{**extra, **overrides})
    return get_peft_model(factory(), config)


def optimizer_of(model) -> torch.optim.Optimizer:
    banks = [p for n, p in model.named_parameters() if ".trady_bank." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".trady_bank." not in n]
    return torch.optim.AdamW(banks + others, lr=1e-2)


def train(model, optimizer, model_name: str, periods: int, mid: bool, adapter: str | None = None) -> list[dict]:
    """``periods`` whole periods of two steps, then (``mid``) one step into the next period."""
    batches = [MODELS[model_name][1](i) for i in range(2)]
    model.train()
    for period in range(periods + int(mid)):
        trady_peft.next_period(model, optimizer, batches=batches, period=period, adapter=adapter)
        for batch in batches[: 1 if period == periods else 2]:
            model(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
    return batches


def logits(model, model_name: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**MODELS[model_name][1](99))["logits"]
    model.train()
    return out


def load_into_fresh(mechanism: str, source, optimizer, model_name: str, fresh_model, tmp_path):
    """``fresh_model()`` (a newly wrapped model) loaded from ``source`` by ``mechanism``; its optimizer."""
    if mechanism == "save_pretrained":
        source.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(MODELS[model_name][0](), tmp_path / "adapter", is_trainable=True)
        for name in source.peft_config:
            if name != "default":
                loaded.load_adapter(tmp_path / "adapter" / name, adapter_name=name, is_trainable=True)
        loaded.set_adapter(source.active_adapter)
        return loaded, optimizer_of(loaded)
    fresh = fresh_model()
    fresh_optimizer = optimizer_of(fresh)
    if mechanism == "state_dict":
        fresh.load_state_dict(source.state_dict())
        fresh.set_adapter(source.active_adapter)  # which adapter is active is not state
        return fresh, fresh_optimizer
    source_accelerator = Accelerator(cpu=True)
    source, optimizer = source_accelerator.prepare(source, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source_accelerator.save_state(tmp_path / "state")
    accelerator = Accelerator(cpu=True)
    fresh, fresh_optimizer = accelerator.prepare(fresh, fresh_optimizer)
    accelerator.load_state(tmp_path / "state")
    fresh.set_adapter(source.active_adapter)
    return fresh, fresh_optimizer


def assert_same_state_dict(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def selection(model, adapter: str = "default") -> dict:
    state = trady_peft.find_tuner(model).selection_states[adapter]
    return {"period": state.period, **{n: c.tolist() for n, c in sorted((state.selection or {}).items())}}


def assert_same_adapter(loaded, source, model_name: str, optimizers, batches, adapters=("default",)) -> None:
    """Same state dict, same outputs (each adapter), same next period's draw (each adapter)."""
    assert_same_state_dict(loaded.state_dict(), source.state_dict())
    active = source.active_adapter
    for adapter in adapters:
        source.set_adapter(adapter)
        loaded.set_adapter(adapter)
        torch.testing.assert_close(logits(loaded, model_name), logits(source, model_name), rtol=1e-5, atol=1e-6)
        assert selection(loaded, adapter) == selection(source, adapter)
    for adapter in adapters:
        for model, optimizer in zip((source, loaded), optimizers):
            trady_peft.next_period(model, optimizer, batches=batches, adapter=adapter)
        assert selection(loaded, adapter) == selection(source, adapter)
        assert selection(loaded, adapter)["period"] > 0
    source.set_adapter(active)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_checkpoint_after_several_periods_resumes_the_same_model(model_name, strategy, mechanism, tmp_path):
    source = make(model_name, strategy)
    optimizer = optimizer_of(source)
    batches = train(source, optimizer, model_name, periods=2, mid=True)
    loaded, fresh_optimizer = load_into_fresh(
        mechanism, source, optimizer, model_name, lambda: make(model_name, strategy), tmp_path
    )
    assert_same_adapter(loaded, source, model_name, (optimizer, fresh_optimizer), batches)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("point", ["fresh", "mid-first-period"])
@pytest.mark.parametrize("strategy", ["trady", "d-det-rgn", "medyate"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_checkpoint_at_the_start_resumes_the_same_model(model_name, strategy, point, mechanism, tmp_path):
    source = make(model_name, strategy)
    optimizer = optimizer_of(source)
    if point == "fresh":
        batches = [MODELS[model_name][1](i) for i in range(2)]
    else:
        batches = train(source, optimizer, model_name, periods=0, mid=True)
    loaded, fresh_optimizer = load_into_fresh(
        mechanism, source, optimizer, model_name, lambda: make(model_name, strategy), tmp_path
    )
    assert_same_adapter(loaded, source, model_name, (optimizer, fresh_optimizer), batches)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_checkpoint_with_several_adapters_resumes_each(model_name, mechanism, tmp_path):
    def two_adapters():
        model = make(model_name, "trady")
        model.add_adapter("other", trady_peft.TraDyConfig(memory_budget=300, strategy="medyate", seed=3))
        return model

    source = two_adapters()
    optimizer = optimizer_of(source)
    train(source, optimizer, model_name, periods=1, mid=True, adapter="default")
    source.set_adapter("other")
    batches = train(source, optimizer, model_name, periods=1, mid=True, adapter="other")
    loaded, fresh_optimizer = load_into_fresh(mechanism, source, optimizer, model_name, two_adapters, tmp_path)
    assert_same_adapter(
        loaded, source, model_name, (optimizer, fresh_optimizer), batches, adapters=("default", "other")
    )


def test_the_bank_carries_the_prefix_and_the_old_name_still_works():
    model = make("cnn", "d-full-random")
    tuner = model.base_model
    assert [n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n] == [
        "base_model.trady_bank.default.weight"
    ]
    with pytest.warns(DeprecationWarning, match="use TraDyModel.trady_bank"):
        assert tuner.channel_bank is tuner.trady_bank


def raw_state_dict(model) -> dict:
    """``model.state_dict()`` with the live stores and the whole bank instead of the folded form
    (what DeepSpeed's ZeRO-3 consolidated state dict holds, read parameter by parameter)."""
    raw = model.state_dict()
    for name, layer in model.base_model.trady_layers("default"):
        raw[f"base_model.model.{name}.trady_indices.default"] = layer.trady_indices["default"]
        raw[f"base_model.model.{name}.trady_values.default"] = layer.trady_values["default"]
    raw["base_model.trady_bank.default.weight"] = model.base_model.trady_bank["default"].weight.detach().clone()
    return raw


def test_a_raw_state_dict_with_the_old_bank_name_loads():
    """A dict holding the bank and the live stores (as DeepSpeed consolidates them), under the name
    trady-peft 0.1.0 gave the bank."""
    source = make("cnn", "d-full-random")
    optimizer = optimizer_of(source)
    batches = train(source, optimizer, "cnn", periods=1, mid=True)
    raw = raw_state_dict(source)
    raw["base_model.channel_bank.default.weight"] = raw.pop("base_model.trady_bank.default.weight")
    fresh = make("cnn", "d-full-random")
    fresh.load_state_dict(raw)
    assert_same_adapter(fresh, source, "cnn", (optimizer, optimizer_of(fresh)), batches)


def test_the_adapter_file_from_a_raw_state_dict_is_the_one_from_state_dict():
    from peft import get_peft_model_state_dict

    source = make("llama", "medyate")
    train(source, optimizer_of(source), "llama", periods=1, mid=True)
    raw = raw_state_dict(source)
    raw["base_model.trady_state.default"] = torch.zeros(0, dtype=torch.uint8)  # the buffer, as DeepSpeed reads it
    assert_same_state_dict(get_peft_model_state_dict(source, state_dict=raw), get_peft_model_state_dict(source))


def test_an_inference_load_keeps_the_selection_state_with_medyates_statistics(tmp_path):
    source = make("llama", "medyate")
    train(source, optimizer_of(source), "llama", periods=2, mid=True)
    source.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference mode
    assert not [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert_same_state_dict(loaded.state_dict(), source.state_dict())
    assert loaded.base_model.selection_states["default"].statistics.has_history


def test_empty_stores_a_saver_dropped_load_as_empty(tmp_path):
    """accelerate's save_state keeps one of the entries sharing a storage, and every empty tensor
    reports the same null storage: the other empty stores are missing from its checkpoint."""
    source = make("cnn", "d-full-random")
    batches = train(source, optimizer_of(source), "cnn", periods=1, mid=True)
    state = source.state_dict()
    empty = [k for k, v in state.items() if ".trady_" in k and not v.numel()]
    assert any(".trady_values." in k for k in empty)  # a layer this budget left out: empty stores
    for key in empty[1:]:
        del state[key]
    fresh = make("cnn", "d-full-random")
    train(fresh, optimizer_of(fresh), "cnn", periods=2, mid=True)  # non-empty stores to be replaced
    assert fresh.load_state_dict(state).missing_keys == []
    assert_same_adapter(fresh, source, "cnn", (optimizer_of(source), optimizer_of(fresh)), batches)


# ------------------------------------------------------------------------------ refusals
def test_stores_without_a_selection_state_are_refused_for_training_and_change_nothing():
    source = make("cnn", "d-full-random")
    train(source, optimizer_of(source), "cnn", periods=1, mid=False)
    old = source.state_dict()
    old["base_model.trady_state.default"] = torch.zeros(0, dtype=torch.uint8)  # model.state_dict() of 0.1.0
    fresh = make("cnn", "d-full-random")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(trady_peft.AdapterFileError, match=r"adapter 'default'.*no selection state|not its selection"):
        fresh.load_state_dict(old)
    assert_same_state_dict(fresh.state_dict(), before)
    config = trady_peft.TraDyConfig(memory_budget=400, modules_to_save=["classifier"], inference_mode=True)
    inference = get_peft_model(tiny_cnn(), config)
    inference.load_state_dict(old)  # for inference the stores are the whole adapter
    torch.testing.assert_close(logits(inference, "cnn"), logits(source, "cnn"), rtol=1e-5, atol=1e-6)


def test_a_raw_bank_without_a_selection_state_is_refused():
    source = make("cnn", "d-full-random")
    train(source, optimizer_of(source), "cnn", periods=1, mid=True)
    raw = raw_state_dict(source)
    raw["base_model.trady_state.default"] = torch.zeros(0, dtype=torch.uint8)
    with pytest.raises(trady_peft.AdapterFileError, match=r"raw bank .*no selection state naming the channels"):
        make("cnn", "d-full-random").load_state_dict(raw)


def test_a_selection_this_adapter_cannot_install_is_refused_and_changes_nothing():
    source = make("llama", "d-full-random")
    train(source, optimizer_of(source), "llama", periods=1, mid=True)
    smaller = lambda: get_peft_model(  # noqa: E731  a smaller budget: a smaller bank
        tiny_llama(), trady_peft.TraDyConfig(memory_budget=100, strategy="d-full-random")
    )
    fresh = smaller()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(trady_peft.AdapterFileError, match=r"trains \d+ values, but this adapter's bank holds 100"):
        fresh.load_state_dict(source.state_dict())
    assert_same_state_dict(fresh.state_dict(), before)
    other_targets = get_peft_model(
        tiny_llama(),
        trady_peft.TraDyConfig(memory_budget=400, strategy="d-full-random", target_modules=["q_proj", "v_proj"]),
    )
    with pytest.raises(trady_peft.AdapterFileError, match=r"does not wrap"):  # stores of other layers
        other_targets.load_state_dict(source.state_dict(), strict=False)
    stores = (".trady_indices.", ".trady_values.")
    selection_only = {
        k: v
        for k, v in source.state_dict().items()
        if not any(s in k for s in stores) or any(t in k for t in ("q_proj", "v_proj"))
    }
    with pytest.raises(trady_peft.AdapterFileError, match=r"not TraDy layers of this adapter"):
        other_targets.load_state_dict(selection_only, strict=False)
