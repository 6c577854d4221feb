"""The benchmark tasks: what a task holds (`Task`), the preset sizes, and the three offline tasks.

* ``image``: EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, accuracy;
* ``text``: all-MiniLM-L6-v2 -> Rotten Tomatoes, accuracy;
* ``lm``: SmolLM2-135M-Instruct -> Hamlet, held-out perplexity.

The builders load the assets of examples/offline_assets.py (`trady_bench.environment.quiet` makes
them importable) and the ``datasets`` package, both imported when a task is built.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM


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
        resample_every_steps: under AdamW (the front), a TraDy period lasts this many optimizer steps,
            as with ``TraDyCallback(resample_every_steps=...)`` (None: one period per epoch, as the
            paper's SGD protocol always does).
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
    resample_every_steps: int | None = None
    embeddings: str | None = None
    eval_batch_size: int = 128
    speed_batch_size: int | None = None
    speed_group_size: int = 15
    gradient_batches: int = 2
    exclude: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """The training rows ``rows`` (indices or a slice), every input with its labels."""
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


FRONT_PRESETS = {
    # sizes per task for the front (--protocol adamw); quick ran 15 minutes on 2 idle cores
    # (all three tasks, with FRONT_GRIDS["quick"]), full trains SmolLM2 for 40 steps of 4 x 64 tokens
    "quick": {
        "image": {"train": 192, "test": 400, "size": 32, "epochs": 3, "batch": 32},
        "text": {"train": 64, "test": 400, "length": 24, "epochs": 3, "batch": 16},
        "lm": {"train": 8, "test": 8, "length": 32, "epochs": 4, "batch": 2},
    },
    "full": {
        "image": {"train": 768, "test": 1000, "size": 32, "epochs": 5, "batch": 32},
        "text": {"train": 256, "test": 1000, "length": 32, "epochs": 4, "batch": 16},
        "lm": {"train": 32, "test": 32, "length": 64, "epochs": 5, "batch": 4},
    },
}


def image_task(sizes: dict) -> Task:
    """EfficientNet-Lite0 (ImageNet weights) -> Fashion-MNIST at ``sizes`` (train/test images, size, epochs, batch)."""
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


def text_task(sizes: dict) -> Task:
    """all-MiniLM-L6-v2 -> Rotten Tomatoes at ``sizes`` (train/test snippets, token length, epochs, batch)."""
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

    cache = Path(os.environ.get("TRADY_PEFT_CACHE", Path.home() / ".cache" / "trady-peft")) / "smollm2-135m-fp32"
    if (cache / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32), AutoTokenizer.from_pretrained(cache)
    model, tokenizer = smollm2()
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model, tokenizer


def lm_task(sizes: dict) -> Task:
    """SmolLM2-135M -> Hamlet at ``sizes`` (train/held-out blocks, block length, epochs, batch, speed batch)."""
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
        resample_every_steps=20,  # what docs/strategies.md suggests for a short causal-LM run
        notes=notes,
    )


#: The tasks by name, each built from its preset sizes.
TASKS = {"image": image_task, "text": text_task, "lm": lm_task}
