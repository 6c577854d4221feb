"""The report's PNG plots: accuracy (or perplexity) against measured memory, and the artifact's growth.

matplotlib (the ``plot`` extra) is imported when a plot is drawn, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from .aggregate import summarize
from .front import family
from .methods import order_of
from .report import label, statements


def pareto_plot(records: list[dict], memory: list[dict], path: Path, titles: dict[str, str]) -> None:
    """Accuracy (or perplexity) against measured memory of a step, one point per method x budget,
    error bars = one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r for r in memory}
    tasks = list(statements(records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), squeeze=False)
    markers = "os^vD<>PX*h"
    names = sorted({k[1] for k in summary}, key=order_of)
    for ax, task in zip(axes[0], tasks):
        for i, name in enumerate(names):
            keys = sorted((k for k in summary if k[0] == task and k[1] == name), key=lambda k: k[2] or 0)
            xs = [mem[k]["step_total_bytes"] / 2**20 for k in keys if k in mem]
            ys = [summary[k]["mean_std"][0] for k in keys if k in mem]
            es = [summary[k]["mean_std"][1] for k in keys if k in mem]
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    marker=markers[i % len(markers)],
                    capsize=3,
                    label=label(name),
                    linestyle="-" if len(xs) > 1 else "none",
                )
        ax.set_xscale("log")
        ax.set_xlabel("measured memory of a step, MiB (saved activations + trainable + grads + optimizer)")
        metric = summary[next(k for k in summary if k[0] == task)]["metric"]
        ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
        ax.set_title(titles.get(task, task), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def artifact_plot(artifacts: list[dict], path: Path, titles: dict[str, str]) -> None:
    """The touched fraction of candidate channels against epochs, measured and expected, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for a in artifacts:
        e = [r["epoch"] for r in a["epochs"]]
        line = ax.plot(e, [r["touched_fraction"] for r in a["epochs"]], marker="o", label=f"{a['task']}: measured")
        ax.plot(
            e,
            [r["expected_fraction_per_layer"] for r in a["epochs"]],
            linestyle="--",
            color=line[0].get_color(),
            label=f"{a['task']}: 1-(1-ρ)^E per layer",
        )
    ax.set_xlabel("epochs E")
    ax.set_ylabel("touched fraction of candidate channels")
    ax.set_title("Adapter artifact: union of channels touched (TraDy, smaller budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def front_plot(result: dict, path: Path) -> None:
    """One task's front: the metric against measured step memory (log scale), one line per method
    family (LoRA over its ranks, each strategy over its budgets; dashed: with checkpointing), error
    bars = one std over seeds; the dotted line is half of LoRA r=8's step memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summarize(result["records"])
    mem = {(r["task"], r["method"], r["budget_bytes"]): r["step_total_bytes"] for r in result["memory"]}
    lines: dict[str, list[tuple]] = {}
    for key in summary:
        lines.setdefault(family(key[1]), []).append(key)
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    markers = "os^vD<>PX*h"
    for i, (name, keys) in enumerate(sorted(lines.items(), key=lambda kv: order_of(kv[1][0][1]))):
        keys.sort(key=lambda k: mem[k])
        ax.errorbar(
            [mem[k] / 2**20 for k in keys],
            [summary[k]["mean_std"][0] for k in keys],
            yerr=[summary[k]["mean_std"][1] for k in keys],
            marker=markers[i % len(markers)],
            capsize=3,
            label=FAMILY_LABELS.get(name, label(name)),
            linestyle=("--" if name.endswith("-gc") else "-") if len(keys) > 1 else "none",
        )
    ax.axvline(result["reference_step_bytes"] / 2**21, color="grey", linestyle=":", linewidth=1, label="0.5x LoRA r=8")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("step memory, MiB (measured: saved activations, trainable, grads, AdamW state)")
    metric = summary[next(iter(summary))]["metric"]
    ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
    ax.set_title(result["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: What the front's plot calls each family.
FAMILY_LABELS = {
    "lora": "LoRA, by rank",
    "lora-gc": "LoRA r=8 + checkpointing",
    "head": "head only",
    "full": "full fine-tuning",
}
