"""Draw docs/figures/method.png: which channels TraDy trains, in which layers, and how the budget fills.

Left: one layer's weight W [out, in] and its input x [tokens, in]: the selected input channels are
columns of W and the matching columns of x, the only part of x kept for backward. Right: one real
draw on MobileNetV2-w0.35 (128x128, budget 27,946 units; no importance table for it, so every layer is a candidate):
per layer, the weights and activations of the selected channels, stacked to the budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_models import mobilenet_v2_w035  # noqa: E402

import trady_peft  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "method.png"


def main():
    fig, (ax_w, ax_b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    rng = np.random.default_rng(0)
    out_c, in_c, tokens = 8, 16, 6
    selected = sorted(rng.choice(in_c, 4, replace=False))
    w = np.full((out_c, in_c), 0.85)
    w[:, selected] = 0.25
    x = np.full((tokens, in_c), 0.85)
    x[:, selected] = 0.45
    canvas = np.ones((out_c + tokens + 1, in_c))
    canvas[:out_c] = w
    canvas[out_c + 1 :] = x
    ax_w.imshow(canvas, cmap="Blues_r", vmin=0, vmax=1)
    ax_w.set_xticks(selected)
    ax_w.set_xticklabels([str(c) for c in selected])
    ax_w.set_yticks([out_c / 2 - 0.5, out_c + 1 + tokens / 2 - 0.5])
    ax_w.set_yticklabels(["W  [out, in]", "x  [tokens, in]"])
    ax_w.set_xlabel("input channels (dark: trained this period)")
    ax_w.set_title("A channel = a column of W; backward keeps x[:, channels] only", fontsize=9)

    model = get_peft_model(mobilenet_v2_w035(num_classes=10), trady_peft.TraDyConfig(memory_budget=27_946))
    model(torch.zeros(1, 3, 128, 128))
    tuner = model.base_model
    names, weights, acts = [], [], []
    for name, layer in tuner.trady_layers("default"):
        k = layer.trady_delta["default"].count
        cost = tuner.layer_costs[name]
        names.append(name)
        weights.append(k * cost.weights)
        acts.append(k * cost.activations)
    idx = np.arange(len(names))
    ax_b.bar(idx, weights, label="weights of selected channels")
    ax_b.bar(idx, acts, bottom=weights, label="their input activations")
    ax_b.set_xlabel("layer (input to output)")
    ax_b.set_ylabel("memory units (values per sample)")
    total = sum(weights) + sum(acts)
    ax_b.set_title(
        f"One TraDy draw on MobileNetV2-w0.35: {total:,} of 27,946 units, "
        f"{sum(1 for a in acts if a)} of {len(names)} layers touched",
        fontsize=9,
    )
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
