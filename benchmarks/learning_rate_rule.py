"""How far `trady_peft.recommended_learning_rate`'s rule lies from the best rate of each sweep of
the accuracy-memory front (docs/benchmarks/full/front/front.json, written by `make bench`; pass
docs/benchmarks/front/front.json for the quick front).

Prints one markdown row per TraDy and MeDyate point: the bank's values (its measured bytes / 16,
fp32 parameter + gradient + AdamW's two moments), the rule's rate, the best rate of the sweep, their
ratio, and every rate tried with its held-out metric (seed 0).

    python benchmarks/learning_rate_rule.py [path/to/front.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trady_bench.aggregate import metric_name

from trady_peft.memory.budget import bytes_per_trained_value
from trady_peft.recommend import learning_rate_for

FRONT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "full" / "front" / "front.json"
BANK_BYTES_PER_VALUE = bytes_per_trained_value(8)  # fp32 parameter, gradient, AdamW's exp_avg and exp_avg_sq


def rows(front: dict) -> list[tuple]:
    """(task, method, budget MiB, bank values, rule, best, ratio, tried) for every priced point."""
    found = []
    for task, result in front["tasks"].items():
        kind = "causal_lm" if metric_name(result["sweep_records"][0]) == "perplexity" else "classifier"  # SmolLM2
        memory = {(m["method"], m["budget_bytes"]): m for m in result["memory"]}
        for sweep in result["sweep"]:
            row = memory.get((sweep["method"], sweep["budget_bytes"]))
            if row is None or "adapter_bank_bytes" not in row:
                continue  # LoRA, head-only, full fine-tuning: no bank
            values = row["adapter_bank_bytes"] // BANK_BYTES_PER_VALUE
            rule, best = learning_rate_for(values, kind), sweep["lr"]
            tried = sorted(sweep["tried"].items(), key=lambda kv: float(kv[0]))
            found.append(
                (
                    task,
                    sweep["method"],
                    sweep["budget_bytes"] / 2**20,
                    values,
                    rule,
                    best,
                    max(rule / best, best / rule),
                    tried,
                )
            )
    return found


def main(path: str | None = None) -> None:
    found = rows(json.loads(Path(path or FRONT).read_text()))
    print("| task | strategy | budget | bank values | rule | best | ratio | rates tried (metric, seed 0) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for task, method, mib, values, rule, best, ratio, tried in found:
        rates = ", ".join(f"{float(lr):.0e}: {metric:.4g}" for lr, metric in tried)
        print(f"| {task} | {method} | {mib:.1f} MiB | {values:,} | {rule:.1e} | {best:.0e} | {ratio:.1f} | {rates} |")
    ratios = sorted(r[6] for r in found)
    print(f"\n{len(found)} points; ratio rule/best: median {ratios[len(ratios) // 2]:.1f}, largest {ratios[-1]:.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
