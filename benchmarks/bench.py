"""What TraDy buys, measured: accuracy, memory, speed and artifact size against its baselines.

Runs every selection strategy of `trady_peft.strategies.STRATEGIES` at two memory budgets, peft
LoRA (r=8 on the same target layers), head-only and full fine-tuning, with three seeds each, on
the three offline tasks of examples/offline_assets.py:

* ``image``: EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, accuracy;
* ``text``: all-MiniLM-L6-v2 -> Rotten Tomatoes, accuracy;
* ``lm``: SmolLM2-135M-Instruct -> Hamlet, held-out perplexity.

Every method trains with the paper's optimizer and schedule (plain SGD, no momentum, no weight
decay, cosine decay with linear warm-up, the classifier always trained) for several epochs, so
that the dynamic strategies redraw. Besides accuracy it measures, per (task, method, budget): the
memory of one training step (`trady_peft.measure_training_step`: saved activations, trainable
parameters, gradients, optimizer state; the adapter's footprint against its budget), the peak
resident-memory growth of each run, the time of a training step relative to LoRA and to full
fine-tuning (one process, methods interleaved step by step, median), the cost of a redraw, the
weight-derivative FLOPs against full fine-tuning (``torch.utils.flop_counter``), and how the
adapter's artifact (the union of channels touched) grows with epochs.

Writes docs/benchmarks/{accuracy,memory,speed,artifact}.json, PNG plots, and the generated
docs/benchmarks/table.md that docs/benchmarks.md includes.

Run: ``python benchmarks/bench.py --preset quick`` (``make bench-quick``, about 18 minutes wall on
an idle 2-core machine, all three tasks; results in docs/benchmarks/) or ``--preset full``
(``make bench``, about 75 minutes; results in docs/benchmarks/full/). ``--tasks`` runs a subset;
each task's results are kept in <output>/raw/ and the report covers every task found there
(``--report-only`` rebuilds it).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
SEEDS = (0, 42, 100)  # the paper's seeds
BASELINES = ("lora", "head", "full")
LORA_RANK = 8


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """One benchmark task: a model factory, fixed data and the training sizes.

    Attributes:
        name: short key (``image``, ``text``, ``lm``).
        title: what the docs call it.
        build: returns a fresh pretrained model (the same weights every call).
        train, test: dicts of stacked tensors (the model's keyword inputs, with ``labels``).
        head: the trained classifier (``modules_to_save``) or None (a language model).
        head_only: parameter-name prefixes that train in the head-only baseline.
        metric: ``"accuracy"`` (higher is better) or ``"perplexity"`` (lower is better).
        budget_fractions: the two budgets, as fractions of the bytes of every candidate channel
            (weights + gradients + saved inputs of all target layers, for the real batch).
        epochs, batch_size, lr, warmup: the schedule (SGD, cosine with linear warm-up), the same for
            every method.
        max_grad_norm: gradients clipped to this global norm before each step (None: no clipping).
        speed_batch_size: rows per timed step in the speed phase (None: ``batch_size``); smaller
            for the language model, whose interleaved speed phase dominated the run time.
        speed_group_size: methods held in memory at once by the speed phase, besides LoRA and
            full fine-tuning (which every group repeats): the whole grid for the small models,
            fewer for the language model (a copy of its weights per method).
        embeddings: name of the module whose output the FLOP count makes require grad (None:
            the input tensor itself).
        exclude: layers TraDy (and so LoRA) leaves alone (``exclude_modules``), e.g. one the loss
            never reaches.
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    head: str | None
    head_only: tuple[str, ...]
    metric: str
    budget_fractions: tuple[float, float]
    epochs: int
    batch_size: int
    lr: float
    warmup: float = 0.1
    max_grad_norm: float | None = 1.0
    embeddings: str | None = None
    eval_batch_size: int = 128
    speed_batch_size: int | None = None
    speed_group_size: int = 15
    gradient_batches: int = 2
    exclude: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in self.train.items()}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train["labels"]) / self.batch_size)


def tensors(dataset) -> dict[str, torch.Tensor]:
    """All rows of a torch-formatted ``datasets.Dataset`` as stacked tensors (one copy)."""
    return {k: v for k, v in dataset[:].items()}


PRESETS = {
    # sizes per task: training/test rows, resolution or sequence length, epochs, batch size; quick fits
    # in about 18 minutes on 2 idle cores, full in about 75 (docs/benchmarks.md, "Run time")
    "quick": {
        "image": {"train": 192, "test": 400, "size": 32, "epochs": 3, "batch": 32},
        "text": {"train": 64, "test": 400, "length": 24, "epochs": 3, "batch": 16},
        "lm": {"train": 4, "test": 8, "length": 16, "epochs": 2, "batch": 2, "gradient_batches": 1, "speed_batch": 1},
        "speed_steps": 15,
        "artifact_epochs": 10,
    },
    "full": {
        "image": {"train": 768, "test": 1000, "size": 32, "epochs": 5, "batch": 32},
        "text": {"train": 256, "test": 1000, "length": 32, "epochs": 4, "batch": 16},
        "lm": {"train": 8, "test": 16, "length": 32, "epochs": 3, "batch": 2, "gradient_batches": 1, "speed_batch": 1},
        "speed_steps": 20,
        "artifact_epochs": 30,
    },
}


def image_task(sizes: dict) -> Task:
    from offline_assets import Classifier, fashion_mnist

    train = fashion_mnist("train", sizes["train"], sizes["size"], seed=0)
    test = fashion_mnist("test", sizes["test"], sizes["size"], seed=1)
    base = plain_convs(Classifier())

    def build():
        return copy.deepcopy(base)

    return Task(
        "image",
        f"EfficientNet-Lite0 -> Fashion-MNIST ({sizes['train']} train / {sizes['test']} test images, "
        f"{sizes['size']}x{sizes['size']})",
        build,
        tensors(train),
        tensors(test),
        head="net._fc",
        head_only=("net._fc.",),
        metric="accuracy",
        budget_fractions=(0.022, 0.075),
        epochs=sizes["epochs"],
        batch_size=sizes["batch"],
        lr=0.125,
    )


def plain_convs(model: nn.Module) -> nn.Module:
    """EfficientNet's TF-style convolutions without padding (every 1x1 one) as plain ``nn.Conv2d``:
    the same computation (their padding module is the identity), and peft LoRA can wrap them (it
    builds its factors with the wrapped layer's own class, whose constructor needs an image size)."""
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and pad is not None and not isinstance(pad, nn.ZeroPad2d):
            module.__class__ = nn.Conv2d
    return model


def lora_wrappable(model: nn.Module, names: list[str]) -> list[str]:
    """The layers of ``names`` whose class peft LoRA rebuilds correctly (torch's or transformers' own)."""
    keep = []
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)
        if type(module).__module__.startswith(("torch.nn", "transformers")):
            keep.append(name)
    return keep


def text_task(sizes: dict) -> Task:
    from datasets import Dataset
    from offline_assets import MiniLMClassifier, minilm_tokenizer, rotten_tomatoes

    pairs = rotten_tomatoes(sizes["train"] + sizes["test"], seed=0)
    raw = Dataset.from_dict({"text": [t for t, _ in pairs], "labels": [y for _, y in pairs]})
    tokenizer = minilm_tokenizer()

    def tokenize(batch):
        enc = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=sizes["length"])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    data = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    data.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    split = data.train_test_split(test_size=sizes["test"], shuffle=False)  # already shuffled with seed 0
    base = MiniLMClassifier()

    def build():
        return copy.deepcopy(base)

    return Task(
        "text",
        f"all-MiniLM-L6-v2 -> Rotten Tomatoes ({sizes['train']} train / {sizes['test']} test snippets, "
        f"{sizes['length']} tokens)",
        build,
        tensors(split["train"]),
        tensors(split["test"]),
        head="classifier",
        head_only=("classifier.",),
        metric="accuracy",
        budget_fractions=(0.022, 0.075),
        epochs=sizes["epochs"],
        batch_size=sizes["batch"],
        lr=0.125,
        embeddings="encoder.embeddings.word_embeddings",
        exclude=("encoder.pooler.dense",),  # BERT's pooler: unused under mean pooling, it gets no gradient
    )


def smollm2_cached():
    """SmolLM2 as a plain LlamaForCausalLM, from an fp32 copy cached under ~/.cache/trady-peft (the
    GGUF dequantization takes ~15 s)."""
    from offline_assets import smollm2
    from transformers import AutoTokenizer, LlamaForCausalLM

    cache = Path(os.environ.get("TRADY_PEFT_CACHE", Path.home() / ".cache" / "trady-peft")) / "smollm2-135m-fp32"
    if (cache / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32), AutoTokenizer.from_pretrained(cache)
    model, tokenizer = smollm2()
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model, tokenizer


def lm_task(sizes: dict) -> Task:
    from datasets import Dataset
    from offline_assets import hamlet

    base, tokenizer = smollm2_cached()
    length = sizes["length"]
    tokens = Dataset.from_dict({"text": [hamlet()]}).map(
        lambda b: {"input_ids": tokenizer(b["text"])["input_ids"]}, batched=True, remove_columns=["text"]
    )

    def group(batch):  # consecutive blocks, the remainder dropped (as run_clm.py does)
        ids = [t for row in batch["input_ids"] for t in row]
        blocks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    blocks = tokens.map(group, batched=True, desc=f"{length}-token blocks")
    blocks.set_format("torch")
    # A fixed subset: the first blocks train, the last blocks are held out.
    train = blocks.select(range(sizes["train"]))
    test = blocks.select(range(len(blocks) - sizes["test"], len(blocks)))

    def build():
        return copy.deepcopy(base)  # the tied output layer stays tied (deepcopy keeps shared tensors shared)

    notes = []
    if sizes.get("speed_batch"):
        notes.append(
            f"the speed phase times steps on {sizes['speed_batch']} block(s) of {length} tokens (training batches "
            f"hold {sizes['batch']}): at the training batch it alone took about 5 CPU-minutes"
        )
    return Task(
        "lm",
        f"SmolLM2-135M -> Hamlet ({sizes['train']} train / {sizes['test']} held-out blocks of {length} tokens)",
        build,
        tensors(train),
        tensors(test),
        head=None,
        head_only=("model.embed_tokens.",),  # the output layer, tied to the input embedding
        metric="perplexity",
        budget_fractions=(0.022, 0.075),
        epochs=sizes["epochs"],
        batch_size=sizes["batch"],
        lr=0.125,
        embeddings="model.embed_tokens",
        eval_batch_size=8,
        gradient_batches=sizes.get("gradient_batches", 2),
        speed_batch_size=sizes.get("speed_batch"),
        speed_group_size=8,
        notes=notes,
    )


TASKS = {"image": image_task, "text": text_task, "lm": lm_task}


# ---------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A row of the grid: a strategy at a budget, or a budget-free baseline."""

    name: str
    budget: int | None = None  # bytes

    @property
    def is_trady(self) -> bool:
        return self.name not in BASELINES

    @property
    def key(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget}"


def strategies() -> tuple[str, ...]:
    from trady_peft.config import STRATEGIES

    return STRATEGIES


def grid(budgets: Sequence[int]) -> list[Method]:
    """Every strategy at every budget, then LoRA, head-only and full fine-tuning."""
    return [Method(s, b) for b in budgets for s in strategies()] + [Method(b) for b in BASELINES]


def target_layers(task: Task) -> list[str]:
    """The layers TraDy wraps by default on this model (the targets LoRA gets too)."""
    from peft import get_peft_model

    import trady_peft

    config = trady_peft.TraDyConfig(
        channels_per_layer=1, modules_to_save=[task.head] if task.head else None, exclude_modules=task.exclude
    )
    model = get_peft_model(task.build(), config)
    return [n for n, m in model.base_model.model.named_modules() if isinstance(m, trady_peft.TraDyLayer)]


def task_budgets(task: Task) -> list[int]:
    """The two byte budgets: fractions of what training every candidate channel would cost."""
    import trady_peft

    model = task.build()
    accounting = trady_peft.memory_accounting(
        model, task.batch(slice(0, task.batch_size)), unit="bytes", optimizer_state_bytes=0
    )
    total = accounting.total_weights + accounting.total_activations
    return [int(total * f) for f in task.budget_fractions]


def build_method(
    task: Task, method: Method, seed: int, lora_targets: list[str], frozen_path: bool = True
) -> nn.Module:
    """A fresh model set up for ``method`` (its trainable parameters marked). ``frozen_path=False``
    turns TraDy's memory-saving frozen path off (`count_flops`: its twins recompute inside backward)."""
    from peft import LoraConfig, get_peft_model

    import trady_peft

    model = task.build()
    torch.manual_seed(seed)
    if task.head:  # the seed draws the fresh head, as well as the channels and the data order
        model.get_submodule(task.head).reset_parameters()
    heads = [task.head] if task.head else None
    if method.is_trady:
        config = trady_peft.TraDyConfig(
            memory_budget=f"{method.budget}B",
            strategy=method.name,
            modules_to_save=heads,
            seed=seed,
            optimizer_state_bytes=0,  # plain SGD
            gradient_batches=task.gradient_batches,
            exclude_modules=task.exclude,
            memory_saving_frozen_path=frozen_path,
        )
        return get_peft_model(model, config)
    if method.name == "lora":
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=lora_targets, modules_to_save=heads)
        return get_peft_model(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(method.name == "full" or name.startswith(task.head_only))
    return model


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` with every batch norm's statistics frozen (eval mode; its affine weights still
    train where they are trainable). TraDy's memory-saving frozen path freezes them too, so every
    method trains under the same normalisation (short runs would otherwise drag the running
    statistics to a few small batches; see the offline-assets notes)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def make_optimizer(task: Task, model: nn.Module, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=task.lr, momentum=0.0, weight_decay=0.0)
    warmup = max(1, round(task.warmup * total_steps))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def epoch_order(task: Task, seed: int, epoch: int) -> list[torch.Tensor]:
    n = len(task.train["labels"])
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(task.batch_size))


def start_period(model: nn.Module, task: Task, method: Method, optimizer, seed: int, epoch: int) -> None:
    """What `trady_peft.TraDyCallback` does at an epoch's start: period ``epoch``, scored on batches
    of that epoch for the Det-RGN oracles."""
    import trady_peft
    from trady_peft.state import Phase

    tuner = trady_peft.find_tuner(model)
    if tuner.period() == epoch and tuner.phase() is Phase.DRAWN:
        return
    batches = [task.batch(rows) for rows in epoch_order(task, seed, epoch)[: task.gradient_batches]]
    trady_peft.next_period(model, optimizer, batches=batches, period=epoch)


def loss_of(output) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output.loss


def train_step(model, batch, optimizer, scheduler=None, max_grad_norm: float | None = None) -> float:
    loss = loss_of(model(**batch))
    loss.backward()
    if max_grad_norm is not None:  # the Trainer's default clipping (max_grad_norm=1.0), over all trained values
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def evaluate_model(task: Task, model: nn.Module) -> float:
    """Test accuracy (the offline ``evaluate`` accuracy module) or held-out perplexity."""
    model.eval()
    n = len(task.test["labels"])
    chunks = torch.arange(n).split(task.eval_batch_size)
    try:
        if task.metric == "perplexity":
            total, tokens = 0.0, 0
            for rows in chunks:
                batch = {k: v[rows] for k, v in task.test.items()}
                count = int((batch["labels"][:, 1:] != -100).sum())
                total += float(loss_of(model(**batch))) * count
                tokens += count
            return math.exp(total / tokens)
        import evaluate

        sys.path.insert(0, str(ROOT / "examples"))
        from offline_assets import ACCURACY

        metric = evaluate.load(str(ACCURACY))
        for rows in chunks:
            batch = {k: v[rows] for k, v in task.test.items() if k != "labels"}
            logits = model(**batch)["logits"]
            metric.add_batch(predictions=logits.argmax(-1), references=task.test["labels"][rows])
        return float(metric.compute()["accuracy"])
    finally:
        train_mode(model)


# ------------------------------------------------------------------------------------ RSS helpers
def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


#: Collect garbage before each run, so that its peak-RSS growth is its own (tests turn it off: a
#: full collection of a process holding torch and transformers takes a fraction of a second).
COLLECT_BETWEEN_RUNS = True


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next run's growth is its own."""
    if not COLLECT_BETWEEN_RUNS:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak resident-memory growth of a block: VmHWM reset (``/proc/self/clear_refs``, Linux) at
    entry, ``VmHWM - VmRSS(entry)`` at exit, in bytes. None where /proc is not available."""

    def __enter__(self):
        release_memory()
        self.start = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self.start > 0
        except OSError:
            self.ok = False
        self.growth = None
        return self

    def __exit__(self, *exc):
        if self.ok:
            self.growth = max(0, _rss_kib("VmHWM") - self.start) * 1024
        return False


# --------------------------------------------------------------------------------------- accuracy
def run_one(task: Task, method: Method, seed: int, lora_targets: list[str]) -> dict:
    """Train ``method`` with ``seed`` for ``task.epochs`` epochs; its final metric and run figures."""
    import trady_peft

    with PeakRSS() as rss:
        start_cpu, start = time.process_time(), time.perf_counter()
        model = train_mode(build_method(task, method, seed, lora_targets))
        total = task.epochs * task.steps_per_epoch
        optimizer, scheduler = make_optimizer(task, model, total)
        losses = []
        for epoch in range(task.epochs):
            if method.is_trady:
                start_period(model, task, method, optimizer, seed, epoch)
            for rows in epoch_order(task, seed, epoch):
                losses.append(train_step(model, task.batch(rows), optimizer, scheduler, task.max_grad_norm))
        value = evaluate_model(task, model)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    record = {
        "task": task.name,
        "method": method.name,
        "budget_bytes": method.budget,
        "seed": seed,
        task.metric: value,
        "final_train_loss": losses[-1],
        "diverged": not all(math.isfinite(x) for x in losses) or not math.isfinite(value),  # refined by run_task
        "epochs": task.epochs,
        "steps": total,
        "peak_rss_growth_bytes": rss.growth,
        "wall_seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
    }
    if method.is_trady:
        summary = trady_peft.find_tuner(model).selection_summary()
        record["touched_channels"] = summary["touched_channels"]
        record["selected_channels"] = summary["selected_channels"]
        record["total_channels"] = summary["total_channels"]
    del model, optimizer
    return record


# Worker processes of the accuracy grid: each builds the task once (data, pretrained model).
_WORKER_TASK: Task | None = None


def _start_worker(name: str, sizes: dict) -> None:
    global _WORKER_TASK
    torch.set_num_threads(1)  # one thread per process: small batches scale poorly across threads
    quiet()
    _WORKER_TASK = TASKS[name](sizes)


def _run_in_worker(method: Method, seed: int, lora_targets: list[str]) -> dict:
    return run_one(_WORKER_TASK, method, seed, lora_targets)


def run_grid(
    task: Task, runs: list[tuple[Method, int]], lora_targets: list[str], jobs: int, spec: tuple[str, dict] | None
) -> list[dict]:
    """`run_one` for every ``(method, seed)`` of ``runs``, in order: in this process, or spread
    over ``jobs`` spawned processes that rebuild the task from ``spec`` (the same data and weights:
    the subsets and the pretrained model are fixed)."""
    if jobs <= 1 or spec is None:
        return [run_one(task, m, seed, lora_targets) for m, seed in runs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=spec) as pool:
        futures = [pool.submit(_run_in_worker, m, seed, lora_targets) for m, seed in runs]
        return [f.result() for f in futures]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------------------- memory
def measure_memory(task: Task, method: Method, lora_targets: list[str]) -> dict:
    """One measured training step (seed 0): saved activations, trainable + gradient + optimizer
    bytes, and for TraDy the adapter's own footprint (its bank and the saved inputs inside its
    layers) against the budget."""
    import trady_peft

    model = train_mode(build_method(task, method, 0, lora_targets))
    optimizer, _ = make_optimizer(task, model, 10)
    batch = task.batch(slice(0, task.batch_size))
    if method.is_trady:
        start_period(model, task, method, optimizer, 0, 0)
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    row = {
        "task": task.name,
        "method": method.name,
        "budget_bytes": method.budget,
        "saved_activation_bytes": mem.saved_activations,
        "trainable_bytes": mem.trainable_parameters,
        "gradient_bytes": mem.gradients,
        "optimizer_state_bytes": mem.optimizer_state,
        "trainable_state_bytes": mem.trainable_parameters + mem.gradients + mem.optimizer_state,
        "step_total_bytes": mem.total,
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if method.is_trady:
        tuner = trady_peft.find_tuner(model)
        layers = {
            f"base_model.model.{n}" for n, m in tuner.model.named_modules() if isinstance(m, trady_peft.TraDyLayer)
        }
        saved = sum(b for n, b in mem.saved_by_module.items() if n in layers)
        bank = 0
        for p in tuner.channel_bank.parameters():
            parts = [p, *([p.grad] if p.grad is not None else [])]
            parts += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            bank += sum(t.numel() * t.element_size() for t in parts)
        summary = tuner.selection_summary()
        row.update(
            adapter_bank_bytes=bank,
            adapter_saved_input_bytes=saved,
            adapter_footprint_bytes=bank + saved,
            adapter_footprint_within_budget=bank + saved <= method.budget,
            budget_used=summary.get("budget_used"),
            candidate_layers=summary["candidate_layers"],
            selected_channels=summary["selected_channels"],
        )
    del model, optimizer
    return row


# ------------------------------------------------------------------------------------------ speed
def measure_speed(task: Task, methods: list[Method], lora_targets: list[str], steps: int, warmup: int = 1) -> list:
    """Time per training step, methods interleaved step by step in this process (groups that each
    hold LoRA and full fine-tuning, so both ratios come from the same rounds). Median of ``steps``
    timed rounds after ``warmup``. For the dynamic strategies, also the time of a redraw
    (`trady_peft.next_period`, scoring included for the Det-RGN oracles), median of 3."""
    import trady_peft
    from trady_peft.config import DYNAMIC_STRATEGIES

    references = [m for m in methods if m.name in ("lora", "full")]
    others = [m for m in methods if m.name not in ("lora", "full")]
    group_size = task.speed_group_size
    rows = []
    for start in range(0, len(others), group_size):
        group = references + others[start : start + group_size]
        models, optimizers = {}, {}
        for m in group:
            model = train_mode(build_method(task, m, 0, lora_targets))
            optimizer, _ = make_optimizer(task, model, 10)
            for g in optimizer.param_groups:
                g["lr"] = 0.0  # timing only: the weights do not move (every step costs the same)
            if m.is_trady:
                start_period(model, task, m, optimizer, 0, 0)
            models[m], optimizers[m] = model, optimizer
        times: dict[Method, list[float]] = {m: [] for m in group}
        order = epoch_order(task, 0, 0)
        for i in range(warmup + steps):
            batch = task.batch(order[i % len(order)][: task.speed_batch_size])
            for m in group:
                t0 = time.perf_counter()
                train_step(models[m], batch, optimizers[m])
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[m].append(dt)
        medians = {m: statistics.median(t) for m, t in times.items()}
        for m in group:
            if m in references and start > 0:
                continue
            row = {
                "task": task.name,
                "method": m.name,
                "budget_bytes": m.budget,
                "step_seconds_median": medians[m],
                "timed_steps": len(times[m]),
                "timed_batch_rows": len(batch["labels"]),
                "step_time_ratio_to_lora": medians[m] / medians[references[0]],
                "step_time_ratio_to_full": medians[m] / medians[references[1]],
            }
            if m.name in DYNAMIC_STRATEGIES:
                redraws = []
                for epoch in range(1, 4):
                    t0 = time.perf_counter()
                    start_period(models[m], task, m, optimizers[m], 0, epoch)
                    redraws.append(time.perf_counter() - t0)
                row["redraw_seconds_median"] = statistics.median(redraws)
                row["redraw_to_step_ratio"] = row["redraw_seconds_median"] / medians[m]
            rows.append(row)
        del models, optimizers
    _ = trady_peft
    return rows


def weight_gradient_flops(task: Task, method: Method, lora_targets: list[str], reference: int | None = None) -> int:
    """FLOPs of the backward pass spent on weight derivatives: the backward FLOPs of ``method``
    minus those of the same model with nothing trainable, both with the input (embeddings)
    requiring grad so that the activation-gradient pass is complete and identical in both.
    ``reference``: the frozen model's count, if already known (it is the same for every method).
    TraDy is counted with its memory-saving frozen path off: the attention twin recomputes the
    attention block inside backward, forward FLOPs that are not weight derivatives; the channels
    and their weight derivatives are the same either way."""
    if reference is None:
        reference = frozen_backward_flops(task)
    model = train_mode(build_method(task, method, 0, lora_targets, frozen_path=False))
    if method.is_trady:
        optimizer, _ = make_optimizer(task, model, 10)
        start_period(model, task, method, optimizer, 0, 0)
        model(**task.batch(slice(0, task.batch_size)))  # the probe (first training forward) draws channels
        model.zero_grad(set_to_none=True)
    return max(0, backward_flops(task, model) - reference)


def frozen_backward_flops(task: Task) -> int:
    """Backward FLOPs of the task's model with nothing trainable (only the input requires grad):
    the activation-gradient pass that `weight_gradient_flops` subtracts."""
    frozen = train_mode(task.build())
    for p in frozen.parameters():
        p.requires_grad_(False)
    return backward_flops(task, frozen)


def backward_flops(task: Task, model: nn.Module) -> int:
    """FLOPs of ``backward()`` on one training batch (``torch.utils.flop_counter``), with the input
    (or the embedding output) requiring grad."""
    from trady_peft.compat import flop_counter_without_module_tracking

    batch = dict(task.batch(slice(0, task.batch_size)))
    handle = None
    if task.embeddings is None:
        key = next(k for k in batch if k != "labels")
        batch[key] = batch[key].clone().requires_grad_(True)
    else:
        module = model.get_submodule(task.embeddings) if not hasattr(model, "base_model") else None
        if module is None:
            module = next(m for n, m in model.named_modules() if n.endswith(task.embeddings))
        handle = module.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True))
    try:
        loss = loss_of(model(**batch))
        with flop_counter_without_module_tracking() as counter:  # totals only (no per-module hooks)
            loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops()


def lora_targets_of(task: Task, n_targets: int | None = None) -> list[str]:
    """The target layers peft LoRA r=8 can wrap (TraDy's targets less those it cannot); with
    ``n_targets`` (TraDy's count), a note on the task says how many are left out and why."""
    from trady_peft.report import lora_targets

    probe = build_method(task, Method("trady", 1 << 40), 0, [])  # not trained: only the LoRA-wrappable layers
    lora, skipped = lora_targets(probe, LORA_RANK)
    plain = lora_wrappable(probe.base_model.model, lora)
    del probe
    if n_targets is not None and len(plain) < n_targets:
        task.notes.append(
            f"LoRA wraps {len(plain)} of the {n_targets} target layers: {len(skipped)} grouped convs whose groups "
            f"do not divide r={LORA_RANK}"
            + (f", {len(lora) - len(plain)} TF-same-padded convs" if len(plain) < len(lora) else "")
            + " are left out"
        )
    return plain


def count_flops(task: Task, methods: list[Method], lora_targets: list[str], speed: list[dict]) -> list[str]:
    """Fill ``weight_gradient_flops`` (and its change against full fine-tuning) into each method's
    speed row; returns notes on methods whose count failed."""
    reference = frozen_backward_flops(task)  # the same for every method
    full_flops = weight_gradient_flops(task, Method("full"), lora_targets, reference)
    failed = []
    for m in methods:
        try:
            flops = full_flops if m.name == "full" else weight_gradient_flops(task, m, lora_targets, reference)
        except RuntimeError as error:  # see the note below
            flops = None
            failed.append((m.key, str(error).splitlines()[0]))
        row = next(r for r in speed if r["method"] == m.name and r["budget_bytes"] == m.budget)
        row["weight_gradient_flops"] = flops
        row["weight_gradient_flops_vs_full"] = None if flops is None else flops / full_flops - 1
    if not failed:
        return []
    return [
        f"weight-derivative FLOPs not counted for {len(failed)} methods ({', '.join(k for k, _ in failed)}): "
        f"torch's FlopCounterMode failed on their backward ({failed[0][1]!r})"
    ]


def recount_flops(raw: Path, task: Task, command: str) -> None:
    """Recount the FLOPs of a finished run (``raw/<name>.json``) with this version of
    `count_flops`, recording the command that did (FLOP counts do not depend on timing)."""
    result = json.loads(raw.read_text())
    methods = [Method(r["method"], r["budget_bytes"]) for r in result["speed"]]
    lora = lora_targets_of(task)
    notes = count_flops(task, methods, lora, result["speed"])
    result["notes"] = [n for n in result["notes"] if not n.startswith("weight-derivative FLOPs")] + notes
    result["flops_recounted"] = {"command": command, "date": environment(command, 0)["date"]}
    raw.write_text(json.dumps(result, default=float) + "\n")


# --------------------------------------------------------------------------------------- artifact
def measure_artifact(task: Task, budget: int, epochs: int, lora_targets: list[str]) -> dict:
    """E epochs of TraDy (one training step each: the union of channels does not depend on how long
    a period trains), the union of touched channels and the adapter file after each, against the
    uniform-sampling expectation 1 - prod_e (1 - rho_{l,e}) per layer (rho = the fraction of a
    candidate layer's channels drawn in epoch e)."""
    import trady_peft

    method = Method("trady", budget)
    model = train_mode(build_method(task, method, 0, lora_targets))
    optimizer, _ = make_optimizer(task, model, epochs)
    tuner = trady_peft.find_tuner(model)
    candidates = [n for n, _ in tuner.candidate_layers()]
    layers = dict(tuner.trady_layers("default"))
    widths = {n: layers[n].geometry.in_channels for n in candidates}
    untouched_prob = {n: 1.0 for n in candidates}
    rows = []
    with tempfile.TemporaryDirectory(prefix="trady-bench-") as tmp:
        for epoch in range(epochs):
            start_period(model, task, method, optimizer, 0, epoch)
            rows_idx = epoch_order(task, 0, epoch)[0]
            train_step(model, task.batch(rows_idx), optimizer)
            selected = {n: layers[n].trady_delta["default"].count for n in candidates}
            for n in candidates:
                untouched_prob[n] *= 1 - selected[n] / widths[n]
            touched = sum(layers[n].touched_channels("default") for n in candidates)
            total = sum(widths.values())
            rho = sum(selected.values()) / total
            model.save_pretrained(tmp)
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            rows.append(
                {
                    "epoch": epoch + 1,
                    "selected_channels": sum(selected.values()),
                    "touched_channels": touched,
                    "candidate_channels": total,
                    "touched_fraction": touched / total,
                    "rho": rho,
                    "expected_fraction_uniform": 1 - (1 - rho) ** (epoch + 1),
                    "expected_fraction_per_layer": sum(widths[n] * (1 - untouched_prob[n]) for n in candidates)
                    / total,
                    "adapter_file_bytes": size,
                }
            )
    return {"task": task.name, "budget_bytes": budget, "candidate_layers": len(candidates), "epochs": rows}


# ------------------------------------------------------------------------------------ aggregation
def mean_std(values: Sequence[float]) -> tuple[float, float]:
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


def summarize(records: list[dict]) -> dict:
    """(task, method, budget) -> mean/std of the metric over seeds, with the task's metric name."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["budget_bytes"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        metric = "perplexity" if "perplexity" in rows[0] else "accuracy"
        values = [r[metric] for r in rows]
        diverged = sum(bool(r.get("diverged")) for r in rows)
        out[key] = {"metric": metric, "mean_std": mean_std(values), "seeds": len(values), "diverged": diverged}
    return out


#: A language-model run diverged if its held-out perplexity ends this many times above the
#: untrained model's (or anything became non-finite).
DIVERGENCE_FACTOR = 10.0


def diverged(record: dict, untrained: float | None) -> bool:
    """Whether a run diverged: a non-finite loss or metric, or (perplexity) `DIVERGENCE_FACTOR` times
    the untrained model's."""
    value = record.get("perplexity", record.get("accuracy"))
    if not all(math.isfinite(x) for x in (record["final_train_loss"], value)):
        return True
    return "perplexity" in record and untrained is not None and value > DIVERGENCE_FACTOR * untrained


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


LABELS = {"lora": f"LoRA r={LORA_RANK}", "head": "head only", "full": "full fine-tuning"}


def label(method: str) -> str:
    return LABELS.get(method, method)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def fmt_flops_change(change: float | None) -> str:
    return "not counted" if change is None else f"{100 * change:+.1f}%"


def fmt_metric(mean: float, std: float, metric: str) -> str:
    return f"{mean:.3f} ± {std:.3f}" if metric == "accuracy" else f"{mean:.1f} ± {std:.1f}"


# ------------------------------------------------------------------------------------------ report
def environment(command: str, threads: int) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "datasets", "evaluate", "trady-peft", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions, "python": platform.python_version()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
        },
    }


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


def order_of(method: str) -> int:
    names = list(strategies()) + list(BASELINES)
    return names.index(method) if method in names else len(names)


def write_json(path: Path, env: dict, key: str, rows: Any) -> None:
    path.write_text(json.dumps({**env, key: rows}, indent=1, default=float) + "\n")


# -------------------------------------------------------------------------------------------- run
def run_task(
    task: Task,
    preset: dict,
    log=print,
    seeds: Sequence[int] = SEEDS,
    jobs: int = 1,
    spec: tuple[str, dict] | None = None,
) -> dict:
    """The whole protocol on one task: memory, speed, FLOPs, accuracy grid, artifact.

    ``jobs`` > 1 trains the accuracy grid in that many worker processes (one torch thread each),
    which rebuild the task from ``spec`` = ``(task name, preset sizes)``; everything timed or
    measured step by step (memory, speed, FLOPs) runs in this process before them."""
    t0, c0 = time.perf_counter(), cpu_seconds()

    def since() -> str:
        return f"{time.perf_counter() - t0:.0f} s, CPU {cpu_seconds() - c0:.0f} s"

    targets = target_layers(task)
    lora = lora_targets_of(task, len(targets))
    budgets = task_budgets(task)
    methods = grid(budgets)
    log(
        f"[{task.name}] {len(targets)} target layers, budgets {budgets} B, {len(methods)} methods x {len(seeds)} seeds"
    )
    memory = [measure_memory(task, m, lora) for m in methods]
    log(f"[{task.name}] memory measured ({since()})")
    speed = measure_speed(task, methods, lora, preset["speed_steps"])
    log(f"[{task.name}] speed measured ({since()})")
    task.notes.extend(count_flops(task, methods, lora, speed))
    log(f"[{task.name}] FLOPs counted ({since()})")
    records = []
    mem = {(r["method"], r["budget_bytes"]): r for r in memory}
    spd = {(r["method"], r["budget_bytes"]): r for r in speed}
    untrained = evaluate_model(task, train_mode(task.build()))  # the reference a diverged run ends far above
    runs = [(m, seed) for m in methods for seed in seeds]
    for (m, seed), r in zip(runs, run_grid(task, runs, lora, jobs, spec)):
        k = (m.name, m.budget)
        r["diverged"] = r["diverged"] or diverged(r, untrained)
        r.update(
            saved_activation_bytes=mem[k]["saved_activation_bytes"],
            trainable_state_bytes=mem[k]["trainable_state_bytes"],
            step_time_ratio_to_lora=spd[k]["step_time_ratio_to_lora"],
            step_time_ratio_to_full=spd[k]["step_time_ratio_to_full"],
        )
        records.append(r)
        if seed == seeds[-1]:
            log(f"[{task.name}] {m.key}: {[round(r[task.metric], 4) for r in records[-len(seeds) :]]} ({since()})")
    artifact = measure_artifact(task, budgets[0], preset["artifact_epochs"], lora)
    log(f"[{task.name}] artifact measured ({since()})")
    elapsed = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    log(f"[{task.name}] done: {elapsed}")
    return {
        "records": records,
        "memory": memory,
        "speed": speed,
        "artifact": artifact,
        "elapsed": elapsed,
        "title": task.title,
        "notes": task.notes,
        "lora_targets": len(lora),
        "target_layers": len(targets),
        "budgets": budgets,
        "untrained": untrained,
        "lr": task.lr,
        "max_grad_norm": task.max_grad_norm,
    }


def write_outputs(results: dict[str, dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    records = [r for t in results.values() for r in t["records"]]
    memory = [r for t in results.values() for r in t["memory"]]
    speed = [r for t in results.values() for r in t["speed"]]
    artifacts = [t["artifact"] for t in results.values()]
    titles = {k: t["title"] for k, t in results.items()}
    tasks_meta = {
        k: {
            key: t.get(key)
            for key in (
                "title",
                "notes",
                "lora_targets",
                "target_layers",
                "budgets",
                "untrained",
                "lr",
                "max_grad_norm",
                "elapsed",
                "run",
            )
        }
        for k, t in results.items()
    }
    write_json(out / "accuracy.json", {**env, "tasks": tasks_meta}, "records", records)
    write_json(out / "memory.json", env, "rows", memory)
    write_json(out / "speed.json", env, "rows", speed)
    write_json(out / "artifact.json", env, "runs", artifacts)
    pareto_plot(records, memory, out / "pareto.png", titles)
    artifact_plot(artifacts, out / "artifact.png", titles)
    table = report_markdown(results, env, records, memory, speed, artifacts, titles)
    (out / "table.md").write_text(table)
    preset = env.get("preset", {}).get("name", "quick")
    if out.resolve() == default_output(preset).resolve():
        update_docs_page(DOCS_PAGE, table, preset, out)


DOCS_PAGE = ROOT / "docs" / "benchmarks.md"


def default_output(preset: str) -> Path:
    """Where a preset's results go: docs/benchmarks (quick), docs/benchmarks/<preset> (the others)."""
    return OUT if preset == "quick" else OUT / preset


def markers(preset: str) -> tuple[str, str]:
    """The docs page's markers around a preset's generated tables."""
    name = "bench.py" if preset == "quick" else f"bench.py {preset}"
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def update_docs_page(page: Path, table: str, preset: str = "quick", out: Path = OUT) -> None:
    """Put the generated tables (``<out>/table.md``) between the page's markers for ``preset``."""
    begin, end = markers(preset)
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page} lacks the {begin} ... {end} markers that bench.py fills.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    folder = Path(os.path.relpath(out, page.parent)).as_posix()  # table.md sits next to its plots
    table = table.replace("](pareto.png)", f"]({folder}/pareto.png)").replace(
        "](artifact.png)", f"]({folder}/artifact.png)"
    )
    page.write_text(f"{head}{begin}\n{table}{end}{tail}")


#: Strategies that are not memory-feasible (docs/strategies.md): their scoring computes the dense
#: gradient of every candidate channel, which no budget bounds. Compared, never recommended.
ORACLES = ("d-det-rgn", "s-det-rgn")


def picks(records: list[dict], memory: list[dict]) -> dict[str, list[tuple]]:
    """Per task, the rows worth their memory: from the row with the least measured step memory up,
    each next pick is the cheapest row that beats the previous pick beyond one std (`verdict`).
    Rows that diverged for some seed and the Det-RGN oracles (`ORACLES`) are never picks."""
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


def report_markdown(results, env, records, memory, speed, artifacts, titles) -> str:
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
        "previous pick by more than one std (rows that diverged, and the Det-RGN oracles, whose scoring needs "
        "dense gradients no budget bounds, are left out):",
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


def quiet() -> None:
    """The examples' assets importable; transformers', datasets' and trady_peft's chatter off."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    import logging

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trady_peft").setLevel(logging.ERROR)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
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
    out = Path(args.output_dir) if args.output_dir else default_output(args.preset)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    for name in [] if args.report_only else args.tasks.split(","):
        if name not in TASKS:
            raise SystemExit(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}.")
        if args.recount_flops and not (raw / f"{name}.json").exists():
            raise SystemExit(f"--recount-flops: no results of task {name!r} in {raw}; run the benchmark first.")
        t0 = time.perf_counter()
        task = TASKS[name](preset[name])
        print(f"[{name}] data and model loaded ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.recount_flops:
            recount_flops(raw / f"{name}.json", task, command)
            print(f"[{name}] FLOPs recounted ({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        log = lambda s: print(s, flush=True)  # noqa: E731
        result = run_task(task, preset, log=log, jobs=args.jobs, spec=(name, preset[name]))
        result["run"] = {
            **environment(command, args.threads),
            "preset": args.preset,
            "sizes": preset[name],
            "jobs": args.jobs,
        }
        (raw / f"{name}.json").write_text(json.dumps(result, default=float) + "\n")
    # The report covers every task with results in raw/ (this run's, and earlier runs' of other tasks).
    results = {n: json.loads((raw / f"{n}.json").read_text()) for n in TASKS if (raw / f"{n}.json").exists()}
    env = environment(command, args.threads)
    env["preset"] = {"name": args.preset, **preset}
    env["total"] = {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(cpu_seconds() - cpu, 1),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_outputs(results, env, out)
    print(f"done: {env['total']}", flush=True)
    return results


if __name__ == "__main__":
    main()
