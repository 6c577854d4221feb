"""The learning-rate sweep of the front: three learning rates per point on one seed, centred by a
rule (a strategy's by its budget, LoRA's by its rank), more beyond an edge the best lies at, and
the one each point then trains at."""

from __future__ import annotations

import math

from .aggregate import metric_name
from .front import family

#: The rates a sweep picks from: 1 and 3 times each power of ten (AdamW, cosine with warm-up).
LADDER = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 3))

#: The centre of a strategy's grid (TraDy, MeDyate): ``rate`` at a budget of ``budget`` bytes,
#: times ``(budget / point's budget) ** exponent`` (a smaller budget trains fewer channels, which
#: take a larger rate). Fitted to the quick front of SmolLM2 (best rates 1e-2, 3e-3 and 1e-3 at
#: 6.1, 24.6 and 123 MiB) and EfficientNet-Lite0 (1e-2 or 3e-3, 3e-3 and 1e-3 at 3.7, 14.6 and 73 MiB).
STRATEGY_CENTRE = {"rate": 3e-3, "budget": int(24.6 * 2**20), "exponent": 0.75}

#: The centre of LoRA's grid: ``rate`` at rank ``rank``, times ``rank / point's rank`` (alpha = 2 x
#: rank: a larger rank moves the weights further per step). SmolLM2's best rates: >= 3e-3 at r=1,
#: 1e-3 at r=8, <= 3e-4 at r=16.
LORA_CENTRE = {"rate": 1e-3, "rank": 8}

#: The fixed grids of the budget-free baselines, a factor 10 apart for the head (a fresh classifier
#: on the image and text tasks, the tied embedding on the LM).
FIXED_GRIDS = {"head": (1e-4, 1e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4)}


def snap(rate: float) -> float:
    """The rate of `LADDER` nearest to ``rate`` (in log scale)."""
    return min(LADDER, key=lambda r: abs(math.log(r / rate)))


def lr_centre(row_name: str, budget: int | None = None) -> float:
    """The rule's rate for a point (before snapping): a strategy's by its byte ``budget``, LoRA's by
    the rank in its row name (``lora-r16``; ``lora``: r=8)."""
    name = family(row_name).removesuffix("-gc")
    if name == "lora":
        rank = int(row_name.removeprefix("lora-r").partition("-")[0]) if row_name.startswith("lora-r") else 8
        return LORA_CENTRE["rate"] * LORA_CENTRE["rank"] / rank
    if budget is None:
        raise ValueError(f"lr_centre: the strategy point {row_name!r} needs its budget.")
    c = STRATEGY_CENTRE
    return c["rate"] * (c["budget"] / budget) ** c["exponent"]


def lr_grid(row_name: str, budget: int | None = None) -> tuple[float, ...]:
    """The three learning rates swept first for a point: the head's and full fine-tuning's fixed
    grids (`FIXED_GRIDS`), else the rule's rate (`lr_centre`) snapped to `LADDER` and its two
    neighbours there (a factor ~3 apart)."""
    name = family(row_name).removesuffix("-gc")
    if name in FIXED_GRIDS:
        return FIXED_GRIDS[name]
    i = LADDER.index(snap(lr_centre(row_name, budget)))
    return LADDER[max(i - 1, 0) : i + 2]


def beyond(best: dict, grid: tuple[float, ...] | None = None, steps: int | None = None) -> float | None:
    """The next rate to try for a point whose best rate (`best_lr`'s answer) lies at an edge of its
    sweep: the `LADDER` neighbour past that edge; None when it does not (or every run diverged, or
    the ladder ends, or ``steps`` rates past that side of ``grid``, the point's `lr_grid`, were
    tried already)."""
    if not best["at_edge"] or best["all_diverged"]:
        return None
    rates = sorted(float(r) for r in best["tried"])
    up = best["lr"] == rates[-1]
    if grid is not None and steps is not None:
        past = [r for r in rates if (r > max(grid) if up else r < min(grid))]
        if len(past) >= steps:
            return None
    i = LADDER.index(snap(best["lr"])) + (1 if up else -1)
    return LADDER[i] if 0 <= i < len(LADDER) else None


def best_lr(runs: list[dict]) -> dict:
    """The learning rate one point trains at, from its sweep runs (one seed, one run per rate).

    The best final metric among the runs that did not diverge (highest accuracy, lowest
    perplexity); if every run diverged, the smallest rate. Returns ``lr``, whether it lies at an
    edge of the swept range (``at_edge``: the best may lie beyond it), whether every run diverged,
    and every rate's metric (``tried``, rate -> value)."""
    if not runs:
        raise ValueError("best_lr needs the sweep's runs of one point; got none.")
    metric = metric_name(runs[0])
    ok = [r for r in runs if not r.get("diverged")]
    lrs = sorted(r["lr"] for r in runs)
    if ok:
        sign = -1 if metric == "perplexity" else 1
        lr = max(ok, key=lambda r: (sign * r[metric], -r["lr"]))["lr"]  # a tie goes to the smaller rate
    else:
        lr = lrs[0]
    return {
        "lr": lr,
        "at_edge": len(lrs) > 1 and lr in (lrs[0], lrs[-1]),
        "all_diverged": not ok,
        "tried": {str(r["lr"]): r[metric] for r in sorted(runs, key=lambda r: r["lr"])},
    }
