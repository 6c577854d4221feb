"""The benchmark harness behind ``python benchmarks/bench.py``: what TraDy buys against its baselines.

Two protocols. The accuracy-memory front (``--protocol adamw``, `front_run`): LoRA at several ranks
and with gradient checkpointing, TraDy and MeDyate at budgets that are fractions of LoRA r=8's
measured step memory, head-only and full fine-tuning, under AdamW at each point's best swept
learning rate, and the verdict on every LoRA point. The paper's protocol (``--protocol sgd``, `run`):
runs every selection strategy of `trady_peft` at two memory budgets, peft LoRA (r=8 on the same
target layers), head-only and full fine-tuning, with three seeds each, on the three offline tasks
of examples/offline_assets.py (`tasks`).

Under it every method trains with the paper's optimizer and schedule (plain SGD, no momentum, no weight
decay, cosine decay with linear warm-up, the classifier always trained) for several epochs, so
that the dynamic strategies redraw (`training`). Besides accuracy it measures, per (task, method,
budget): the memory of one training step (`trady_peft.measure_training_step`: saved activations,
trainable parameters, gradients, optimizer state; the adapter's footprint against its budget), the
peak resident-memory growth of each run, the time of a training step relative to LoRA and to full
fine-tuning (one process, methods interleaved step by step, median), the cost of a redraw, the
weight-derivative FLOPs against full fine-tuning (``torch.utils.flop_counter``), and how the
adapter's artifact (the union of channels touched) grows with epochs.

The modules, in the order the data flows:

* `tasks`: what a task holds, the preset sizes, the image/text/lm tasks;
* `methods`: the grid (strategies x budgets, LoRA, head-only, full) and a fresh model per method;
* `training`: optimizer, schedule, periods, a training step, the test metric;
* `accuracy`: the grid's training runs, in this process or in worker processes; `journal`: each
  finished run, kept on disk for ``--resume``;
* `memory`, `speed`, `flops`, `artifact`: one measurement each; `resources`: peak RSS, CPU time;
* `aggregate`: mean ± std over seeds, win/tie/loss, divergence, the rows worth their memory;
* `report`, `plots`, `outputs`: table.md, the PNGs, the JSON files and the docs page's block;
* `run`: the paper's protocol on one task; `cli`: the command; `environment`: set-up and the run's record;
* the front: `front` (its points, budgets and families), `sweep` (the learning rates tried and the one
  chosen), `front_run` (the front on one task), `front_verdict` (which TraDy-family point answers each
  LoRA point), `front_report` (``front.md``).
"""
