"""The learning-rate sweep of the front: three learning rates per method family, tried on one seed,
and the one each point then trains at."""

from __future__ import annotations

from .aggregate import metric_name
from .front import family

#: The three learning rates tried (AdamW, cosine with warm-up) per family, a factor ~3 apart (10 for the
#: head, which is a fresh classifier on the image and text tasks but the tied embedding on the LM).
LR_GRIDS = {
    "lora": (3e-4, 1e-3, 3e-3),
    "trady": (1e-3, 3e-3, 1e-2),
    "medyate": (1e-3, 3e-3, 1e-2),
    "head": (1e-4, 1e-3, 1e-2),
    "full": (3e-5, 1e-4, 3e-4),
}


def lr_grid(row_name: str) -> tuple[float, ...]:
    """The learning rates swept for a point (by its family; a strategy not listed: TraDy's)."""
    return LR_GRIDS.get(family(row_name).removesuffix("-gc"), LR_GRIDS["trady"])


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
