"""Det-RGN's channel scoring: chunk by chunk, without a dense weight gradient, equal to the dense
scores (`tests.references.dense_gradient_norms`) and holding no more than a training step."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from scoring_memory import KINDS, det_rgn_model, measure, scoring_batches  # benchmarks/, on pytest's pythonpath

import trady_peft
from tests.references import SavedBytesPeak, dense_gradient_norms
from tests.tiny_models import tiny_cnn
from trady_peft.selection.draws import PricedLayer
from trady_peft.selection.statistics import per_layer_chunks, scoring_chunks


@pytest.mark.parametrize("kind", list(KINDS))
def test_scores_equal_the_dense_gradient_norms_over_several_chunks(kind):
    model = det_rgn_model(kind, torch.float64)
    tuner, batches = model.base_model, scoring_batches(kind, 3, torch.float64)
    tuner.probe(batches[0])
    torch.manual_seed(0)  # the encoder trains with dropout: both see the same masks
    rng = torch.get_rng_state()
    with SavedBytesPeak(tuner.model) as counter:
        scores = tuner.score_channels(batches)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random streams did not move
    assert counter.passes % len(batches) == 0 and counter.passes // len(batches) > 1  # several chunks
    assert all(p.grad is None for p in model.parameters())
    assert tuner.trady_bank["default"].weight.requires_grad
    assert not any(m.base_layer.weight.requires_grad for _, m in tuner.trady_layers("default"))

    torch.manual_seed(0)
    expected = dense_gradient_norms(model, batches)
    assert scores.keys() == expected.keys()
    for name, norms in scores.items():
        assert norms.dtype == torch.float64 and norms.shape == expected[name].shape
        torch.testing.assert_close(norms, expected[name], rtol=1e-9, atol=1e-12 * float(expected[name].max()))
    assert tuner.selection_summary()["selected_channels"] > 0  # and the period was drawn from them


@pytest.mark.parametrize("kind", list(KINDS))
def test_scoring_holds_less_than_a_training_step_and_than_the_dense_scoring(kind):
    figures = measure(kind, batches=2)
    assert figures["chunks"] > 1
    assert figures["scoring"] <= figures["step"] < figures["dense"], figures


def test_batch_norm_statistics_move_as_in_one_pass_over_the_batches():
    batches = scoring_batches("cnn", 2)
    model = get_peft_model(tiny_cnn().train(), trady_peft.TraDyConfig(memory_budget="16KiB", strategy="d-det-rgn"))
    reference = get_peft_model(tiny_cnn().train(), trady_peft.TraDyConfig(memory_budget="16KiB", strategy="d-det-rgn"))
    with SavedBytesPeak(model.base_model.model) as counter:
        model.base_model.score_channels(batches)
    assert counter.passes > len(batches)  # several chunks
    reference.base_model.probe(batches[0])
    dense_gradient_norms(reference, batches)
    for (name, got), (_, want) in zip(
        model.base_model.model.named_buffers(), reference.base_model.model.named_buffers()
    ):
        if "running" in name or "num_batches" in name:
            assert torch.equal(got, want), name


def test_chunks_cover_every_channel_once_in_order_within_the_limits():
    layers = [PricedLayer("a", 7, (3, 40)), PricedLayer("b", 5, (10, 8)), PricedLayer("c", 2, (100, 1))]
    limits = (30, 100)
    chunks = scoring_chunks(layers, limits)
    seen = [(n, c) for chunk in chunks for n, channels in chunk.items() for c in channels]
    assert seen == [(p.name, c) for p in layers for c in range(p.in_channels)]
    by_name = {p.name: p for p in layers}
    for chunk in chunks:
        spent = [sum(by_name[n].costs[i] * len(r) for n, r in chunk.items()) for i in range(2)]
        alone = sum(len(r) for r in chunk.values()) == 1
        assert alone or all(s <= limit for s, limit in zip(spent, limits)), chunk
    for first, second in zip(chunks, chunks[1:]):  # a chunk closes only when the next channel does not fit
        n, r = next(iter(second.items()))
        spent = [sum(by_name[m].costs[i] * len(q) for m, q in first.items()) + by_name[n].costs[i] for i in range(2)]
        assert any(s > limit for s, limit in zip(spent, limits))
    assert per_layer_chunks({"a": (5, 2), "b": (3, 3)}) == [
        {"a": range(0, 2), "b": range(0, 3)},
        {"a": range(2, 4)},
        {"a": range(4, 5)},
    ]


def test_scoring_with_channels_per_layer_takes_a_draws_count_per_chunk():
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=3, strategy="d-full-random"))
    batches = scoring_batches("cnn", 2)
    tuner = model.base_model
    with SavedBytesPeak(tuner.model) as counter:
        scores = tuner.score_channels(batches)
    widest = max(m.geometry.in_channels for _, m in tuner.trady_layers("default"))
    assert counter.passes == len(batches) * -(-widest // 3)
    expected = dense_gradient_norms(model, batches)
    for name, norms in scores.items():
        torch.testing.assert_close(norms, expected[name], rtol=1e-5, atol=1e-7)
