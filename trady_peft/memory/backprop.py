"""Backprop stops at the lowest trained layer.

Nothing below the lowest layer that trains needs a gradient, so nothing there should be kept for
backward. With the frozen-path twins (`trady_peft.memory.frozen_path`) that already holds as long as no
tensor below requires grad: a frozen module whose input does not require grad records nothing.

One common setting breaks it: transformers' ``enable_input_require_grads`` (called by peft's
``get_peft_model`` when the model has gradient checkpointing on, and by every
``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` of a text model, hence by
the Trainer's ``gradient_checkpointing=True``) makes the input embeddings' output require grad.
Then every frozen module between the embeddings and the lowest trained layer keeps its inputs
(measured on a two-block Llama: its lower block kept as much as the upper one). LoRA needs that
hook under reentrant checkpointing: a checkpointed block whose inputs do not require grad gives
its parameters no gradient. TraDy does not need it below its lowest trained block, so
`BackpropStop` undoes it there:

* in training, the input embeddings' output is detached when it requires grad only because
  transformers' ``enable_input_require_grads`` hook (or peft's copy of it) said so: a leaf, the
  embedding's own weights do not train (a trained embedding, e.g. in ``modules_to_save``, keeps its
  gradient), and the model's blocks are transformers ``GradientCheckpointingLayer``s (so that the
  next point can repair a reentrant checkpoint). A hook of the user's own (saliency, attribution),
  eval mode, or blocks checkpointed some other way leave the output as it is;
* the first block that trains (a transformers ``GradientCheckpointingLayer`` holding selected
  channels or a trainable parameter) gets an input that requires grad if it runs under torch's
  *reentrant* checkpoint and its input does not: exactly what that block needs, nothing below it.

What stays: under gradient checkpointing, each checkpointed block from the lowest trained one up
keeps its input (the checkpoint's price, paid by LoRA in every block).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import has_require_grad_hook, reentrant_checkpointing, run_forward_hook_last


def _checkpoint_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without it
        return None
    return GradientCheckpointingLayer


class BackpropStop:
    """Hooks of one tuner that keep gradients from reaching below the lowest trained block.

    Args:
        model: the base model (``tuner.model``).
        trains: ``trains(module)`` says whether anything inside ``module`` trains this period
            (selected channels of an active adapter, or a parameter that requires grad).
    """

    def __init__(self, model: nn.Module, trains):
        self.trains = trains
        self.embedding, self.handles = None, []
        get = getattr(model, "get_input_embeddings", None)
        try:
            embedding = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            embedding = None
        if isinstance(embedding, nn.Module):
            self.embedding = embedding
            self.embedding_handle = embedding.register_forward_hook(self._embedding_output)
            self.handles.append(self.embedding_handle)
        layer_cls = _checkpoint_layer_class()
        blocks = [m for m in model.modules() if isinstance(m, layer_cls)] if layer_cls is not None else []
        for module in blocks:
            self.handles.append(module.register_forward_pre_hook(self._block_input, with_kwargs=True))
        # Only a model whose blocks are transformers checkpoint layers gets its embedding output
        # detached: `_block_input` can then hand the lowest trained block the grad-requiring input a
        # reentrant checkpoint needs. Blocks checkpointed some other way keep the hook's effect.
        self.repairs_blocks = bool(blocks)

    def before_forward(self) -> None:
        """Called at each top-level forward: run the embedding hook after any registered since."""
        if self.embedding is not None:
            run_forward_hook_last(self.embedding, self.embedding_handle)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ----------------------------------------------------------------------------- hooks
    def _embedding_output(self, module, args, output):
        if (
            self.repairs_blocks
            and module.training
            and isinstance(output, torch.Tensor)
            and torch.is_grad_enabled()
            and output.requires_grad
            and output.grad_fn is None  # a leaf: made to require grad by a hook, not by trained weights
            and not any(p.requires_grad for p in module.parameters())
            and has_require_grad_hook(module)  # transformers' or peft's hook, not a user's own
        ):
            return output.detach()
        return None

    def _block_input(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)):
            return None
        hidden = args[0]
        if hidden.requires_grad or not hidden.is_floating_point() or not reentrant_checkpointing(module):
            return None
        if not self.trains(module):
            return None
        # The lowest trained block under reentrant checkpoint: its parameters get gradients only if
        # one of its inputs requires grad.
        return (hidden.detach().requires_grad_(True), *args[1:]), kwargs
