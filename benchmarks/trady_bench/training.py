"""How every method trains: batch-norm statistics frozen, the paper's SGD and schedule, one period
per epoch (`trady_peft.next_period`), a training step, and the test metric."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

import trady_peft

from .environment import examples_importable
from .tasks import Task


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


#: The optimizers a protocol trains with, and the state each keeps per trained value (bytes), which
#: TraDy's byte budget counts (`TraDyConfig.optimizer_state_bytes`).
OPTIMIZER_STATE_BYTES = {"sgd": 0, "adamw": 8}


#: AdamW's rate for a fresh classifier head (``Task.head``) under every method that also trains
#: other weights: the rate the head-only point's sweep chose on the image and the text task
#: (1e-4 to 1e-1 tried). A fresh head trained at a body's rate (1e-3 to 1e-2) stays underfit, and
#: more so at the larger budgets, whose sweeps pick smaller rates.
HEAD_LR = 3e-2


def head_parameters(task: Task, model: nn.Module) -> set[int]:
    """The ids of ``model``'s trainable parameters that belong to the task's fresh head (none on a
    language model): those under ``task.head``, wrapped by peft's ``modules_to_save`` or not."""
    if task.head is None:
        return set()
    return {id(p) for n, p in model.named_parameters() if p.requires_grad and f"{task.head}." in n}


def make_optimizer(
    task: Task,
    model: nn.Module,
    total_steps: int,
    optimizer: str = "sgd",
    lr: float | None = None,
    head_lr: float | None = None,
):
    """The optimizer over the trainable parameters, with cosine decay and a linear warm-up over
    ``task.warmup`` of ``total_steps``: the paper's plain SGD (no momentum, no weight decay), or
    AdamW (torch's defaults); the learning rate ``lr`` (None: ``task.lr``), and ``head_lr`` for the
    parameters of the task's fresh head (None: ``lr`` too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = task.lr if lr is None else lr
    head = head_parameters(task, model) if head_lr is not None else set()
    if head and len(head) < len(params):
        params = [
            {"params": [p for p in params if id(p) not in head], "lr": lr},
            {"params": [p for p in params if id(p) in head], "lr": head_lr},
        ]
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    elif optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr)
    else:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZER_STATE_BYTES)}.")
    warmup = max(1, round(task.warmup * total_steps))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def epoch_order(task: Task, seed: int, epoch: int) -> list[torch.Tensor]:
    """The training rows of ``epoch``, shuffled by ``(seed, epoch)`` and split into batches."""
    n = len(task.train["labels"])
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(task.batch_size))


def start_period(model: nn.Module, task: Task, optimizer, seed: int, epoch: int, period: int | None = None) -> None:
    """Start TraDy period ``period`` (None: ``epoch``; `trady_peft.next_period`); the strategies that
    score channels (the Det-RGN strategies) score it on the first batches of ``epoch``."""
    batches = (task.batch(rows) for rows in epoch_order(task, seed, epoch))  # read only by a scoring strategy
    trady_peft.next_period(model, optimizer, batches=batches, period=epoch if period is None else period)


def starts_period(task: Task, optimizer: str, step: int, batch_in_epoch: int) -> bool:
    """Whether a TraDy period starts before optimizer step ``step`` (the ``batch_in_epoch``-th of its
    epoch): every ``task.resample_every_steps`` steps under AdamW where the task sets it, else at the
    first batch of each epoch."""
    every = task.resample_every_steps if optimizer == "adamw" else None
    return step % every == 0 if every else batch_in_epoch == 0


def loss_of(output) -> torch.Tensor:
    """The loss of a model's output (a dict or a ``ModelOutput``)."""
    return output["loss"] if isinstance(output, dict) else output.loss


def train_step(model, batch, optimizer, scheduler=None, max_grad_norm: float | None = None) -> float:
    """One optimizer step on ``batch`` (clipped to ``max_grad_norm``); returns the loss."""
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

        examples_importable()
        from offline_assets import ACCURACY

        metric = evaluate.load(str(ACCURACY))
        for rows in chunks:
            batch = {k: v[rows] for k, v in task.test.items() if k != "labels"}
            logits = model(**batch)["logits"]
            metric.add_batch(predictions=logits.argmax(-1), references=task.test["labels"][rows])
        return float(metric.compute()["accuracy"])
    finally:
        train_mode(model)
