"""Quantized base layers: bitsandbytes 4-bit (NF4/FP4) and 8-bit, torchao int8 weight-only.

TraDy's base forward never needs the dense weight: a wrapped layer computes ``base(x)`` by calling
the base layer itself (the quantized kernel), and adds ``x[..., idx] @ Δᵀ`` on the channels it
trains, with ``Δ`` kept in fp32 in the adapter's bank. So a layer quantized by

* bitsandbytes (``bnb.nn.Linear4bit`` with NF4 or FP4 weights, ``bnb.nn.Linear8bitLt``), which are
  ``nn.Linear`` subclasses holding packed weights (a 4-bit weight is a ``[out·in/2, 1]`` uint8
  tensor), or
* torchao's int8 weight-only quantization (``quantize_(model, Int8WeightOnlyConfig())``), which
  keeps the ``nn.Linear`` and makes its weight an ``Int8Tensor`` subclass,

is wrapped like any ``nn.Linear``; only what reads the weight itself needs this module:

* `dequantize` gives the dense fp32 ``[out, in]`` weight (merging);
* `requantize` stores a new dense weight in the layer's own format (merging);
* `weight_snapshot` / `restore_weight` keep and put back the quantized weight exactly (unmerging);
* `FrozenQuantizedLinear` runs a torchao layer keeping nothing for backward (torchao's own
  weight-only linear keeps a dense dequantized copy of the weight for it);
* `storage_bytes` counts what a module's parameters, buffers and quantization statistics occupy.

Nothing here imports bitsandbytes or torchao at module level: a layer is recognised by its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BNB_4BIT = "bitsandbytes 4-bit"
BNB_8BIT = "bitsandbytes 8-bit"
TORCHAO = "torchao"


def _is_bnb(layer: nn.Module, class_name: str) -> bool:
    return any(c.__name__ == class_name and c.__module__.startswith("bitsandbytes") for c in type(layer).__mro__)


def quantization_of(layer: nn.Module) -> str | None:
    """The quantization backend of ``layer``'s weight: `BNB_4BIT`, `BNB_8BIT`, `TORCHAO`, or None (a
    plain floating-point weight)."""
    if _is_bnb(layer, "Linear4bit"):
        return BNB_4BIT
    if _is_bnb(layer, "Linear8bitLt"):
        return BNB_8BIT
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
        return TORCHAO
    return None


def prepare_quantized_layer(layer: nn.Module) -> None:
    """Called when TraDy wraps ``layer``: keep a bitsandbytes 4-bit weight in its own format.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place, for a bf16 kernel, the
    first time the layer runs in eval mode without gradients. The repacked weight computes in bf16
    (outputs differ from training mode's) and bitsandbytes cannot turn it back exactly, so it could
    no longer be dequantized for a merge. TraDy turns that repacking off on the layers it wraps
    (``support_avx512bf16_for_cpu = False``); GPU kernels are not affected.
    """
    if quantization_of(layer) == BNB_4BIT and hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def _bnb_4bit_packed_for_cpu(layer: nn.Module) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def _bnb_8bit_scales(layer: nn.Module) -> torch.Tensor:
    """Row scales of an 8-bit weight: on the weight until the first forward, then on the layer's state."""
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(
            f"{type(layer).__name__} has no int8 row scales (SCB): its weight is not quantized yet. Move the model "
            "to its device (model.to(device)) before wrapping it."
        )
    return scb


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The dense ``[out, in]`` fp32 weight a quantized ``layer`` computes with (a new tensor).

    Raises:
        TypeError: the layer is not quantized by a supported backend.
    """
    kind = quantization_of(layer)
    weight = layer.weight
    if kind == BNB_4BIT:
        import bitsandbytes.functional as bnb_f

        if _bnb_4bit_packed_for_cpu(layer):
            raise RuntimeError(
                "This bitsandbytes 4-bit weight was repacked for bitsandbytes' CPU bf16 inference kernel (it ran in "
                "eval mode without gradients before TraDy wrapped it), which cannot be turned back exactly, so it "
                "cannot be merged. Wrap the freshly quantized model, or keep the adapter unmerged."
            )
        return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float().reshape(layer.out_features, -1)
    if kind == BNB_8BIT:
        import bitsandbytes.functional as bnb_f

        return bnb_f.int8_vectorwise_dequant(weight.data, _bnb_8bit_scales(layer)).float()
    if kind == TORCHAO:
        return weight.dequantize().float()
    raise TypeError(f"{type(layer).__name__} is not a quantized layer TraDy knows (bitsandbytes 4/8-bit, torchao).")


def _torchao_granularity(weight: torch.Tensor):
    """The granularity an ``Int8Tensor`` was quantized with, read from its block size."""
    from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

    out, inp = weight.shape
    block = list(getattr(weight, "block_size", []))
    if block == [1, inp]:
        return PerRow()
    if block == [out, inp]:
        return PerTensor()
    if len(block) == 2 and block[0] == 1:
        return PerGroup(block[1])
    return None


def requantize_refusal(layer: nn.Module) -> str | None:
    """Why `requantize` cannot rebuild ``layer``'s weight format, or None when it can."""
    if quantization_of(layer) != TORCHAO:
        return None
    from torchao.quantization import Int8Tensor

    weight = layer.weight
    if type(weight) is Int8Tensor and _torchao_granularity(weight) is not None:
        if getattr(weight, "act_quant_kwargs", None) is None:
            return None
    return (
        f"its weight is a torchao {type(weight).__name__} (block_size={getattr(weight, 'block_size', None)}), and "
        "TraDy only rebuilds int8 weight-only Int8Tensor weights. Keep the adapter unmerged, or export it with "
        "trady_peft.export_lora and merge into a floating-point copy of the base model"
    )


def requantize(layer: nn.Module, dense: torch.Tensor) -> None:
    """Quantize the dense ``[out, in]`` weight ``dense`` in ``layer``'s own format and make it the
    layer's weight (a new parameter; the old one is left untouched for `restore_weight`).

    Raises:
        TypeError: the layer's format cannot be rebuilt (see `requantize_refusal`).
    """
    kind = quantization_of(layer)
    weight = layer.weight
    device = weight.device
    if kind == BNB_4BIT:
        import bitsandbytes as bnb

        new = bnb.nn.Params4bit(
            dense.to(layer.compute_dtype or torch.float32).contiguous(),
            requires_grad=False,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
            quant_storage=weight.quant_storage,
            module=layer,
        )
        layer.weight = new.to(device)  # moving a Params4bit to its device quantizes it
        return
    if kind == BNB_8BIT:
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(dense.half().contiguous(), requires_grad=False, has_fp16_weights=False)
        layer.weight = new.to(device)  # quantizes; the next forward moves CB/SCB to layer.state
        return
    if kind == TORCHAO:
        refusal = requantize_refusal(layer)
        if refusal is not None:
            raise TypeError(f"Cannot requantize this {type(layer).__name__}: {refusal}.")
        from torchao.quantization import Int8Tensor

        new = Int8Tensor.from_hp(dense.to(device=device, dtype=weight.dtype), _torchao_granularity(weight))
        layer.weight = nn.Parameter(new, requires_grad=False)
        return
    raise TypeError(f"{type(layer).__name__} is not a quantized layer TraDy knows (bitsandbytes 4/8-bit, torchao).")


def weight_snapshot(layer: nn.Module) -> Any:
    """What `restore_weight` needs to put the current quantized weight back exactly."""
    if quantization_of(layer) == BNB_8BIT:
        return layer.weight, _bnb_8bit_scales(layer)
    return layer.weight, None


def restore_weight(layer: nn.Module, snapshot: Any) -> None:
    """Make the weight kept by `weight_snapshot` the layer's weight again (bit for bit)."""
    weight, scales = snapshot
    if scales is not None:  # bnb 8-bit: the next forward moves CB/SCB from the weight to layer.state
        weight.CB, weight.SCB = weight.data, scales
    layer.weight = weight


class FrozenQuantizedLinear(torch.autograd.Function):
    """``layer(x)`` for a frozen quantized linear layer, keeping nothing for the backward pass.

    The forward is the layer's own (its quantized kernel), run without recording. The input
    gradient ``grad_out @ W`` needs only the weight, which is resident: backward dequantizes it
    for this one layer and frees it at once, as bitsandbytes' own backward does. torchao's int8
    weight-only linear would instead keep a dense dequantized copy of every weight from forward to
    backward (an fp32 ``[in, out]`` tensor per layer), which costs more than the quantized weight
    saves.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = dequantize(ctx.layer).to(grad_out.dtype)
        return (grad_out @ weight).to(ctx.x_dtype), None


def frozen_quantized_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The forward of a torchao-quantized ``layer`` that keeps nothing for backward (see
    `FrozenQuantizedLinear`); any other layer, or one whose bias trains, runs as itself."""
    bias = getattr(layer, "bias", None)
    if quantization_of(layer) != TORCHAO or not x.requires_grad or (bias is not None and bias.requires_grad):
        return layer(x)
    return FrozenQuantizedLinear.apply(x, layer)


@dataclass(frozen=True)
class RoundingError:
    """How far a requantized merged weight is from the exact merge.

    Attributes:
        max_abs: the largest absolute difference of one weight value.
        relative: ``||W_requantized - W_exact||_F / ||W_exact||_F``, where ``W_exact`` is the
            dequantized base weight plus the adapter's delta, in fp32.
    """

    max_abs: float
    relative: float

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, relative error {self.relative:.3g}"


def rounding_error(requantized: torch.Tensor, exact: torch.Tensor) -> RoundingError:
    """`RoundingError` of the dequantized ``requantized`` weight against ``exact`` (same shape)."""
    diff = (requantized - exact).float()
    norm = float(exact.float().norm())
    gap = float(diff.norm())
    relative = gap / norm if norm > 0 else (0.0 if gap == 0 else math.inf)
    return RoundingError(max_abs=float(diff.abs().max()) if diff.numel() else 0.0, relative=relative)


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a tensor subclass such as torchao's is opened up)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return [s for n in names if getattr(t, n, None) is not None for s in plain_tensors(getattr(t, n))]
    return [t]


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, and a nested state's)."""
    if state is None:
        return []
    found = [getattr(state, a, None) for a in ("absmax", "code", "offset")]
    found = [t for t in found if isinstance(t, torch.Tensor)]
    return found + _quant_state_tensors(getattr(state, "state2", None))


def storage_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, each storage counted once, with the
    quantization statistics that live outside them (bitsandbytes' 4-bit ``quant_state`` and 8-bit
    row scales) and the inner tensors of tensor subclasses (torchao)."""
    tensors: list[torch.Tensor] = []
    for t in [*module.parameters(), *module.buffers()]:
        tensors += plain_tensors(t)
        tensors += _quant_state_tensors(getattr(t, "quant_state", None))
    for m in module.modules():
        if quantization_of(m) == BNB_8BIT:
            tensors.append(_bnb_8bit_scales(m))
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
