"""What TraDy buys, measured, on three offline tasks: EfficientNet-Lite0 -> Fashion-MNIST,
all-MiniLM-L6-v2 -> Rotten Tomatoes (accuracy), SmolLM2-135M-Instruct -> Hamlet (held-out
perplexity). The harness is the `trady_bench` package next to this script (its docstring lists what
each module measures).

``--protocol adamw`` (the default): the accuracy-memory front. LoRA at several ranks (and r=8 with
gradient checkpointing), TraDy and MeDyate at budgets that are fractions of LoRA r=8's measured step
memory, head-only and full fine-tuning, each under AdamW at the best of three learning rates swept
on one seed; per task a plot of the metric against measured step memory, and for every LoRA point
the TraDy-family point at half its memory or less that is as good (or how far the front falls
short). Writes docs/benchmarks/front/{front.json,front.md,front_<task>.png}.

``--protocol sgd``: the paper's protocol. Every selection strategy at two memory budgets, peft
LoRA, head-only and full fine-tuning, plain SGD, three seeds, with memory, speed, FLOPs and
artifact size. Writes docs/benchmarks/{accuracy,memory,speed,artifact}.json, PNG plots and the
generated docs/benchmarks/table.md.

Run: ``python benchmarks/bench.py --preset quick`` (``make bench-quick``: the reduced front) or
``--preset full`` (results in docs/benchmarks/full/; ``make bench`` runs both protocols). ``--tasks``
runs a subset; each task's results are kept in <output>/raw/ and the report covers every task found
there (``--report-only`` rebuilds it). Every generated block of docs/benchmarks.md names the
command and machine that produced it.
"""

import trady_peft  # noqa: F401  first: it keeps the quantization backends' import-time log lines out

# isort: split
from trady_bench.cli import main

if __name__ == "__main__":
    main()
