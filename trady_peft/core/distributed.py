"""Where each adapter's bank lives under FSDP2 (``fully_shard``), and who averages its gradient.

Decision (docs/distributed.md): the bank is **left out of FSDP's sharding** and kept whole on
every rank; TraDy averages its gradient over the ranks itself, once per backward pass.

Why: the bank is one flat fp32 vector read by every TraDy layer through views (one split), and it
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

import contextlib

import torch
from torch import nn

from ..compat import has_zero_master, is_zero3_param
from .bank import DeltaBank
from .collectives import several_ranks


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
    banks = [m for m in model.modules() if isinstance(m, DeltaBank)]
    if not banks:
        raise ValueError(
            f"No TraDy adapter found in this {type(model).__name__}: create it with "
            "peft.get_peft_model(model, trady_peft.TraDyConfig(...)) before sharding it."
        )
    for bank in banks:
        bank.average_gradients()
    return banks


def unwrapped_name(name: str) -> str:
    """A module or state-dict name without the prefix an FSDP wrapper adds (``_fsdp_wrapped_module.``)."""
    return name.removeprefix("_fsdp_wrapped_module.")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (what FSDP2 turns the parameters it shards into)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def fsdp_managed(model: nn.Module) -> bool:
    """Whether FSDP2 shards part of ``model``: a ``fully_shard``-ed submodule or a ``DTensor`` parameter."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(is_sharded(p) for p in model.parameters())


def zero3_managed(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``model``'s parameters."""
    return any(is_zero3_param(p) for p in model.parameters())


_FIX = (
    "Leave the TraDy bank out of FSDP: call fully_shard(..., ignored_params=trady_peft.fsdp_ignored_params(model)) "
    "on every fully_shard call, or with accelerate FullyShardedDataParallelPlugin(fsdp_version=2, "
    "ignored_modules=trady_peft.fsdp_ignored_modules(model)), before the model is sharded (docs: Distributed and "
    "quantized)."
)


def refuse_sharded_bank(name: str, weight: torch.Tensor, when: str) -> None:
    """Raise the error naming the fix when FSDP sharded adapter ``name``'s bank ``weight``."""
    if is_sharded(weight):
        raise RuntimeError(
            f"FSDP sharded adapter {name!r}'s TraDy bank (trady_bank.{name}.weight, {when}); TraDy keeps the "
            f"bank whole on every rank. {_FIX}"
        )


def check_bank_placement(banks: dict, model: nn.Module, when: str) -> None:
    """Refuse a bank FSDP sharded, or an FSDP run whose banks nobody averages (see the module docstring).

    ``banks`` maps adapter names to their `trady_peft.core.bank.DeltaBank`; ``model`` is the wrapped model.
    """
    for name, bank in banks.items():
        refuse_sharded_bank(name, bank.weight, when)
    averaged = all(bank.averages_gradients for bank in banks.values())
    if banks and several_ranks() and not averaged and fsdp_managed(model):
        raise RuntimeError(
            f"This model is sharded with FSDP, but its TraDy bank was not prepared for it ({when}): sharded, FSDP "
            "would split the bank; left out of FSDP by hand, nobody would average its gradient and every rank "
            f"would train its own adapter. {_FIX}"
        )


# ----------------------------------------------------------------------------- DeepSpeed ZeRO
# DeepSpeed partitions (ZeRO-3) or keeps an fp32 master copy of (ZeRO-1/2/3) every trainable
# parameter, the bank included, and its optimizer state lives in DeepSpeed's flat buffers. A period
# change must therefore read the bank gathered, zero the master copy as well as the parameter, and
# reset the moments through DeepSpeed's public accessors (deepspeed.utils.safe_*).


def bank_numel(weight: torch.Tensor) -> int:
    """Values in a bank, also while ZeRO-3 partitions it (``numel()`` is then 0)."""
    return int(getattr(weight, "ds_numel", weight.numel())) if is_zero3_param(weight) else weight.numel()


@contextlib.contextmanager
def gathered(weight: torch.Tensor, modify: bool = False):
    """The whole bank for the duration (ZeRO-3: all ranks must enter; with ``modify``, rank 0's values
    are kept). A no-op for any other parameter."""
    if not is_zero3_param(weight):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0 if modify else None):
        yield


def zero_bank(weight: torch.Tensor) -> None:
    """Zero a bank in place, and DeepSpeed's fp32 master copy of it (else the next step restores it)."""
    with torch.no_grad(), gathered(weight, modify=True):
        weight.zero_()
    if has_zero_master(weight):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(weight, torch.zeros(bank_numel(weight), dtype=torch.float32, device=weight.device))


def reset_deepspeed_state(weight: torch.Tensor, segments: list[tuple[int, int]]) -> int:
    """Zero DeepSpeed's optimizer state (e.g. Adam's moments) of ``weight[start:stop]`` for each segment.

    No bias-correction fix (DeepSpeed's step counter is per parameter group): the first updates of a
    re-targeted entry are those of an optimizer at step ``t``, not 1. Returns the states touched.
    """
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    touched = 0
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        try:  # deepspeed 0.19.8 raises ValueError (stages 1-2) or KeyError (stage 3) for a key it lacks,
            # and TypeError at stages 1-2 before the first optimizer step (no state yet: the Trainer's
            # callback attaches the optimizer before the first draw)
            state = safe_get_full_optimizer_state(weight, key)
        except (KeyError, ValueError, TypeError):
            continue
        if state is None:
            continue
        for start, stop in segments:
            state.view(-1)[start:stop].zero_()
        safe_set_full_optimizer_state(weight, state, key)
        touched += 1
    return touched


def register_zero3_bank(weight: torch.Tensor, layers) -> None:
    """Tell ZeRO-3 that every TraDy layer in ``layers`` reads the bank ``weight`` in its forward (the
    bank's own forward never runs, so DeepSpeed would not gather it). Idempotent."""
    if not is_zero3_param(weight) or getattr(weight, "_trady_external", False):
        return
    import deepspeed

    for layer in layers:
        deepspeed.zero.register_external_parameter(layer, weight)
    weight._trady_external = True


@contextlib.contextmanager
def bank_for_saving(weight: torch.Tensor, consolidated: torch.Tensor | None):
    """The whole bank while an adapter file is written.

    Under ZeRO-3 the Trainer saves from a consolidated state dict (gathered on every rank, written
    by rank 0): its copy of the bank is used when it is whole, without a collective. Otherwise the
    bank is gathered, which every rank must do (call ``save_pretrained`` on all ranks)."""
    if not is_zero3_param(weight) or weight.numel() == bank_numel(weight):
        yield
        return
    if consolidated is not None and consolidated.numel() == bank_numel(weight):
        partition = weight.data
        weight.data = consolidated.to(weight.dtype).view(-1)
        try:
            yield
        finally:
            weight.data = partition
        return
    with gathered(weight):
        yield
