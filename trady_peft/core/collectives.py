"""The few collectives TraDy runs, each a no-op in a single process.

Prices, statistics and scores are reduced over the ranks before a draw so that every rank draws
the same channels; a bank that FSDP leaves unsharded gets its gradient averaged here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def several_ranks() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any process of a distributed run (``flag`` itself in one process)."""
    if not several_ranks():
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s element-wise maximum over the processes, in place (no-op in one process)."""
    if several_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(tensors: dict[str, torch.Tensor]) -> None:
    """Average tensors in place over the processes of a distributed run (no-op in one process)."""
    if not several_ranks():
        return
    for key in sorted(tensors):
        t = tensors[key]
        work = t.to(torch.float64)
        dist.all_reduce(work)
        t.copy_(work / dist.get_world_size())


def average_gradient(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: replace ``param.grad`` by its mean over the ranks (no-op alone)."""
    if param.grad is None or not several_ranks():
        return
    dist.all_reduce(param.grad)  # SUM: gloo has no AVG
    param.grad.div_(dist.get_world_size())
