"""benchmarks/defaults_on_front.py: the verdict on a front's LoRA points for the default configuration,
from synthetic records (the training itself is the bench's `run_one`, covered by its own tests)."""

from __future__ import annotations

import defaults_on_front  # benchmarks/ is on pytest's pythonpath

MIB = 2**20


def record(method: str, seed: int, accuracy: float, lr: float = 1e-3, budget=None) -> dict:
    return {"task": "text", "method": method, "budget_bytes": budget, "seed": seed, "lr": lr, "accuracy": accuracy}


def memory(method: str, step_mib: float, budget=None, **extra) -> dict:
    return {"task": "text", "method": method, "budget_bytes": budget, "step_total_bytes": int(step_mib * MIB), **extra}


def front() -> dict:
    lora = [
        *(record("lora-r1", s, a) for s, a in ((0, 0.74), (1, 0.75), (2, 0.76))),  # 0.75 +- 0.01
        *(record("lora-r16", s, a) for s, a in ((0, 0.79), (1, 0.80), (2, 0.81))),  # 0.80: beyond one std
        *(record("lora-r8-gc", s, a) for s, a in ((0, 0.74), (1, 0.75), (2, 0.76))),
    ]
    rows = [memory("lora-r1", 100), memory("lora-r16", 110), memory("lora-r8-gc", 30)]
    return {"tasks": {"text": {"seeds": [0, 1, 2], "records": lora, "memory": rows}}}


def result(step_mib: float, gc_step_mib: float | None) -> dict:
    budget, rate = 10 * MIB, 3e-3
    records = [record("auto", s, a, rate, budget) for s, a in ((0, 0.745), (1, 0.75), (2, 0.755))]
    records += [record("auto", 0, 0.70, rate / 3, budget), record("auto", 0, 0.60, rate * 3, budget)]
    bank = {"adapter_bank_bytes": 16 * 300_000}
    rows = [memory("auto", step_mib, budget, **bank)]
    if gc_step_mib is not None:
        rows.append(memory("auto-gc", gc_step_mib, budget, **bank))
    return {"budget_bytes": budget, "strategy": "trady", "lr": rate, "records": records, "memory": rows}


def test_the_default_answers_the_lora_points_within_half_their_memory_and_one_std():
    row = defaults_on_front.task_row("text", front()["tasks"]["text"], result(step_mib=40, gc_step_mib=12))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "10.0 MiB (300,000)"
    assert cells[2].startswith("trady, 3.0e-03 (seed 0: 1.0e-03: 0.7, 3.0e-03: 0.745, 9.0e-03: 0.6)")
    assert cells[3] == "40.0 MiB (12.0 MiB)" and cells[4] == "accuracy 0.75 ± 0.005"
    # The cheapest answering step names each: r=8-gc only with checkpointing (12 <= 15 MiB); r=16 is better.
    assert cells[5] == (
        "lora-r8-gc (0.75 ± 0.01) at 0.40x with checkpointing, lora-r1 (0.75 ± 0.01) at 0.12x with checkpointing"
    )
    assert cells[6] == "lora-r16 (0.8 ± 0.01)"


def test_without_a_checkpointed_step_a_point_over_half_the_memory_is_not_answered():
    row = defaults_on_front.task_row("text", front()["tasks"]["text"], result(step_mib=60, gc_step_mib=None))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "60.0 MiB" and cells[5] == "none"  # 0.6x of LoRA r=1's step
    assert cells[6] == "lora-r8-gc (0.75 ± 0.01), lora-r1 (0.75 ± 0.01), lora-r16 (0.8 ± 0.01)"
