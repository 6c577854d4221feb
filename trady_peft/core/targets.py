"""Which layers TraDy wraps when ``target_modules`` is left at its default.

Every supported layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, transformers ``Conv1D``) except
the output heads (the output embedding and sequence-classification heads, which train in full
through ``modules_to_save`` as in the paper), anything under ``modules_to_save``, and layers that
``layers_to_transform`` / ``layers_pattern`` leave out -- the same selectors peft applies to
explicit targets.
"""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import SEQ_CLS_HEAD_NAMES
from .geometry import SUPPORTED_LAYER_TYPES
from .layer import TraDyLayer


def output_heads(model: nn.Module) -> set[int]:
    """``id()`` of every module that is part of an output head of ``model``."""
    heads: set[int] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_emb = get_output() if callable(get_output) else None
    if isinstance(output_emb, nn.Module):
        heads.add(id(output_emb))
    for name in SEQ_CLS_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            heads.update(id(m) for m in head.modules())
    return heads


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in ``name`` (the first numbered segment, or the one after ``layers_pattern``),
    read the way peft reads it for ``layers_to_transform``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def in_layers_to_transform(name: str, config) -> bool:
    """Whether ``name`` passes ``config.layers_to_transform`` (always true when it is unset)."""
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _under(name: str, prefixes: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[i:j]) in prefixes for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))


def default_targets(model: nn.Module, config) -> list[str]:
    """Qualified names of the layers TraDy wraps by default (see the module docstring)."""
    heads = output_heads(model)
    saved = set(config.modules_to_save or [])
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (*SUPPORTED_LAYER_TYPES, TraDyLayer)) or id(module) in heads:
            continue
        if _under(name, saved) or not in_layers_to_transform(name, config):
            continue
        if any(isinstance(m, BaseTunerLayer) for m in _ancestors(model, name)):
            continue
        names.append(name)
    return names


def _ancestors(model: nn.Module, name: str):
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        yield module


def names_match(name: str, wanted: str) -> bool:
    """Whether the qualified layer ``name`` is ``wanted`` or ends with it (a suffix match)."""
    return name == wanted or name.endswith("." + wanted)


def depth_blocks(names: list[str]) -> list[list[str]]:
    """``names`` (target layers in module order) grouped into blocks, from the input to the output.

    A block is a run of consecutive layers sharing the part of their name up to the first number
    (``model.layers.4``, ``encoder.layer.3``, ``features.12``); a layer without a number in its
    name is a block of its own. ``TraDyConfig.max_depth`` counts these blocks from the output.
    """
    blocks: list[list[str]] = []
    previous = None
    for name in names:
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[: cut + 1]) if cut is not None else name
        if blocks and key == previous:
            blocks[-1].append(name)
        else:
            blocks.append([name])
        previous = key
    return blocks
