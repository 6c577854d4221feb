"""What TraDy buys, measured: accuracy, memory, speed and artifact size against its baselines.

Every selection strategy at two memory budgets, peft LoRA, head-only and full fine-tuning, three
seeds each, on three offline tasks: EfficientNet-Lite0 -> Fashion-MNIST, all-MiniLM-L6-v2 ->
Rotten Tomatoes (accuracy), SmolLM2-135M-Instruct -> Hamlet (held-out perplexity). The harness is
the `trady_bench` package next to this script (its docstring lists what each module measures).

Writes docs/benchmarks/{accuracy,memory,speed,artifact}.json, PNG plots, and the generated
docs/benchmarks/table.md that docs/benchmarks.md includes.

Run: ``python benchmarks/bench.py --preset quick`` (``make bench-quick``, about 18 minutes wall on
an idle 2-core machine, all three tasks; results in docs/benchmarks/) or ``--preset full``
(``make bench``, about 75 minutes; results in docs/benchmarks/full/). ``--tasks`` runs a subset;
each task's results are kept in <output>/raw/ and the report covers every task found there
(``--report-only`` rebuilds it).
"""

from trady_bench.cli import main

if __name__ == "__main__":
    main()
