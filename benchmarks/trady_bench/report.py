"""The report's text: labels and number formats, the win/tie/loss sentences, what to pick, and the
markdown tables of ``table.md`` (which the docs page includes)."""

from __future__ import annotations

from .aggregate import picks, summarize, verdict
from .methods import LORA_RANK, order_of
from .tasks import TASKS

LABELS = {"lora": f"LoRA r={LORA_RANK}", "head": "head only", "full": "full fine-tuning"}


def label(method: str) -> str:
    """What the report calls ``method`` (a strategy keeps its own name; ``lora-r4-gc``: "LoRA r=4 +
    checkpointing", ``trady-gc``: "trady + checkpointing", ``medyate-share0.9``: "medyate, bank_share 0.9")."""
    if method.startswith("lora-r"):
        rank, _, gc = method.removeprefix("lora-r").partition("-")
        return f"LoRA r={rank}" + (" + checkpointing" if gc else "")
    if method.endswith("-gc"):
        return label(method.removesuffix("-gc")) + " + checkpointing"
    name, shared, share = method.partition("-share")
    return f"{name}, bank_share {share}" if shared else LABELS.get(method, method)


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in the largest binary unit that fits (``-`` for None)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def fmt_flops_change(change: float | None) -> str:
    """A relative change of FLOPs as a signed percentage (``not counted`` for None)."""
    return "not counted" if change is None else f"{100 * change:+.1f}%"


def fmt_metric(mean: float, std: float, metric: str) -> str:
    """``mean ± std``: three decimals for an accuracy, one for a perplexity."""
    return f"{mean:.3f} ± {std:.3f}" if metric == "accuracy" else f"{mean:.1f} ± {std:.1f}"


def statements(records: list[dict]) -> dict[str, list[str]]:
    """Per task, one sentence per comparison of TraDy (each budget) with every other method:
    the strategies at the same budget and the budget-free baselines."""
    summary = summarize(records)
    out: dict[str, list[str]] = {}
    tasks = sorted({k[0] for k in summary}, key=lambda t: list(TASKS).index(t) if t in TASKS else 99)
    for task in tasks:
        lines = []
        budgets = sorted({k[2] for k in summary if k[0] == task and k[1] == "trady"})
        for budget in budgets:
            mine = summary[(task, "trady", budget)]
            higher = mine["metric"] == "accuracy"
            results = {"win": [], "tie": [], "loss": []}
            for (t, m, b), other in summary.items():
                if t != task or m == "trady" or (b is not None and b != budget):
                    continue
                flags = (mine["diverged"] > 0, other["diverged"] > 0)
                results[verdict(mine["mean_std"], other["mean_std"], higher, flags)].append(label(m))
            words = {"win": "wins against", "tie": "ties with", "loss": "loses to"}
            parts = [f"{words[kind]} {', '.join(names)}" for kind, names in results.items() if names]
            mean, std = mine["mean_std"]
            lines.append(
                f"TraDy at {fmt_bytes(budget)} ({mine['metric']} {fmt_metric(mean, std, mine['metric'])}) "
                + "; ".join(parts)
                + "."
            )
        out[task] = lines
    return out


def recommendations(records: list[dict], memory: list[dict]) -> list[str]:
    """What to pick, per task, from the results (`picks`)."""
    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r["step_total_bytes"] for r in memory}
    lines = []
    for task, keys in picks(records, memory).items():
        described = [
            f"{label(k[1])}{'' if k[2] is None else ' at ' + fmt_bytes(k[2])} ({fmt_bytes(mem[k])} per step, "
            f"{summary[k]['metric']} {fmt_metric(*summary[k]['mean_std'], summary[k]['metric'])})"
            for k in keys
        ]
        text = f"{task}: {described[0]}"
        if len(described) > 1:
            text += "; more memory buys a real improvement only with " + ", then ".join(described[1:])
        else:
            text += "; no row that uses more memory is better by more than one std"
        lines.append(text + ".")
    return lines


def took(env: dict) -> str:
    """How long the command that wrote the report ran (wall and CPU), if it ran any task."""
    total = env.get("total")
    if not total or total["wall_seconds"] < 60:  # a --report-only rebuild
        return ""
    return f", which ran {total['wall_seconds'] / 60:.1f} minutes wall ({total['cpu_seconds'] / 60:.1f} CPU-minutes),"


def before_training(results: dict[str, dict]) -> list[str]:
    """One line per task: its metric before any training (the reference for divergence)."""
    lines = []
    for name, t in results.items():
        if t.get("untrained") is None or not t["records"]:
            continue
        if "perplexity" in t["records"][0]:
            lines.append(f"* {name} before training: perplexity {t['untrained']:.1f} (the pretrained model)")
        else:
            lines.append(f"* {name} before training: accuracy {t['untrained']:.3f} (pretrained body, untrained head)")
    return lines


def markdown_tables(records: list[dict], memory: list[dict], speed: list[dict], titles: dict[str, str]) -> str:
    """The generated table(s): per task, one row per method x budget with mean ± std over seeds,
    measured memory and the step-time ratios."""
    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r for r in memory}
    spd = {(r["task"], r["method"], r["budget_bytes"]): r for r in speed}
    verdicts = statements(records)
    out = []
    for task in verdicts:
        keys = [k for k in summary if k[0] == task]
        keys.sort(key=lambda k: (k[2] is None, k[2] or 0, order_of(k[1])))
        metric = summary[keys[0]]["metric"]
        out.append(f"### {titles.get(task, task)}\n")
        out.append(
            f"| method | budget | {metric} (mean ± std, {summary[keys[0]]['seeds']} seeds) | saved activations "
            "| trainable + grad + optimizer | adapter footprint | step time / LoRA | step time / full |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k in keys:
            s, m, p = summary[k], mem.get(k, {}), spd.get(k, {})
            foot = m.get("adapter_footprint_bytes")
            footprint = "-" if foot is None else f"{fmt_bytes(foot)} ({100 * foot / k[2]:.0f}%)"
            value = fmt_metric(*s["mean_std"], metric)
            if s["diverged"]:
                value += f" (diverged: {s['diverged']}/{s['seeds']} seeds)"
            out.append(
                f"| {label(k[1])} | {fmt_bytes(k[2])} | {value} "
                f"| {fmt_bytes(m.get('saved_activation_bytes'))} | {fmt_bytes(m.get('trainable_state_bytes'))} "
                f"| {footprint} | {p.get('step_time_ratio_to_lora', float('nan')):.2f} "
                f"| {p.get('step_time_ratio_to_full', float('nan')):.2f} |"
            )
        out.append("")
        out.extend(f"* {line}" for line in verdicts[task])
        out.append("")
    return "\n".join(out)


def report_markdown(results, env, records, memory, speed, artifacts, titles) -> str:
    """The whole ``table.md``: the runs it comes from, the accuracy/memory tables, what to pick, the
    speed and FLOPs table, the artifact table and the run times."""
    lines = [
        "<!-- generated by benchmarks/bench.py; do not edit -->",
        f"Report built by `{env['command']}` on {env['date']} (torch {env['versions']['torch']}, transformers "
        f"{env['versions']['transformers']}, peft {env['versions']['peft']}){took(env)} from these runs:",
        "",
        *[
            f"* {k}: `{t['run']['command']}` on {t['run']['date']} ({t['run']['machine']['cpu_count']} CPUs, "
            f"{t['run']['machine']['torch_threads']} torch threads)"
            + (
                f"; FLOPs recounted by `{t['flops_recounted']['command']}` on {t['flops_recounted']['date']}"
                if t.get("flops_recounted")
                else ""
            )
            for k, t in results.items()
            if t.get("run")
        ],
        *before_training(results),
        "",
        markdown_tables(records, memory, speed, titles),
        "### What to pick",
        "",
        "Per task, the row with the least measured memory per step, then each cheapest row that beats the "
        "previous pick by more than one std (rows that diverged, and the Det-RGN strategies, whose scoring passes "
        "one measured training step does not show (these runs scored with the dense gradient, since replaced by a "
        "chunked pass within the budget), are left out):",
        "",
        *[f"* {line}" for line in recommendations(records, memory)],
        "",
        "![Accuracy against measured memory](pareto.png)",
        "",
        "### Speed and weight-derivative FLOPs",
        "",
        "| task | method | budget | step (ms, median) | / LoRA | / full | redraw / step | weight-grad FLOPs vs full |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in speed:
        redraw = r.get("redraw_to_step_ratio")
        lines.append(
            f"| {r['task']} | {label(r['method'])} | {fmt_bytes(r['budget_bytes'])} "
            f"| {1000 * r['step_seconds_median']:.1f} "
            f"| {r['step_time_ratio_to_lora']:.2f} | {r['step_time_ratio_to_full']:.2f} "
            f"| {'-' if redraw is None else f'{redraw:.2f}'} "
            f"| {fmt_flops_change(r.get('weight_gradient_flops_vs_full'))} |"
        )
    lines += [
        "",
        "### Artifact size against epochs (TraDy, smaller budget)",
        "",
        "| task | E | touched fraction | 1-(1-ρ)^E | per-layer expectation | adapter file |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in artifacts:
        for r in a["epochs"]:
            lines.append(
                f"| {a['task']} | {r['epoch']} | {r['touched_fraction']:.3f} | {r['expected_fraction_uniform']:.3f} "
                f"| {r['expected_fraction_per_layer']:.3f} | {fmt_bytes(r['adapter_file_bytes'])} |"
            )
    lines += ["", "![Artifact size against epochs](artifact.png)"]
    lines += ["", "### Run times", "", "| task | wall (s) | CPU (s) |", "|---|---:|---:|"]
    for k, t in results.items():
        lines.append(f"| {k} | {t['elapsed']['wall_seconds']:.0f} | {t['elapsed']['cpu_seconds']:.0f} |")
    notes = [f"* {k}: {n}" for k, t in results.items() for n in t["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"
