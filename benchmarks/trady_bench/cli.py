"""The benchmark command (``python benchmarks/bench.py``): arguments, the tasks to run, the report."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .environment import environment, quiet
from .front import FRONT_GRIDS
from .front_report import verdicts
from .front_run import run_front
from .journal import RunJournal
from .outputs import default_output, write_front_outputs, write_outputs
from .resources import cpu_seconds
from .run import recount_flops, run_task
from .tasks import FRONT_PRESETS, PRESETS, TASKS

DESCRIPTION = (
    "What TraDy buys, measured: the accuracy-memory front against LoRA (AdamW), or accuracy, memory, speed and "
    "artifact size against every baseline under the paper's SGD protocol."
)


def main(argv=None) -> dict:
    """Run the benchmark on the tasks of ``--tasks`` (or only rebuild the report); returns the
    results of every task the report covers (task name -> `run_task`'s result)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument(
        "--protocol",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw: the accuracy-memory front (LoRA ranks, TraDy-family budgets, head-only, full; AdamW at each "
        "point's best swept learning rate); sgd: the paper's protocol (every strategy at two budgets, plain SGD "
        "0.125, with speed, FLOPs and artifact)",
    )
    parser.add_argument("--tasks", default="image,text,lm", help="comma-separated subset of image,text,lm")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the measuring process (timings need an idle machine)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes (one thread each) for the accuracy runs; 1 runs them in this process",
    )
    parser.add_argument("--output-dir", help="default: docs/benchmarks (quick) or docs/benchmarks/full (full)")
    parser.add_argument(
        "--recount-flops",
        action="store_true",
        help="run only the FLOP count of each task in --tasks, into its finished results in <output-dir>/raw, "
        "then rebuild the report",
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="the front: keep the results of --tasks in <output-dir>/raw and run only what they lack (new points, "
        "learning rates the sweep now tries, seeds at a rate it now picks)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs an interrupted run of --tasks finished (<output-dir>/raw/<task>.runs.jsonl, written as "
        "each run ends) and train only the rest",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the JSON, plots and tables from the per-task results in <output-dir>/raw",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    quiet()
    preset = PRESETS[args.preset]
    command = ("python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: needs at least 1 (1 runs everything in this process).")
    if args.protocol == "adamw" and args.recount_flops:
        raise SystemExit("--recount-flops: the front counts no FLOPs; add --protocol sgd.")
    if args.extend and args.protocol != "adamw":
        raise SystemExit("--extend: only the front (--protocol adamw) can be extended.")
    out = Path(args.output_dir) if args.output_dir else default_output(args.preset, args.protocol)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    for name in [] if args.report_only else args.tasks.split(","):
        if name not in TASKS:
            raise SystemExit(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}.")
        if args.recount_flops and not (raw / f"{name}.json").exists():
            raise SystemExit(f"--recount-flops: no results of task {name!r} in {raw}; run the benchmark first.")
        t0 = time.perf_counter()
        sizes = FRONT_PRESETS[args.preset][name] if args.protocol == "adamw" else preset[name]
        header = {"task": name, "preset": args.preset, "protocol": args.protocol, "sizes": sizes}
        if not args.recount_flops:  # refuses an unasked resume before the task loads
            journal = RunJournal(raw / f"{name}.runs.jsonl", header, resume=args.resume)
        task = TASKS[name](sizes)
        print(f"[{name}] data and model loaded ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.recount_flops:
            recount_flops(raw / f"{name}.json", task, command)
            print(f"[{name}] FLOPs recounted ({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        log = lambda s: print(s, flush=True)  # noqa: E731
        resumed = len(journal)
        if resumed:
            log(f"[{name}] resuming: {resumed} finished runs from {journal.path}")
        if args.protocol == "adamw":
            previous = None
            if args.extend:
                if not (raw / f"{name}.json").exists():
                    raise SystemExit(f"--extend: no results of task {name!r} in {raw}; run the benchmark first.")
                previous = json.loads((raw / f"{name}.json").read_text())
                if previous["run"]["sizes"] != sizes:
                    raise SystemExit(f"--extend: the results of task {name!r} in {raw} are of other sizes.")
            grid = FRONT_GRIDS[args.preset]
            result = run_front(
                task, grid, log=log, jobs=args.jobs, spec=(name, sizes), previous=previous, journal=journal
            )
        else:
            result = run_task(task, preset, log=log, jobs=args.jobs, spec=(name, sizes), journal=journal)
        result["run"] = {
            **environment(command, args.threads),
            "preset": args.preset,
            "protocol": args.protocol,
            "sizes": sizes,
            "jobs": args.jobs,
            "resumed_runs": resumed,  # training runs an interrupted run had finished (not in "elapsed")
        }
        (raw / f"{name}.json").write_text(json.dumps(result, default=float) + "\n")
        journal.close()
    # The report covers every task with results in raw/ (this run's, and earlier runs' of other tasks).
    results = {n: json.loads((raw / f"{n}.json").read_text()) for n in TASKS if (raw / f"{n}.json").exists()}
    env = environment(command, args.threads)
    env["preset"] = {"name": args.preset, **(FRONT_PRESETS[args.preset] if args.protocol == "adamw" else preset)}
    env["total"] = {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(cpu_seconds() - cpu, 1),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.protocol == "adamw":
        env["grid"] = asdict(FRONT_GRIDS[args.preset])
        write_front_outputs(results, env, out)
        for name, lines in verdicts(results).items():
            print(f"[{name}] verdict on each LoRA point:", *lines, sep="\n  ", flush=True)
    else:
        write_outputs(results, env, out)
    print(f"done: {env['total']}", flush=True)
    return results
