"""Turning a TraDy adapter into a LoRA one, for servers and tools that only load LoRA adapters.

A channel update is a low-rank update, exactly. A Linear layer's TraDy adapter adds ``Δ`` (the
``[out, k]`` deltas of its ``k`` touched input channels ``idx``) to the columns ``W[:, idx]``;
that is ``W + B·A`` with ``A = I[idx]`` (the one-hot rows of ``idx``, ``[k, in]``) and
``B = Δ`` (``[out, k]``). LoRA computes ``base(x) + B(A(x)) · alpha / r``, so with ``r = k`` and
``lora_alpha = k`` the LoRA layer gives what the TraDy layer gives. A transformers ``Conv1D``
stores its weight as ``[in, out]`` and TraDy updates its rows, but peft's LoRA shapes are the
same (``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``; ``fan_in_fan_out=True`` only
transposes the merged delta), so the same ``A`` and ``B`` serve.

Each layer's rank is the number of its input channels ever updated; layers differ, so the
config lists them in ``rank_pattern`` and ``alpha_pattern`` (alpha = rank: scaling 1 in every
layer). The global ``r`` and ``lora_alpha`` are both the largest rank, so a loader that ignores
the patterns and takes each layer's rank from its tensors still scales by exactly 1.

Convolutions are not exported: a convolution channel's slice ``[out, *kernel]`` would need one
LoRA rank per kernel position. ``merge_and_unload()`` is the route for them.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key
from torch import nn

from .core.distributed import unwrapped_name
from .model import find_tuner

WEIGHTS_NAME = "adapter_model.safetensors"


def _lora_factors(indices: torch.Tensor, values: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` = the dense ``[out, in]`` update of channels ``indices``."""
    k = indices.numel()
    a = values.new_zeros(k, in_features)
    a[torch.arange(k, device=a.device), indices.long()] = 1.0
    return a, values.t().contiguous()


def _patterns(ranks: dict[str, int]) -> dict[str, int]:
    """Keys for ``rank_pattern``/``alpha_pattern`` that peft resolves to their own layer only.

    peft reads each key as a regular expression matched against the end of a module name
    (``(.*\\.)?(key)$``) and takes the first key that matches. Full module names match only
    themselves unless one layer's name ends with another's; then every key is anchored
    (``^`` + the escaped name).
    """
    if all(get_pattern_key(list(ranks), name) == name for name in ranks):
        return dict(ranks)
    return {"^" + re.escape(name): r for name, r in ranks.items()}


def export_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    max_rank: int | None = None,
    skip_unsupported: bool = False,
) -> LoraConfig:
    """Write a TraDy adapter as an equivalent stock peft LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors`` in ``path``).

    The result loads with ``peft.PeftModel.from_pretrained(base_model, path)`` without
    ``import trady_peft``, and in serving engines that load LoRA adapters, and gives the same
    outputs as the TraDy model (the current period's delta included): each layer's update
    ``W[:, idx] += Δ`` is written as ``lora_B @ lora_A`` with ``lora_A`` the one-hot rows of the
    touched channels and ``lora_B = Δ``. Each layer's LoRA rank is its number of touched input
    channels (``rank_pattern``), with ``alpha_pattern`` equal to it so that every layer scales by 1;
    layers with no touched channel are left out. ``modules_to_save`` (a classifier head) are
    carried over with their weights.

    Args:
        model: a ``PeftModel`` holding the TraDy adapter (or any module containing its tuner).
        path: directory to write to (created if needed).
        adapter_name: the TraDy adapter to export.
        max_rank: refuse, before writing anything, if a layer has more touched channels than this
            (servers cap the LoRA rank, e.g. vLLM's ``max_lora_rank``).
        skip_unsupported: convolution layers cannot be exported as LoRA (see the module notes);
            by default their presence with updated channels is an error. ``True`` leaves them out
            with a warning, and the exported adapter then differs from the TraDy model in them.

    Returns:
        The ``LoraConfig`` that was saved.

    Raises:
        ValueError: the adapter is merged, has updated convolutions (and ``skip_unsupported`` is
            False), exceeds ``max_rank``, or has nothing to export.
    """
    tuner = find_tuner(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No TraDy adapter named {adapter_name!r}; the model has {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    kinds: set[str] = set()
    convs: list[str] = []
    for name, layer in tuner.trady_layers(adapter_name):
        name = unwrapped_name(name)
        if adapter_name in layer.merged_adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into {name!r}; call unmerge_adapter() before export_lora, "
                "or the exported LoRA would add the update a second time."
            )
        indices, values = layer.fold(adapter_name)
        if not indices.numel():
            continue
        if layer.geometry.kind == "conv":
            convs.append(f"{name} ({indices.numel()} channels)")
            continue
        kinds.add(layer.geometry.kind)
        factors[name] = (indices, values, layer.in_features)

    if convs:
        message = (
            f"export_lora cannot write the updated convolution layers {', '.join(convs)} as LoRA: a convolution "
            "channel's update is a whole [out, *kernel] slice, not a rank-one column. To serve this adapter, merge it "
            "into the base model instead (model.merge_and_unload()) and save that."
        )
        if not skip_unsupported:
            raise ValueError(message + " Pass skip_unsupported=True to export the other layers without them.")
        warnings.warn(message + " They are left out of the exported adapter (skip_unsupported=True).", stacklevel=2)

    ranks = {name: int(indices.numel()) for name, (indices, _, _) in factors.items()}
    if max_rank is not None:
        over = [f"{name}: rank {r} > max_rank {max_rank}" for name, r in ranks.items() if r > max_rank]
        if over:
            raise ValueError(
                f"{len(over)} layer(s) of adapter {adapter_name!r} touch more channels than max_rank={max_rank}, "
                f"so they need a larger LoRA rank; nothing was written. {'; '.join(over)}."
            )

    if not ranks:
        raise ValueError(
            f"Adapter {adapter_name!r} has updated no channel of a layer LoRA can hold: there is nothing to export."
        )

    saved: dict[str, torch.Tensor] = {}
    modules_to_save: list[str] = []
    for name, module in tuner.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            name = unwrapped_name(name)
            modules_to_save.append(name)
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                saved[f"base_model.model.{name}.{key}"] = tensor.detach().cpu().contiguous()

    for name, (indices, values, in_features) in factors.items():
        a, b = _lora_factors(indices.cpu(), values.detach().cpu(), in_features)
        saved[f"base_model.model.{name}.lora_A.weight"] = a
        saved[f"base_model.model.{name}.lora_B.weight"] = b

    top = max(ranks.values())
    lora_config = LoraConfig(
        r=top,
        lora_alpha=top,
        rank_pattern=_patterns(ranks),
        alpha_pattern=_patterns(ranks),
        target_modules=sorted(ranks),
        modules_to_save=sorted(set(modules_to_save) | set(config.modules_to_save or [])) or None,
        # peft sets it per layer anyway; True for transformers Conv1D, for the merged delta's orientation.
        fan_in_fan_out=kinds == {"transposed_linear"},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out))
    save_file(saved, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return lora_config
