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
from trady_peft.layer import TraDyLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import Classifier  # noqa: E402


def saved_bytes_by_layer(model, root, batch) -> dict[str, int]:
    """Bytes autograd packs while each TraDy layer of ``root`` runs, one training step."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    names = {m: n for n, m in root.named_modules() if isinstance(m, TraDyLayer)}
    current: list[str] = []
    seen: set[int] = set()
    saved: dict[str, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current and ptr not in resident and ptr not in seen:
            seen.add(ptr)
            saved[current[-1]] = saved.get(current[-1], 0) + t.untyped_storage().nbytes()
        return t

    def enter(module, args):
        current.append(names[module])

    def leave(module, args, output):
        current.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch)["loss"]
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    return saved


def check(budget: str, size: int, batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = get_peft_model(
        Classifier(), trady_peft.TraDyConfig(memory_budget=budget, modules_to_save=["_fc"], seed=seed)
    )
    model.train()
    batch = {"pixel_values": torch.randn(batch_size, 3, size, size), "labels": torch.randint(0, 10, (batch_size,))}
    tuner = model.base_model
    tuner.probe(batch)  # what the first training forward does: probe the shapes, draw the channels
    saved = saved_bytes_by_layer(model, tuner.model, batch)
    priced = {}
    for name, layer in tuner.model.named_modules():
        if isinstance(layer, TraDyLayer) and layer.current_delta_installed("default"):
            cost = tuner.layer_costs[name]
            priced[name] = (
                cost.activations * cost.batch_size * cost.activation_bytes * layer.trady_idx["default"].numel()
            )
    total_priced, total_saved = sum(priced.values()), sum(saved.get(n, 0) for n in priced)
    unpriced = sorted(set(saved) - set(priced))
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
