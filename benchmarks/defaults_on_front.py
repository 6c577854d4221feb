"""Where trady-peft's defaults land on the accuracy-memory front.

A user who sets no budget and no rate gets ``TraDyConfig()`` (the default budget: a bank of the
values LoRA r=8 would train on the same layers, as many bytes again for saved inputs;
``strategy="auto"``) and the bank at `trady_peft.recommended_learning_rate`. This script trains
exactly that on each task of a traced front, with the front's own loop and seeds
(`trady_bench.accuracy.run_one`, the fresh head at the front's rate), measures its step with and
without gradient checkpointing (`trady_bench.memory.measure_memory`, AdamW), tries the rates a
factor 3 either side of the recommended one (first seed), and gives the verdict on each of the
front's LoRA points as the front does (`trady_bench.front_verdict`: at most half its step memory,
as good within one std).

    python benchmarks/defaults_on_front.py [--front docs/benchmarks/full/front/front.json] [--tasks image,text,lm]

Writes ``defaults.json`` beside the front (tasks merged into an existing file) and, for the
default front, the table between the ``defaults_on_front.py`` markers of docs/benchmarks.md.
One torch thread, as the front's workers; about 25 minutes for the full front's three tasks (run
tasks in parallel with ``--tasks``).
"""

from __future__ import annotations

# isort: off
import trady_peft  # first: it keeps the quantization backends' import-time log lines out

# isort: on

import argparse
import json
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from trady_bench.accuracy import run_one
from trady_bench.aggregate import diverged, summarize
from trady_bench.environment import ROOT, quiet
from trady_bench.front import is_lora
from trady_bench.front_run import twin_records
from trady_bench.front_verdict import answer_lora_points
from trady_bench.memory import measure_memory
from trady_bench.methods import Method, build_method, checkpointable, lora_targets_of, target_layers
from trady_bench.outputs import DOCS_PAGE, replace_between
from trady_bench.tasks import TASKS, Task
from trady_bench.training import OPTIMIZER_STATE_BYTES

from trady_peft.memory.budget import bytes_per_trained_value

FRONT = ROOT / "docs" / "benchmarks" / "full" / "front" / "front.json"
MARKERS = ("<!-- defaults_on_front.py -->", "<!-- /defaults_on_front.py -->")
#: The method name the default's rows carry in records and verdicts.
DEFAULT = "default"


def default_budget_bytes(task: Task) -> int:
    """The byte budget ``TraDyConfig()`` gives this task's model (the front's targets, head and AdamW)."""
    config = trady_peft.TraDyConfig(
        modules_to_save=[task.head] if task.head else None,
        exclude_modules=task.exclude,
        optimizer_state_bytes=OPTIMIZER_STATE_BYTES["adamw"],
    )
    model = get_peft_model(task.build(), config)
    return model.peft_config["default"].budget.amount


def run_task(name: str, front: dict) -> dict:
    """The default's records, rate neighbours and memory rows on one task of ``front``."""
    traced = front["tasks"][name]
    task = TASKS[name](front["preset"][name])  # the sizes the front was traced with
    lora = lora_targets_of(task, len(target_layers(task)))
    budget = default_budget_bytes(task)
    method = Method("auto", budget)
    probe = build_method(task, method, 0, lora, optimizer_state_bytes=OPTIMIZER_STATE_BYTES["adamw"])
    strategy, rate = probe.peft_config["default"].strategy, trady_peft.recommended_learning_rate(probe)
    del probe
    runs = [(seed, rate) for seed in traced["seeds"]] + [(traced["seeds"][0], rate * f) for f in (1 / 3, 3)]
    records = []
    for seed, lr in tqdm(runs, desc=f"[{name}] default, {len(runs)} runs"):
        record = run_one(task, method, seed, lora, lr, "adamw")
        record["diverged"] = record["diverged"] or diverged(record, traced["untrained"])
        records.append(record)
    variants = [method] + ([Method("auto", budget, checkpointing=True)] if checkpointable(task.build()) else [])
    memory = [measure_memory(task, m, lora, "adamw") for m in variants]
    return {"budget_bytes": budget, "strategy": strategy, "lr": rate, "records": records, "memory": memory}


def as_default(row: dict) -> dict:
    """A record or memory row of the default, named `DEFAULT` (``-gc`` kept) for the verdict."""
    return {**row, "method": DEFAULT + ("-gc" if row["method"].endswith("-gc") else "")}


def verdicts(name: str, traced: dict, result: dict) -> tuple[dict, list]:
    """The summary of the default and the front's LoRA points on task ``name``, and the verdict on each
    LoRA point (`front_verdict.Answer`); the default with checkpointing gets its twin's records
    (`front_run.twin_records`: it trains exactly as without)."""
    trained = [r for r in result["records"] if r["lr"] == result["lr"]]
    variants = [Method("auto", m["budget_bytes"], checkpointing=m["method"].endswith("-gc")) for m in result["memory"]]
    measured = {(m["method"], m["budget_bytes"]) for m in result["memory"]}
    mine = [as_default(r) for r in trained]
    twins = [as_default(r) for r in twin_records(variants, measured, trained)]
    memory = [as_default(m) for m in result["memory"]]
    lora = [r for r in traced["records"] if is_lora(r["method"])]
    lora_memory = [m for m in traced["memory"] if is_lora(m["method"])]
    answers = answer_lora_points(lora + mine + twins, lora_memory + memory, (DEFAULT,))[name]
    return summarize(lora + mine), answers


def point(summary: dict, key: tuple) -> str:
    mean, std = summary[key]["mean_std"]
    return f"{key[1]} ({mean:.3g} ± {std:.2g})"


def task_row(name: str, traced: dict, result: dict) -> str:
    """The markdown row of one task: the default, its measured step, its metric and the verdicts."""
    summary, answers = verdicts(name, traced, result)
    key = (name, DEFAULT, result["budget_bytes"])
    metric, (mean, std) = summary[key]["metric"], summary[key]["mean_std"]
    answered = [
        f"{point(summary, a.lora)} at {a.ratio:.2f}x" + (" with checkpointing" if a.by[1].endswith("-gc") else "")
        for a in answers
        if a.by
    ]
    missed = [point(summary, a.lora) for a in answers if not a.by]
    steps = [f"{m['step_total_bytes'] / 2**20:.1f} MiB" for m in result["memory"]]
    values = result["memory"][0]["adapter_bank_bytes"] // bytes_per_trained_value(OPTIMIZER_STATE_BYTES["adamw"])
    first = traced["seeds"][0]
    tried = sorted((r["lr"], r[metric]) for r in result["records"] if r["seed"] == first)
    return (
        f"| {name} | {result['budget_bytes'] / 2**20:.1f} MiB ({values:,}) | {result['strategy']}, "
        f"{result['lr']:.1e} (seed {first}: {', '.join(f'{lr:.1e}: {v:.4g}' for lr, v in tried)}) "
        f"| {steps[0]}{f' ({steps[1]})' if len(steps) > 1 else ''} | {metric} {mean:.4g} ± {std:.2g} "
        f"| {', '.join(answered) or 'none'} | {', '.join(missed) or 'none'} |"
    )


def table(front: dict, results: dict) -> str:
    """The markdown table: one row per task of ``results``."""
    header = (
        "| task | default budget (bank values) | strategy, rate (rates tried) | step memory (with checkpointing) "
        "| metric | LoRA points answered (ratio of step memory) | not answered |\n|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(task_row(n, front["tasks"][n], r) + "\n" for n, r in results.items())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front", type=Path, default=FRONT, help="a front.json written by bench.py --protocol adamw")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks of the front; None: all of them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the front's worker processes train
    quiet()
    front = json.loads(args.front.read_text())
    out = args.front.with_name("defaults.json")
    for name in args.tasks.split(",") if args.tasks else list(front["tasks"]):
        result = run_task(name, front)
        results = json.loads(out.read_text())["tasks"] if out.exists() else {}  # another run may have added tasks
        results[name] = result
        front_path = args.front.resolve()
        shown = front_path.relative_to(ROOT) if front_path.is_relative_to(ROOT) else front_path
        out.write_text(json.dumps({"front": str(shown), "tasks": results}, indent=1))
    text = table(front, {n: results[n] for n in front["tasks"] if n in results})
    print(text)
    if args.front.resolve() == FRONT.resolve():
        replace_between(DOCS_PAGE, *MARKERS, text)
    return results


if __name__ == "__main__":
    main()
