"""Does the budget charge what the selected channels really keep? EfficientNet-Lite0, measured.

Builds the quickstart's EfficientNet-Lite0 (ImageNet weights from the installed package, offline),
wraps it with ``TraDyConfig(memory_budget=...)``, runs one training step on a random batch and
compares, for every layer with drawn channels, the activation bytes the budget priced
(``LayerCost.activations x batch x element size x channels``) with the bytes autograd saved inside
that layer (``saved_tensors_hooks``: distinct storages, parameters and buffers excluded).

    PYTHONPATH=. python benchmarks/pricing_check.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import get_peft_model

import trady_peft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from offline_assets import Classifier  # noqa: E402


def priced_inputs(tuner: trady_peft.TraDyModel, adapter_name: str = "default") -> dict[str, int]:
    """Bytes of saved inputs the budget charges for the adapter's current selection, per layer: each
    layer's `trady_peft.memory.budget.LayerCost.saved_bytes` (one channel's input, at the largest batch probed) times
    its selected channels. Without a budget, the probe's measurement prices the layer."""
    state = tuner.selection_states[adapter_name]
    costs = {**tuner.layer_costs, **state.costs}
    return {n: costs[n].saved_bytes * c.numel() for n, c in (state.selection or {}).items() if c.numel()}


def saved_bytes_by_layer(model, batch) -> dict[str, int]:
    """Bytes autograd packs while each TraDy layer runs, one training step (`measure_training_step`)."""
    mem = trady_peft.measure_training_step(model, batch)
    return {n.removeprefix("base_model.model."): b for n, b in mem.saved_by_module.items() if b}


def check(budget: str, size: int, batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = get_peft_model(
        Classifier(), trady_peft.TraDyConfig(memory_budget=budget, modules_to_save=["_fc"], seed=seed)
    )
    model.train()
    batch = {"pixel_values": torch.randn(batch_size, 3, size, size), "labels": torch.randint(0, 10, (batch_size,))}
    tuner = model.base_model
    tuner.probe(batch)  # what the first training forward does: probe the shapes, draw the channels
    saved = saved_bytes_by_layer(model, batch)
    priced = priced_inputs(tuner)
    total_priced, total_saved = sum(priced.values()), sum(saved.get(n, 0) for n in priced)
    layers = {n for n, _ in tuner.trady_layers()}
    unpriced = sorted((set(saved) & layers) - set(priced))  # TraDy layers that kept inputs nobody paid for
    worst = max(priced, key=lambda n: saved.get(n, 0) / priced[n])
    print(
        f"{size}x{size}, batch {batch_size}, memory_budget={budget}: {len(priced)} layers drawn; "
        f"activations priced {total_priced / 1024:,.0f} KiB, measured {total_saved / 1024:,.0f} KiB "
        f"(x{total_saved / total_priced:.2f}); worst layer {worst}: "
        f"measured/priced = {saved.get(worst, 0) / priced[worst]:.2f}"
        + (f"; saved by undrawn layers: {unpriced}" if unpriced else "")
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for budget, size in (("2MiB", 32), ("8MiB", 64)):
        check(budget, size, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
