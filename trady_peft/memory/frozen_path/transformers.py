"""Memory-saving twins for the frozen path of transformers models.

Measured on a Llama-style model, most of what autograd keeps for backward belongs to frozen
modules whose backward needs much less:

* a gated MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, keeps the gate ``g`` (for the
  activation's derivative) and then ``act(g)`` and ``u`` again for the product: three tensors of
  the intermediate size, where ``g`` and ``u`` suffice (``act(g)`` and ``act'(g)`` are recomputed);
* activations written as Python formulas (``NewGELUActivation``, GPT-2's default, and the other
  ``gelu_new``-style ones) keep every intermediate of the formula, where the input suffices;
* a dropout keeps its mask as one float (CPU) or one byte (CUDA) per element, where one bit does;
* an RMSNorm of a bf16/fp16 model keeps the float32 upcast of its input (twice the input), where
  the input suffices (its twin recomputes the norm in backward). In float32 it keeps the input and
  the per-row rsqrt, and the twin saves only the rsqrt. ``nn.LayerNorm`` keeps input, mean and
  rstd already: no twin.

The twins below compute the same outputs with the same operations (and the same random draw for
dropout), give the same input gradients, and keep only that. Like the CNN twins of
`trady_peft.memory.frozen_path` they are subclasses swapped in by changing ``__class__``
(`apply_memory_saving`) and swapped back by `restore`. Modules are recognised by class, not by
model name: a gated MLP is any module whose ``forward`` is the Llama-style expression above over
``gate_proj``/``up_proj``/``down_proj``/``act_fn`` attributes (Llama, Mistral, Qwen2, Gemma, ...).

Activations whose autograd already keeps only their input (``nn.SiLU``, ``SiLUActivation``,
``nn.GELU``, ``GELUActivation`` and ``GELUTanh`` on ``F.gelu``) have no twin: nothing to save.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_twin_class
from .common import (
    autocast_of,
    make_twin,
    needs_grad,
    normalized_source,
    pack_bits,
    reenter_autocast,
    stock_forward,
    trains,
    unpack_bits,
)


class _GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` keeping ``gate`` and ``up`` only; backward recomputes ``act(gate)``."""

    @staticmethod
    def forward(ctx, gate, up, act):
        y = act(gate) * up
        ctx.act, ctx.autocast = act, autocast_of(gate)
        need_gate, need_up = ctx.needs_input_grad[:2]
        ctx.save_for_backward(gate, up if need_gate else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        with torch.enable_grad(), reenter_autocast(ctx.autocast):
            g = gate.detach().requires_grad_(need_gate)
            a = ctx.act(g)
        grad_up = grad * a.detach() if need_up else None
        grad_gate = torch.autograd.grad(a, g, grad * up)[0] if need_gate else None
        return grad_gate, grad_up, None


class _RecomputedActivation(torch.autograd.Function):
    """``fn(x)`` for an elementwise ``fn``, keeping ``x`` only; backward recomputes ``fn``."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn, ctx.autocast = fn, autocast_of(x)
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), reenter_autocast(ctx.autocast):
            x_ = x.detach().requires_grad_(True)
            y = ctx.fn(x_)
        return torch.autograd.grad(y, x_, grad)[0], None


class _PackedDropout(torch.autograd.Function):
    """``torch.native_dropout`` keeping its mask bit-packed (1 bit per element).

    ``F.dropout`` draws its mask with the same ``bernoulli_`` call on CPU (``_dropout``) and calls
    ``native_dropout`` itself on CUDA, so outputs equal ``nn.Dropout``'s under the same RNG state.
    """

    @staticmethod
    def forward(ctx, x, p: float):
        y, mask = torch.native_dropout(x, p, True)
        ctx.shape, ctx.scale = mask.shape, 1.0 / (1.0 - p)
        ctx.save_for_backward(pack_bits(mask))
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        return torch.ops.aten.native_dropout_backward(grad, mask, ctx.scale), None


# ----------------------------------------------------------------------------- twins


class FrozenPathDropout(nn.Dropout):
    """``nn.Dropout`` keeping a 1-bit mask (same draw, outputs and gradients)."""

    _trady_original = nn.Dropout

    def forward(self, x):
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or not needs_grad(x) or x.numel() == 0:
            return super().forward(x)
        return _PackedDropout.apply(x, self.p)


class _RecomputingActivation:
    def forward(self, x):
        # Parameters made trainable after the swap need the stock backward (their own gradient).
        if not needs_grad(x) or any(p.requires_grad for p in self.parameters(recurse=False)):
            return super().forward(x)
        return _RecomputedActivation.apply(x, functools.partial(self._trady_original.forward, self))


class _GatedMLP:
    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (
            not torch.is_grad_enabled()
            or not (gate.requires_grad or up.requires_grad)
            or trains(self.act_fn)
            or gate.shape != up.shape
            or gate.dtype != up.dtype
        ):
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(_GatedProduct.apply(gate, up, stock_forward(self.act_fn)))


_TWINS: dict[type, type] = {nn.Dropout: FrozenPathDropout}


def _recomputing_activation_classes() -> list[type]:
    """Activations whose stock autograd keeps intermediates of a Python formula (measured in tests)."""
    try:
        from transformers import activations as acts
    except ImportError:  # pragma: no cover - transformers is a dependency of peft
        return []
    names = ("NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation")
    return [getattr(acts, n) for n in names if hasattr(acts, n)]


for _cls in _recomputing_activation_classes():
    _TWINS[_cls] = make_twin(_cls, _RecomputingActivation)

_GATED_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
# The whole body must be the gated product: a forward that adds anything (a residual dropout,
# a scaling) keeps its stock class.
_GATED_BODIES = {f"return{_GATED_EXPRESSION}", f"down_proj={_GATED_EXPRESSION}returndown_proj"}


@functools.cache
def _is_gated_mlp(cls: type) -> bool:
    return normalized_source(cls.forward) in _GATED_BODIES


def _python_formula(module: nn.Module) -> bool:
    """``GELUActivation``/``GELUTanh`` built with ``use_*_python=True`` run a Python formula."""
    act = module.__dict__.get("act")
    return act is not None and not isinstance(act, functools.partial) and act is not F.gelu


_PYTHON_FORMULA_TWINS: dict[type, type] = {}
_MLP_TWINS: dict[type, type] = {}


def twin_class(module: nn.Module) -> type | None:
    """The memory-saving class for ``module`` if it is a frozen transformers frozen-path module, else None."""
    cls = type(module)
    if "_trady_original" in cls.__dict__:
        return None  # already a twin
    if cls in _TWINS:
        return None if trains(module) else _TWINS[cls]
    if cls.__name__ in ("GELUActivation", "GELUTanh") and _python_formula(module) and not trains(module):
        if cls not in _PYTHON_FORMULA_TWINS:
            _PYTHON_FORMULA_TWINS[cls] = make_twin(cls, _RecomputingActivation)
        return _PYTHON_FORMULA_TWINS[cls]
    norm = _norm_twin_class(module)  # RMS norms, defined below
    if norm is not None:
        return norm
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if all(isinstance(getattr(module, a, None), nn.Module) for a in parts) and _is_gated_mlp(cls):
        if trains(module.act_fn):
            return None  # an activation with trained parameters keeps PyTorch's backward
        if cls not in _MLP_TWINS:
            _MLP_TWINS[cls] = make_twin(cls, _GatedMLP)
        return _MLP_TWINS[cls]
    return attention_twin_class(module)


def original_class(module: nn.Module) -> type | None:
    """The stock class of a twin, or None for any other module."""
    return type(module).__dict__.get("_trady_original")


# ------------------------------------------------------------------------------------ RMS norms
#
# A frozen RMSNorm's stock autograd keeps the float32 upcast of its input and the per-row rsqrt:
# for a bf16/fp16 input that is twice the input's bytes, for a float32 input the input itself
# (``.to(float32)`` is then a no-op) plus the rsqrt. The twin keeps the input in its own dtype only
# and recomputes the norm in backward, so its input gradient is the stock one bit for bit.
# nn.LayerNorm has no twin: ``native_layer_norm`` already keeps only its input, mean and rstd.


class _RecomputingNorm(_RecomputingActivation):
    """A norm whose forward is a deterministic formula of its input and frozen weight: keeps the input only.

    A float64 input is left to the stock forward, which keeps its float32 downcast: less than the input.
    """

    def forward(self, x):
        if x.element_size() > 4:
            return self._trady_original.forward(self, x)
        return super().forward(x)


# Stock RMSNorm formulas of transformers (5.x), as bodies of ``forward`` (and of ``_norm``, when
# ``forward`` calls it). Scanned over transformers' models: the first covers Llama, Mistral,
# Qwen2/3, Phi3, Mamba and some 140 more; the second Gemma 1-3, Qwen3-Next/3.5.
_RMS_FORWARDS = {
    # Llama, Mistral, Qwen2, ...: weight * normalized.to(input_dtype)
    "input_dtype=hidden_states.dtypehidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "returnself.weight*hidden_states.to(input_dtype)",
    # Olmo2, GptOss, DeepseekV4, ...: (weight * normalized).to(input_dtype)
    "input_dtype=hidden_states.dtypehidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "return(self.weight*hidden_states).to(input_dtype)",
    # Helium, NemotronH: (weight.float() * normalized).to(input_dtype)
    "input_dtype=hidden_states.dtypehidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "return(self.weight.to(torch.float32)*hidden_states).to(input_dtype)",
    # Gemma 1-3: normalized in float32 times (1 + weight), cast back
    "output=self._norm(x.float())output=output*(1.0+self.weight.float())returnoutput.type_as(x)",
    # Moshi: normalized in float32 times weight, cast back
    "output=self._norm(x.float())output=output*self.weight.float()returnoutput.type_as(x)",
}
_RMS_NORM_BODY = "returnx*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)"


@functools.cache
def _is_stock_rms_norm(cls: type) -> bool:
    body = normalized_source(cls.forward)
    if body not in _RMS_FORWARDS:
        return False
    return "self._norm(" not in body or normalized_source(getattr(cls, "_norm", None)) == _RMS_NORM_BODY


def _looks_like_rms_norm(module: nn.Module) -> bool:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(module.__dict__.get("_parameters", {}).get("weight"), nn.Parameter)
        and isinstance(eps, float)
        and _is_stock_rms_norm(type(module))
    )


_NORM_TWINS: dict[type, type] = {}


def _norm_twin_class(module: nn.Module) -> type | None:
    """The twin of a frozen stock RMSNorm, else None (called by `twin_class`)."""
    if "_trady_original" in type(module).__dict__ or trains(module) or not _looks_like_rms_norm(module):
        return None
    cls = type(module)
    if cls not in _NORM_TWINS:
        _NORM_TWINS[cls] = make_twin(cls, _RecomputingNorm)
    return _NORM_TWINS[cls]
