"""The front's verdict: for every LoRA point, a TraDy-family point that answers it.

A point answers a LoRA point when its measured step memory is at most ``max_ratio`` (0.5) times
LoRA's and its metric is at least as good within one std (`aggregate.verdict`: a win or a tie; a
point that diverged for some seed never answers). Of the points that answer, the cheapest is named.
Where none does, the verdict says how close the front came: the best point within the memory
bound, and the cheapest point at any memory whose metric is as good.
"""

from __future__ import annotations

from dataclasses import dataclass

from .aggregate import summarize, verdict
from .front import is_lora
from .methods import base_name

#: The memory bound of an answer: at most this fraction of the LoRA point's step memory.
MAX_RATIO = 0.5


@dataclass
class Answer:
    """The verdict on one LoRA point (keys are ``(task, method, budget)``).

    Attributes:
        lora: the LoRA point.
        by: the cheapest TraDy-family point that answers it, or None.
        ratio: ``by``'s step memory over the LoRA point's.
        best_within: when none answers, the best point within the memory bound (None: no point
            is that cheap).
        cheapest_match: when none answers, the cheapest point at any memory whose metric is as
            good (None: no point's is).
    """

    lora: tuple
    by: tuple | None = None
    ratio: float | None = None
    best_within: tuple | None = None
    cheapest_match: tuple | None = None


def as_good(point: dict, lora: dict) -> bool:
    """Whether a point's metric is at least as good as the LoRA point's within one std (each a
    `summarize` entry); a point that diverged for some seed never is."""
    flags = (point["diverged"] > 0, lora["diverged"] > 0)
    higher = lora["metric"] == "accuracy"
    return not flags[0] and verdict(point["mean_std"], lora["mean_std"], higher, flags) != "loss"


def answer(lora: tuple, ours: list[tuple], summary: dict, mem: dict, max_ratio: float = MAX_RATIO) -> Answer:
    """The verdict on the LoRA point ``lora`` from the points ``ours`` (sorted by step memory ``mem``)."""
    within = [k for k in ours if mem[k] <= max_ratio * mem[lora]]
    answering = [k for k in within if as_good(summary[k], summary[lora])]
    if answering:
        return Answer(lora, answering[0], mem[answering[0]] / mem[lora])
    sign = 1 if summary[lora]["metric"] == "accuracy" else -1
    healthy = [k for k in within if not summary[k]["diverged"]]
    best = max(healthy, key=lambda k: sign * summary[k]["mean_std"][0], default=None)
    match = next((k for k in ours if as_good(summary[k], summary[lora])), None)
    return Answer(lora, best_within=best, cheapest_match=match)


def answer_lora_points(
    records: list[dict], memory: list[dict], family: tuple[str, ...], max_ratio: float = MAX_RATIO
) -> dict[str, list[Answer]]:
    """Per task, the verdict on each of its LoRA points (cheapest first), answered by points of the
    strategies in ``family``, with or without checkpointing or another bank share (memory rows give each point's
    ``step_total_bytes``)."""
    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r["step_total_bytes"] for r in memory}
    out: dict[str, list[Answer]] = {}
    for task in dict.fromkeys(k[0] for k in summary):
        keys = sorted((k for k in summary if k[0] == task and k in mem), key=lambda k: mem[k])
        ours = [k for k in keys if base_name(k[1]) in family]
        out[task] = [answer(k, ours, summary, mem, max_ratio) for k in keys if is_lora(k[1])]
    return out
