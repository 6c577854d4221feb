"""Where each adapter's bank lives under FSDP2 (``fully_shard``), and who averages its gradient.

Decision (docs/distributed.md): the bank is **left out of FSDP's sharding** and kept whole on
every rank; TraDy averages its gradient over the ranks itself, once per backward pass.

Why: the bank is one flat fp32 vector read by every TraDy layer through ``narrow`` views, and it
is touched outside forward/backward at every period change (fold, zero, install, optimizer
reset), by MeDyate's gradient hook and by every save. Sharded, it becomes a ``DTensor`` outside
forward (each rank holds a slice), FSDP replaces the ``nn.Parameter`` object (so hooks registered
on it stop firing), and every one of those operations would need a collective. Whole, every
period operation stays local and identical on all ranks, and a save needs no collective (rank 0
alone may save). The cost is memory: each rank holds the whole bank, its gradient and its
optimizer state (16 bytes per value with AdamW) instead of a ``1/world`` share of it. The bank is
the ``bank_share`` part of the byte budget, so the extra memory per rank is at most
``(1 - 1/world) * bank_share * memory_budget`` (see docs/distributed.md for figures).

How: FSDP2 shards every parameter of the modules it is applied to unless the parameter is in
``ignored_params``. Pass `fsdp_ignored_params` to each ``fully_shard`` call, or
`fsdp_ignored_modules` to accelerate's ``FullyShardedDataParallelPlugin(ignored_modules=...)``;
both also switch on the gradient averaging (a post-accumulate-grad hook on each bank). A
sharded bank, or an FSDP model whose bank nobody averages, is refused with an error naming the
fix (`check_bank_placement`), before the ranks can drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The TraDy banks of ``model``, for ``fully_shard(..., ignored_params=...)`` (FSDP2).

    Also makes TraDy average each bank's gradient over the ranks after every backward pass,
    which FSDP no longer does for them. Call it on the ``PeftModel`` before ``fully_shard``, and
    pass the result to every ``fully_shard`` call whose module contains the adapter::

        ignored = trady_peft.fsdp_ignored_params(model)
        for block in model.base_model.model.model.layers:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
    """
    return {module.weight for module in fsdp_ignored_modules(model)}


def fsdp_ignored_modules(model: nn.Module) -> list[nn.Module]:
    """The TraDy bank modules of ``model``, for accelerate's FSDP2 plugin.

    ``FullyShardedDataParallelPlugin(fsdp_version=2, ignored_modules=trady_peft.fsdp_ignored_modules(model))``
    (accelerate turns the modules into ``ignored_params``). Like `fsdp_ignored_params`, it makes
    TraDy average the banks' gradients over the ranks.
    """
    from .model import find_tuner

    tuner = find_tuner(model)
    tuner.average_bank_gradients()
    return list(tuner.channel_bank.values())


def average_gradient(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: replace ``param.grad`` by its mean over the ranks (no-op alone)."""
    if param.grad is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    dist.all_reduce(param.grad)  # SUM: gloo has no AVG
    param.grad.div_(dist.get_world_size())


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (what FSDP2 turns the parameters it shards into)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def fsdp_managed(model: nn.Module) -> bool:
    """Whether FSDP2 shards part of ``model``: a ``fully_shard``-ed submodule or a ``DTensor`` parameter."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(is_sharded(p) for p in model.parameters())


_FIX = (
    "Leave the TraDy bank out of FSDP: call fully_shard(..., ignored_params=trady_peft.fsdp_ignored_params(model)) "
    "on every fully_shard call, or with accelerate FullyShardedDataParallelPlugin(fsdp_version=2, "
    "ignored_modules=trady_peft.fsdp_ignored_modules(model)), before the model is sharded (docs: Distributed and "
    "quantized)."
)


def check_bank_placement(tuner: nn.Module, when: str) -> None:
    """Refuse a bank FSDP sharded, or an FSDP run whose banks nobody averages (see the module docstring)."""
    banks = getattr(tuner, "channel_bank", {})
    for name, bank in banks.items():
        if is_sharded(bank.weight):
            raise RuntimeError(
                f"FSDP sharded adapter {name!r}'s TraDy bank (channel_bank.{name}.weight, {when}); TraDy keeps the "
                f"bank whole on every rank. {_FIX}"
            )
    if banks and not tuner._average_bank_grads and fsdp_managed(tuner.model):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"This model is sharded with FSDP, but its TraDy bank was not prepared for it ({when}): sharded, FSDP "
                "would split the bank; left out of FSDP by hand, nobody would average its gradient and every rank "
                f"would train its own adapter. {_FIX}"
            )
