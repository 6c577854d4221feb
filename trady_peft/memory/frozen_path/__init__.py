"""The frozen path: modules between the loss and the lowest trained channel, swapped for twins
that keep only what the input gradient needs.

* `cnn`: convolutions, batch norms and ReLU-family activations;
* `transformers`: gated MLPs, formula activations, dropouts and RMS norms;
* `attention`: attention blocks, recomputed in backward;
* `loss`: a causal LM's frozen head with its cross-entropy, fused;
* `common`: what the twins share.

`apply_memory_saving` swaps every frozen module of a model for its twin; `restore` undoes it.
"""

from __future__ import annotations

from torch import nn

from ...core.layer import trady_layers
from .cnn import ORIGINALS, REPLACEMENTS
from .loss import apply_fused_loss, restore_loss
from .transformers import original_class, twin_class


def apply_memory_saving(model: nn.Module) -> list[str]:
    """Swap every frozen ReLU-family, batch-norm and convolution module of ``model``, and the
    transformers frozen-path modules of `trady_peft.memory.frozen_path.transformers` (gated MLPs,
    formula activations, dropouts), for its memory-saving twin, in place; a causal LM's frozen
    output embedding and its cross-entropy get `trady_peft.memory.frozen_path.loss`'s fused loss. Returns
    the names of the swapped modules."""
    inside_tuner = {id(m) for _, layer in trady_layers(model) for m in layer.modules()}
    swapped = []
    for name, module in model.named_modules():
        new_cls = REPLACEMENTS.get(type(module))
        if new_cls is None and id(module) not in inside_tuner:
            new_cls = twin_class(module)  # None for a module whose own parameters train
        if new_cls is None or id(module) in inside_tuner:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # a module that trains keeps PyTorch's own backward
        module.__class__ = new_cls
        swapped.append(name)
    return swapped + apply_fused_loss(model, inside_tuner)


def restore(model: nn.Module) -> int:
    """Undo `apply_memory_saving`. Returns the number of modules restored."""
    count = restore_loss(model)
    for module in model.modules():
        original = ORIGINALS.get(type(module)) or original_class(module)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_trady_geometry", None)
            count += 1
    return count
