"""A frozen LM head whose cross-entropy never keeps the logits for backward.

A causal LM's stock loss path, ``logits = lm_head(hidden)`` then ``loss_function(logits, labels)``
(transformers' ``ForCausalLMLoss``: ``logits.float()``, labels shifted by one, ``ignore_index=-100``,
mean or sum / ``num_items_in_batch``), keeps the fp32 log-softmax of the whole ``[tokens, vocab]``
logits for backward: on a small-vocabulary Llama already a sixth of a TraDy step's saved activations.
With a frozen head, the gradient w.r.t. the hidden states is all backward needs, and it is
``(softmax - onehot) @ W / n``, a ``[tokens, hidden]`` tensor, computable in the forward.

Two pieces, applied by `trady_peft.memory.frozen_path.apply_memory_saving` to every transformers model
whose output embedding is a frozen ``nn.Linear`` and whose ``loss_function`` is ``ForCausalLMLoss``
(by class and loss path, not by model name), undone by `restore`:

* the head becomes `FrozenPathLMHead`: the same logits, whose autograd keeps only the (resident)
  weight, and which carry a reference to their input hidden states and the head;
* the model instance's ``loss_function`` (the property's setter, an instance attribute) becomes
  `FusedCausalLMLoss`: given such logits, unchanged since the head made them, it computes the
  loss and the hidden-state gradient chunk by chunk over tokens from those logits, and keeps only
  the gradient (`_FusedCrossEntropy`); any other logits (soft-capped, scaled, of another head) go to
  the original loss function.

``outputs.logits`` stay what they were, with a working gradient for a caller who uses them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import causal_lm_loss, loss_function_of
from .common import trains

#: logits elements handled at once by the fused loss (a chunk of tokens x vocab, fp32: 16 MiB).
CHUNK_ELEMENTS = 2**22

_TAG = "_trady_lm_head_input"


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a frozen weight: keeps the weight only (no input)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)  # under the caller's autocast, as the stock head
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad @ weight.to(grad.dtype)).to(ctx.x_dtype), None, None


class _FusedCrossEntropy(torch.autograd.Function):
    """``ForCausalLMLoss`` on ``logits = head(hidden)`` whose backward keeps only ``d loss / d hidden``.

    ``logits`` (already computed, not differentiated) are read chunk by chunk; ``hidden`` only
    connects the loss to the graph and gives the gradient's shape and dtype.
    """

    @staticmethod
    def forward(ctx, hidden, logits, weight, labels, ignore_index: int, scale):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        labels = labels.reshape(-1)
        grad = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device).view(-1, hidden.shape[-1])
        w = weight.to(logits.dtype)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, flat.shape[0], step):
            z = flat[start : start + step].float()  # ForCausalLMLoss upcasts the logits
            y = labels[start : start + step]
            valid = y != ignore_index
            target = torch.where(valid, y, 0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1)
            total += ((lse - z.gather(1, target).squeeze(1)) * valid).sum()
            g = torch.exp(z - lse.unsqueeze(1))
            g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
            g *= torch.where(valid, scale, 0.0).unsqueeze(1)  # no 0 * inf when nothing counts
            # the stock backward: the fp32 gradient back in the logits' dtype, then through the head
            grad[start : start + step] = (g.to(logits.dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).view(ctx.shape), None, None, None, None, None


class FrozenPathLMHead(nn.Linear):
    """A frozen output embedding: the stock logits, whose autograd keeps no activation, tagged for
    `FusedCausalLMLoss`."""

    _trady_original = nn.Linear

    def forward(self, x):
        weight, bias = self.weight, self.bias
        trains = weight.requires_grad or (bias is not None and bias.requires_grad)
        if trains or not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        logits = _FrozenLinear.apply(x, weight, bias)
        setattr(logits, _TAG, (x, weight, logits._version))
        return logits


class FusedCausalLMLoss:
    """``ForCausalLMLoss`` that, for logits made by a `FrozenPathLMHead`, keeps no logits for backward.

    Same arguments, value and gradients as ``original``, to which anything else goes.
    """

    def __init__(self, original):
        self.original = original

    def __call__(
        self,
        logits,
        labels,
        vocab_size: int,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels=None,
        **kwargs,
    ):
        loss = self._fused(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        if loss is not None:
            return loss
        return self.original(
            logits,
            labels,
            vocab_size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            **kwargs,
        )

    @staticmethod
    def _fused(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels):
        """The fused loss, or None where the original must run (untagged or changed logits, a
        shape the stock loss would reject)."""
        tag = getattr(logits, _TAG, None)
        if tag is None or not torch.is_grad_enabled() or logits.shape[-1] != vocab_size:
            return None
        hidden, weight, version = tag
        if logits._version != version or hidden.shape[:-1] != logits.shape[:-1]:
            return None
        targets = shift_labels
        if targets is None:  # shift so that tokens < n predict n
            targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = targets.reshape(-1).to(logits.device)
        if targets.numel() != logits.numel() // vocab_size:
            return None
        if num_items_in_batch is None:
            scale = 1.0 / (targets != ignore_index).sum().float()
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(logits.device)
            scale = 1.0 / torch.as_tensor(num_items_in_batch, device=logits.device).float()
        return _FusedCrossEntropy.apply(hidden, logits.detach(), weight, targets, ignore_index, scale)


def apply_fused_loss(model: nn.Module, skip: set[int]) -> list[str]:
    """Give every causal LM in ``model`` with a frozen ``nn.Linear`` output embedding (not in ``skip``,
    ids of modules a tuner owns) the `FrozenPathLMHead` and `FusedCausalLMLoss`. Returns the heads'
    names."""
    stock_loss = causal_lm_loss()
    names = {m: n for n, m in model.named_modules()}
    swapped = []
    for module in model.modules():
        get_head = getattr(module, "get_output_embeddings", None)
        if stock_loss is None or get_head is None or not hasattr(type(module), "loss_function"):
            continue
        try:
            head, loss_function = get_head(), loss_function_of(module)
        except Exception:  # noqa: BLE001 - a model without a head or a loss mapping keeps its own
            continue
        if type(head) is not nn.Linear or id(head) in skip or trains(head):
            continue
        if loss_function is not stock_loss:
            continue  # another loss (or already fused): the stock path
        previous = module.__dict__.get("_loss_function", _ABSENT)
        module.loss_function = FusedCausalLMLoss(loss_function)
        module.__dict__["_trady_previous_loss_function"] = previous
        head.__class__ = FrozenPathLMHead
        swapped.append(names.get(head, ""))
    return swapped


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"

    def __reduce__(self):
        return "_ABSENT"


_ABSENT = _Absent()


def restore_loss(model: nn.Module) -> int:
    """Undo `apply_fused_loss`'s ``loss_function`` wrappers (the heads are restored with the other
    twins). Returns how many were undone."""
    count = 0
    for module in model.modules():
        if not isinstance(module.__dict__.get("_loss_function"), FusedCausalLMLoss):
            continue
        previous = module.__dict__.pop("_trady_previous_loss_function", _ABSENT)
        if previous is _ABSENT:
            del module.__dict__["_loss_function"]
        else:
            module.__dict__["_loss_function"] = previous
        count += 1
    return count
