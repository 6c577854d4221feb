"""A memory-saving twin for the attention modules of transformers.

A frozen attention block keeps, for its backward pass, q, k and v (after the rotary embedding),
the rotary ``cos``/``sin``, the attention output and its logsumexp (eager attention: the
probabilities and their dropout mask), and the selected input channels of its TraDy projections:
on a Llama-style model a third of what a TraDy step keeps once the other twins are in place.
Its input gradient, and the gradient of the few channels TraDy trains in its projections, need
none of that but the module's input: everything else can be computed again.

The twin does per-module activation recomputation. Its forward runs the stock forward without
gradients and keeps only the module's tensor arguments (the hidden states entering it, the
rotary ``cos``/``sin`` and the mask, which every layer shares) and the random-number state; its
backward runs the stock forward again with gradients, under the same autocast state and the same
random draw (so attention dropout draws the same mask), and backpropagates through it. The cost is
one more forward of the attention block per layer and step.

Everything it keeps goes through ``ctx.save_for_backward``, so `trady_peft.measure_training_step`
(saved-tensor hooks) sees it. Gradients of TraDy's bank reach the bank once: the twin takes the
segments its TraDy layers read (views from the bank's one split, `trady_peft.core.bank.DeltaBank.segment`)
as inputs, the recomputed graph differentiates detached aliases of those segments, and the twin
returns their gradients as its inputs', so the bank's split assembles the bank's gradient once per
backward pass (and autograd runs the bank's hooks) like any other use of the bank.

Modules are recognised by structure, not by model name: a class of ``transformers.models`` whose
name ends in ``Attention`` and whose ``forward`` calls the ``attention_interface`` of
transformers 5.x (453 of the 697 ``...Attention`` classes of transformers 5.24: Llama, Mistral,
Qwen2/3, Gemma 1-3, Phi3, GPT-2, BERT/RoBERTa self-attention, T5, ...; tested on Llama, GPT-2,
BERT and Qwen2), or such a class that
wraps one of those as a direct child (BERT's ``BertAttention``: self-attention plus output
projection, dropout and norm). The twin takes the stock path (no saving, no extra cost) when the
module is in eval mode, under ``no_grad``, when attention weights are requested, when a key/value
cache already holds this layer's keys (a cache filled by this very call, as a causal LM's
forward does in training, is fine: the backward recomputes without it), when one of its own
parameters trains (LoRA, scoring), and for an output it cannot rebuild.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...compat import is_zero3_param, tensor_leaves, tree_flatten, tree_unflatten
from ...core.layer import TraDyLayer
from .common import autocast_state, make_twin, normalized_source, reenter_autocast, trains

_TENSOR = object()  # where a tensor sits in a flattened structure
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)
_local = threading.local()


def _recomputing() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _recompute_scope():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _is_leaf(obj: Any) -> bool:
    """Only plain tuples, lists and dicts are opened; a namedtuple, an ``OrderedDict``, a model output
    or a cache stays one leaf, kept as it is."""
    return type(obj) not in (tuple, list, dict)


@dataclass(frozen=True)
class _Flat:
    """A flattened structure: its leaves, each tensor replaced by `_TENSOR`, and where they sit."""

    leaves: list
    spec: Any

    def __repr__(self) -> str:
        return repr(tree_unflatten(self.leaves, self.spec))


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> _Flat:
    """``obj`` with each tensor (in tuples, lists and dicts) replaced by a marker, appended to ``tensors``."""
    leaves, spec = tree_flatten(obj, is_leaf=_is_leaf)
    tensors += [x for x in leaves if isinstance(x, torch.Tensor)]
    return _Flat([_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _unflatten(flat: _Flat, tensors) -> Any:
    return tree_unflatten([next(tensors) if x is _TENSOR else x for x in flat.leaves], flat.spec)


def _holds_grad_tensor(leaf: Any) -> bool:
    """Whether an unflattened leaf (a namedtuple, an ``OrderedDict``, ...) holds a tensor that requires
    grad: the recomputation would not differentiate it, so such a call takes the stock path."""
    return any(t.requires_grad for t in tensor_leaves(leaf))


def _is_cache(obj: Any) -> bool:
    return hasattr(obj, "get_seq_length") and hasattr(obj, "update")


def _without_caches(flat: _Flat) -> _Flat:
    return _Flat([None if _is_cache(x) else x for x in flat.leaves], flat.spec)


def _layer_idx(module: nn.Module) -> int | None:
    for m in module.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def _cache_allows_recompute(module: nn.Module, flat: _Flat) -> bool:
    """Caches may only be plain ``DynamicCache``s still empty for this layer: then the stock call
    fills them with exactly the keys/values a call without cache uses, and backward can do without."""
    for leaf in flat.leaves:
        if not _is_cache(leaf):
            continue
        idx = _layer_idx(module)
        if type(leaf).__name__ != "DynamicCache" or idx is None or leaf.get_seq_length(idx) != 0:
            return False
    return True


def _banks(module: nn.Module) -> list[nn.Parameter]:
    """The trainable TraDy banks the module's TraDy layers draw their current slices from."""
    banks: dict[int, nn.Parameter] = {}
    for _, bank in _delta_views(module):
        banks[id(bank.weight)] = bank.weight
    return list(banks.values())


def _delta_views(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(view, bank)`` of the module's TraDy layers that read a trainable bank this period (an active
    adapter's, neither merged nor disabled: the forward reads no delta otherwise)."""
    found = []
    for layer in module.modules():
        if not isinstance(layer, TraDyLayer) or layer.disable_adapters or layer.merged:
            continue
        for name in layer.active_adapters:
            view = layer.trady_delta[name] if name in layer.trady_delta else None
            bank = view.__dict__.get("bank") if view is not None and view.count else None
            if bank is not None and bank.weight.requires_grad:
                found.append((view, bank))
    return found


def _segment_of(view: nn.Module, bank: nn.Module) -> torch.Tensor:
    """The flat bank segment ``view`` reads (from the bank's shared split, see `DeltaBank.segment`)."""
    segment = getattr(bank, "segment", None)
    return segment(view.offset, view.numel) if segment else bank.weight.narrow(0, view.offset, view.numel)


@dataclass
class _SegmentAlias:
    """Stands in for a bank during a recomputation: hands the layer a detached alias of its segment."""

    weight: torch.Tensor  # the real bank (never read through here)
    alias: torch.Tensor

    def segment(self, offset: int, numel: int) -> torch.Tensor:
        return self.alias


@contextlib.contextmanager
def _aliased_segments(views: list[tuple[nn.Module, nn.Module]], aliases: list[torch.Tensor]):
    """Point the TraDy layers at detached aliases of their bank segments for the recomputation, so
    the inner backward neither accumulates into the bank nor runs its hooks, and returns gradients
    of the segments only (the bank's gradient is assembled once, by its split, outside)."""
    for (view, bank), alias in zip(views, aliases):
        view.__dict__["bank"] = _SegmentAlias(bank.weight, alias)
    try:
        yield
    finally:
        for view, bank in views:
            view.__dict__["bank"] = bank


def _autocast_state(device: str) -> list[tuple[str, bool, torch.dtype]]:
    """The autocast states of the ``device`` type and, for another device, of the CPU."""
    return [autocast_state(d) for d in ([device] if device == "cpu" else [device, "cpu"])]


@dataclass
class _Job:
    """What backward needs besides saved tensors: no tensor lives here (see `_Recompute`)."""

    run: Any
    module: nn.Module
    spec: Any  # arguments, tensors replaced by markers, caches by None
    n_inputs: int
    device: torch.device
    out_spec: Any = None
    views: list = field(default_factory=list)  # (ChannelDeltaView, bank) whose segments are inputs
    supported: bool = True
    autocast: list = field(default_factory=list)


class _Recompute(torch.autograd.Function):
    """``module(*args, **kwargs)`` keeping only its tensor arguments and the RNG state; backward reruns it."""

    @staticmethod
    def forward(ctx, job: _Job, *tensors):
        inputs, banks = tensors[: job.n_inputs], tensors[job.n_inputs :]
        rng = [torch.get_rng_state()]
        if job.device.type == "cuda":
            rng.append(torch.cuda.get_rng_state(job.device))
        job.autocast = _autocast_state(job.device.type)
        spec, forward_spec = job.spec
        args, kwargs = _unflatten(forward_spec, iter(inputs))
        out = job.run(*args, **kwargs)
        outs: list[torch.Tensor] = []
        job.out_spec = _flatten(out, outs)
        job.supported = all(isinstance(leaf, _SCALARS) or leaf is _TENSOR for leaf in job.out_spec.leaves)
        job.spec = spec  # drop the forward's references (caches) before backward
        ctx.job = job
        # The bank segments are views of resident parameters; the RNG state is a few KiB.
        ctx.n_rng = len(rng)
        ctx.save_for_backward(*inputs, *rng, *banks)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*[t for t in outs if not (t.is_floating_point() or t.is_complex())])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        job = ctx.job
        saved = ctx.saved_tensors
        n = job.n_inputs
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved[:n], needs[:n])]
        segments = saved[n + ctx.n_rng :]
        # Saved-tensor hooks may hand back other tensor objects: check the live layout by storage.
        views = job.views
        if _delta_views(job.module) != views or any(
            s.numel() != v.numel or s.data_ptr() != b.weight.data_ptr() + v.offset * b.weight.element_size()
            for s, (v, b) in zip(segments, views)
        ):
            raise RuntimeError(
                "A TraDy bank used in an attention block's forward was replaced before its backward; "
                "run backward before changing the channel selection."
            )
        aliases = [s.detach().requires_grad_(need) for s, need in zip(segments, needs[n:])]
        cuda = [job.device] if job.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(saved[n])
            if cuda:
                torch.cuda.set_rng_state(saved[n + 1], job.device)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                for state in job.autocast:
                    stack.enter_context(reenter_autocast(state))
                stack.enter_context(_recompute_scope())
                stack.enter_context(_aliased_segments(views, aliases))
                args, kwargs = _unflatten(job.spec, iter(inputs))
                out = job.run(*args, **kwargs)
        outs: list[torch.Tensor] = []
        _flatten(out, outs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t, need in zip(inputs + aliases, needs) if need]
        got = iter([None] * len(wanted))
        if pairs and wanted:
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, *[next(got) if need else None for need in needs])


class _RecomputedAttention:
    """Mixin of an attention twin: the stock forward, recomputed in backward (see the module docstring)."""

    def forward(self, *args, **kwargs):
        stock = super().forward
        if (
            not self.training
            or not torch.is_grad_enabled()
            or _recomputing()
            or kwargs.get("output_attentions")
            or trains(self)
            or type(self) in _UNSUPPORTED_OUTPUTS
        ):
            return stock(*args, **kwargs)
        tensors: list[torch.Tensor] = []
        spec = _flatten((args, kwargs), tensors)
        banks = _banks(self)
        if not (banks or any(t.requires_grad for t in tensors)) or not _cache_allows_recompute(self, spec):
            return stock(*args, **kwargs)
        device = next((t.device for t in tensors if t.is_floating_point()), torch.device("cpu"))
        if (
            device.type not in ("cpu", "cuda")  # the RNG state it restores: CPU and CUDA only
            or any(is_zero3_param(b) for b in banks)  # a ZeRO-3 bank is gathered only inside its layers
            or any(_holds_grad_tensor(leaf) for leaf in spec.leaves)  # e.g. a namedtuple: not flattened
        ):
            return stock(*args, **kwargs)
        job = _Job(stock, self, (_without_caches(spec), spec), len(tensors), device)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        job.views = _delta_views(self)
        outs = _Recompute.apply(job, *tensors, *[_segment_of(v, b) for v, b in job.views])
        if not job.supported:  # an output holding tensors in an object: autograd must see the stock graph
            _UNSUPPORTED_OUTPUTS.add(type(self))
            if any(_is_cache(leaf) for leaf in spec.leaves):
                raise RuntimeError(
                    f"{type(self).__name__} returned {job.out_spec!r}, which its memory-saving twin cannot "
                    "rebuild, after filling its cache. Set memory_saving_frozen_path=False or use_cache=False."
                )
            torch.set_rng_state(rng[0])  # the same dropout draw
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
            return stock(*args, **kwargs)
        return _unflatten(job.out_spec, iter(outs))


_UNSUPPORTED_OUTPUTS: set[type] = set()


def _is_kernel_source(body: str | None) -> bool:
    return body is not None and "attention_interface(" in body


@functools.cache
def _is_attention_kernel(cls: type) -> bool:
    return (
        cls.__module__.startswith("transformers.models.")
        and cls.__name__.endswith("Attention")
        and _is_kernel_source(normalized_source(cls.forward))
    )


def _is_attention_wrapper(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__module__.startswith("transformers.models.")
        and cls.__name__.endswith("Attention")
        and any(_is_attention_kernel(type(c)) for c in module.children())
    )


_ATTENTION_TWINS: dict[type, type] = {}


def attention_twin_class(module: nn.Module) -> type | None:
    """The recomputing twin of a frozen transformers attention module, else None."""
    cls = type(module)
    if "_trady_original" in cls.__dict__ or trains(module):
        return None
    if not (_is_attention_kernel(cls) or _is_attention_wrapper(module)):
        return None
    if cls not in _ATTENTION_TWINS:
        _ATTENTION_TWINS[cls] = make_twin(cls, _RecomputedAttention)
    return _ATTENTION_TWINS[cls]
