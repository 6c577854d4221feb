"""From per-seed records to comparisons: mean ± std over seeds, the win/tie/loss rule, divergence,
and the rows worth their memory."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .methods import order_of

#: A language-model run diverged if its held-out perplexity ends this many times above the
#: untrained model's (or anything became non-finite).
DIVERGENCE_FACTOR = 10.0

#: Strategies that are not memory-feasible (docs/strategies.md): their scoring computes the dense
#: gradient of every candidate channel, which no budget bounds. Compared, never recommended.
ORACLES = ("d-det-rgn", "s-det-rgn")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def verdict(
    a: tuple[float, float],
    b: tuple[float, float],
    higher_is_better: bool = True,
    diverged: tuple[bool, bool] = (False, False),
) -> str:
    """``"win"``, ``"tie"`` or ``"loss"`` of result ``a`` against ``b`` (each ``(mean, std)``): a
    difference within one standard deviation (the larger of the two) is a tie. A row that diverged
    for some seed (``diverged``, for ``a`` and ``b``) loses to one that did not, whatever its std;
    two such rows tie."""
    if diverged[0] or diverged[1]:
        return "tie" if diverged[0] and diverged[1] else ("loss" if diverged[0] else "win")
    diff = a[0] - b[0]
    if abs(diff) <= max(a[1], b[1]):
        return "tie"
    return "win" if (diff > 0) == higher_is_better else "loss"


def metric_name(record: dict) -> str:
    """The metric a record holds: ``perplexity`` (lower is better) or ``accuracy``."""
    return "perplexity" if "perplexity" in record else "accuracy"


def summarize(records: list[dict]) -> dict:
    """(task, method, budget) -> mean/std of the metric over seeds, with the task's metric name."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["budget_bytes"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        metric = metric_name(rows[0])
        values = [r[metric] for r in rows]
        diverged = sum(bool(r.get("diverged")) for r in rows)
        out[key] = {"metric": metric, "mean_std": mean_std(values), "seeds": len(values), "diverged": diverged}
    return out


def diverged(record: dict, untrained: float | None) -> bool:
    """Whether a run diverged: a non-finite loss or metric, or (perplexity) `DIVERGENCE_FACTOR` times
    the untrained model's."""
    value = record.get("perplexity", record.get("accuracy"))
    if not all(math.isfinite(x) for x in (record["final_train_loss"], value)):
        return True
    return "perplexity" in record and untrained is not None and value > DIVERGENCE_FACTOR * untrained


def picks(records: list[dict], memory: list[dict]) -> dict[str, list[tuple]]:
    """Per task, the rows worth their memory: from the row with the least measured step memory up,
    each next pick is the cheapest row that beats the previous pick beyond one std (`verdict`).
    Rows that diverged for some seed and the Det-RGN strategies (`ORACLES`: their scoring is not in the
    measured step) are never picks."""
    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r["step_total_bytes"] for r in memory}
    out: dict[str, list[tuple]] = {}
    for task in dict.fromkeys(k[0] for k in summary):
        rows = [k for k in summary if k[0] == task and k in mem and not summary[k]["diverged"] and k[1] not in ORACLES]
        rows.sort(key=lambda k: (mem[k], order_of(k[1])))
        ladder: list[tuple] = []
        for key in rows:
            s = summary[key]
            higher = s["metric"] == "accuracy"
            if not ladder or verdict(s["mean_std"], summary[ladder[-1]]["mean_std"], higher) == "win":
                ladder.append(key)
        if ladder:
            out[task] = ladder
    return out
