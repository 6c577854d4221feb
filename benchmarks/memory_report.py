"""Measured memory of one training step: TraDy vs peft LoRA vs full fine-tuning.

Writes ``docs/memory/<case>.png`` and ``docs/memory/results.json`` and prints the tables. Cases:

* ``mbv2``: MobileNetV2-w0.35, 128x128, batch 32, the paper's smallest budget (27,946 units),
  with the analytic floor of the TraDy selection (its channels' inputs + 1 bit per ReLU6 element);
* ``bert``: a BERT-style encoder (4 layers, hidden 256), sequence 128, batch 8;
* ``llama``: a Llama-style decoder (4 layers, hidden 256), sequence 128, batch 8.

Run: ``python benchmarks/memory_report.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_models import bert_like, llama_like, mobilenet_v2_w035  # noqa: E402

import trady_peft  # noqa: E402
from trady_peft.report import analytic_floor, compare_memory  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "memory"


def text_batch(batch: int, seq: int, causal: bool) -> dict:
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids if causal else torch.zeros(batch, dtype=torch.long)}


def run_mbv2() -> dict:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    config = trady_peft.TraDyConfig(memory_budget=27_946, modules_to_save=["classifier"])
    report = compare_memory(
        lambda: mobilenet_v2_w035(num_classes=10),
        x,
        config,
        description="MobileNetV2-w0.35, 128x128, batch 32, budget 27,946 units (paper's smallest), AdamW",
    )
    floor = analytic_floor(report.trady_model, x)
    trady = report.row("TraDy").memory.saved_activations
    report.extra["analytic floor of the selection"] = (
        f"{floor['total']:,} B = {floor['selected_activations']:,} B selected inputs + {floor['relu_masks']:,} B "
        f"ReLU6 masks; measured / floor = {trady / floor['total']:.3f}"
    )
    return {"report": report, "floor": floor}


def run_text(name: str) -> dict:
    causal = name == "llama"
    build = llama_like if causal else bert_like
    batch = text_batch(8, 128, causal)
    config = trady_peft.TraDyConfig(
        memory_budget=200_000,
        modules_to_save=None if causal else ["classifier"],
    )
    title = "Llama-style decoder" if causal else "BERT-style encoder"
    report = compare_memory(
        build, batch, config, description=f"{title} (4 layers, hidden 256), seq 128, batch 8, budget 200,000 units"
    )
    groups = report.row("TraDy").saved_by_group
    total = report.row("TraDy").memory.saved_activations
    fixed = sum(groups.get(g, 0) for g in ("attention", "normalization", "activations"))
    report.extra["TraDy's remaining saved activations"] = (
        f"{fixed / total:.0%} are the attention, normalization and GELU/SiLU path that gradients must cross "
        "whatever channels are chosen"
    )
    return {"report": report, "fixed_share": fixed / total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="mbv2,bert,llama")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for case in args.cases.split(","):
        result = run_mbv2() if case == "mbv2" else run_text(case)
        report = result["report"]
        print(report.table(), "\n")
        report.plot(str(out / f"{case}.png"))
        results[case] = {
            "rows": {
                r.method: {
                    "saved_activations": r.memory.saved_activations,
                    "trainable_parameters": r.memory.trainable_parameters,
                    "gradients": r.memory.gradients,
                    "optimizer_state": r.memory.optimizer_state,
                    "saved_by_group": r.saved_by_group,
                }
                for r in report.rows
            },
            **{k: v for k, v in result.items() if k != "report"},
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out}/results.json and one PNG per case")
    return results


if __name__ == "__main__":
    main()
