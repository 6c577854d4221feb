"""What the frozen-path twins share: how a twin class is made and recognised, bit-packed masks,
and the autograd and autocast state a backward pass re-enters."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 elements per byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: the bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    bits = (packed[:, None] & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:n].view(shape)


def needs_grad(x: torch.Tensor) -> bool:
    """Whether autograd will record an operation on ``x`` (grad mode on and ``x`` requires grad)."""
    return torch.is_grad_enabled() and x.requires_grad


def autocast_state(device: str) -> tuple[str, bool, torch.dtype]:
    """The autocast state of the ``device`` type: (device type, enabled, dtype), to re-enter in backward."""
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def autocast_of(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    """The autocast state of ``x``'s device (`autocast_state`)."""
    return autocast_state(x.device.type)


def reenter_autocast(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    """``torch.autocast`` as it was when `autocast_state` recorded ``state``."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def stock_forward(module: nn.Module):
    """The stock forward of ``module`` (its original class's, if it is a twin)."""
    original = type(module).__dict__.get("_trady_original")
    return functools.partial(original.forward, module) if original is not None else module


def trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires grad."""
    return any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------- autograd functions


def make_twin(cls: type, mixin: type) -> type:
    """A subclass of ``cls`` with ``mixin``'s memory-saving forward, importable from this module by name."""
    name = f"FrozenPath{cls.__name__}"
    while name in globals() and globals()[name]._trady_original is not cls:
        name += "_"
    twin = type(name, (mixin, cls), {"_trady_original": cls, "__module__": __name__, "__qualname__": name})
    globals()[name] = twin  # importable by name, so pickle and deepcopy find it
    return twin


def normalized_source(fn) -> str | None:
    """``fn``'s source without comments, whitespace and its ``def`` line (annotations vary)."""
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        text = "".join(t.string for t in tokens if t.type not in skip)
    except (OSError, TypeError, tokenize.TokenError, IndentationError):
        return None
    depth = 0
    for i, ch in enumerate(text):  # the ``:`` closing the signature is the first one outside brackets
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == ":" and depth == 0 and ")" in text[:i]:
            return text[i + 1 :]
    return None
