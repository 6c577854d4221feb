"""Weight-derivative FLOPs of a training step (``torch.utils.flop_counter``), per method and
against full fine-tuning."""

from __future__ import annotations

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .methods import Method, build_method
from .tasks import Task
from .training import loss_of, make_optimizer, start_period, train_mode


class _GlobalModuleTracker:
    """Stands in for torch's ``ModuleTracker`` inside a ``FlopCounterMode``: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def flop_counter_without_module_tracking() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that counts totals only.

    Its module tracker hooks every module call, including those TraDy's frozen path makes inside
    ``backward()`` (a recomputation differentiated with ``torch.autograd.grad``), where its
    multi-grad hooks raise on leaf inputs. Relies on a private detail of torch 2.x: the counter's
    ``mod_tracker`` attribute, whose ``parents`` set names where each count goes, is replaced by
    one that names only "Global", the entry ``get_total_flops()`` reads.
    """
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalModuleTracker()
    return counter


def backward_flops(task: Task, model: nn.Module) -> int:
    """FLOPs of ``backward()`` on one training batch (``torch.utils.flop_counter``), with the input
    (or the embedding output) requiring grad."""
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


def frozen_backward_flops(task: Task) -> int:
    """Backward FLOPs of the task's model with nothing trainable (only the input requires grad):
    the activation-gradient pass that `weight_gradient_flops` subtracts."""
    frozen = train_mode(task.build())
    for p in frozen.parameters():
        p.requires_grad_(False)
    return backward_flops(task, frozen)


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
        start_period(model, task, optimizer, 0, 0)
        model(**task.batch(slice(0, task.batch_size)))  # the probe (first training forward) draws channels
        model.zero_grad(set_to_none=True)
    return max(0, backward_flops(task, model) - reference)


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
