"""The bank: each adapter's trainable values, one flat fp32 parameter shared out among its layers.

Each wrapped layer trains a view onto its own segment of the bank. The bank's size is fixed when
the adapter is created, so the optimizer and DDP see the same parameter for the whole run (under
``step_memory`` the probe sizes it, in place, and shrinks it if a larger input leaves the adapter
less); a new period only moves segment boundaries and index buffers, in place. No dense ``[out, in]`` tensor is
ever allocated for training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import is_zero3_param, resize_parameter, tensor_version
from .collectives import average_gradient


class DeltaBank(nn.Module):
    """One adapter's trainable values: a flat fp32 ``weight`` shared out among the layers.

    Its forward never runs (the layers read ``weight`` through views), so FSDP2 must not shard it:
    it stays whole on every rank (`trady_peft.fsdp_ignored_params`, docs/distributed.md).
    """

    def __init__(self, adapter_name: str, capacity: int, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.adapter_name = adapter_name
        # Registered like any parameter: when peft loads with low_cpu_mem_usage=True it lands on the
        # meta device, and the load that follows makes it real (`materialize`).
        self.weight = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))

        self.layout: tuple[tuple[int, int], ...] = ()  # (offset, numel) of each installed layer segment
        self._slices = _SliceCache()
        self._average_hook = None

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(keeping_precision(fn), recurse)

    # A state dict holds the bank's values folded into the layers' stores (trady_peft.checkpoint),
    # so the bank's own entry is an empty placeholder. The key stays, for readers that expect one
    # per parameter (FSDP's state-dict hooks); loading an empty or absent entry leaves the bank to
    # the tuner, and never reports it missing. A full-size entry (a raw dict, such as DeepSpeed's
    # consolidated one) is loaded as usual.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.detach().new_empty(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "weight")
        if incoming is not None and incoming.numel():
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def materialize(self, device: torch.device) -> bool:
        """Replace a bank on the meta device (``low_cpu_mem_usage``) by zeros on ``device``, keeping
        its shape, dtype, ``requires_grad`` and gradient averaging. Returns whether it was on meta.

        A new parameter object: call it while loading, before any optimizer holds the bank.
        """
        weight = self.weight
        if weight.device.type != "meta":
            return False
        real = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
        self._parameters["weight"] = nn.Parameter(real, requires_grad=weight.requires_grad)
        self._slices.clear()
        if self._average_hook is not None:  # the hook went with the meta tensor
            self._average_hook.remove()
            self._average_hook = None
            self.average_gradients()
        return True

    def resize(self, capacity: int) -> None:
        """Hold ``capacity`` zeros: the same parameter object (an optimizer and hooks keep it) on a new
        storage, with no gradient and no layout. Call it between steps, before a draw installs one
        (`trady_peft.periods.Periods.resize_bank`, which also drops the optimizer's state)."""
        weight = self.weight
        resize_parameter(weight, torch.zeros(capacity, dtype=weight.dtype, device=weight.device))
        self.set_layout(())

    def set_layout(self, segments) -> None:
        """Record the layers' segments ``(offset, numel)`` of this period (disjoint, set by `install`)."""
        self.layout = tuple(sorted((int(o), int(n)) for o, n in segments if n))
        self._slices.clear()

    def segment(self, offset: int, numel: int) -> torch.Tensor:
        """The flat segment ``weight[offset:offset + numel]`` as read by a layer's forward.

        With gradients enabled, every segment of the layout comes from one ``split_with_sizes`` of
        the bank, made once and reused until the bank changes in place (an optimizer step, a
        period change), so the backward pass builds the bank's gradient once (O(bank)) instead of
        once per layer through a ``narrow`` view each (O(layers x bank)). Otherwise, or for a
        segment outside the layout, a plain ``narrow`` view.
        """
        weight = self.weight
        if not torch.is_grad_enabled() or is_zero3_param(weight):
            return weight.narrow(0, offset, numel)
        slices = self._slices.get(weight, self.layout)
        piece = slices.get((offset, numel)) if slices is not None else None
        return piece if piece is not None else weight.narrow(0, offset, numel)

    def average_gradients(self) -> None:
        """Average ``weight``'s gradient over the ranks after each backward pass (FSDP2 with the bank
        left unsharded, `trady_peft.fsdp_ignored_params`). Idempotent."""
        if self._average_hook is None:
            self._average_hook = self.weight.register_post_accumulate_grad_hook(average_gradient)

    @property
    def averages_gradients(self) -> bool:
        """Whether `average_gradients` was switched on."""
        return self._average_hook is not None

    def remove_hooks(self) -> None:
        """Remove the gradient-averaging hook (the bank is being deleted)."""
        if self._average_hook is not None:
            self._average_hook.remove()
            self._average_hook = None

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, capacity={self.weight.numel()}"


def keeping_precision(fn):
    """``fn`` (what ``Module._apply`` runs on each tensor) moving floating tensors without narrowing them.

    ``model.to(torch.bfloat16)``, ``.half()`` or ``.to("cuda", torch.float16)`` move the bank and the
    accumulated store but keep them fp32, so that small updates are not rounded away (the forward
    casts the deltas to the input's dtype); a wider dtype (``.double()``) is taken.
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        narrower = out.dtype != t.dtype and torch.promote_types(out.dtype, t.dtype) == t.dtype
        return t.detach().to(device=out.device) if t.is_floating_point() and narrower else out

    return apply


class _SliceCache:
    """One split of a bank into its layout's segments, valid while the bank is unchanged.

    The key is the bank tensor itself, its storage address, its in-place version counter
    (`trady_peft.compat.tensor_version`), whether it requires grad, and the layout. Reusing the
    split over several forwards is safe: ``split_with_sizes``'s backward keeps no saved tensor, so
    each backward pass (and a checkpoint's recomputation) can run through it again. Copies and
    pickles of a model start with an empty cache (the split outputs are not leaves).
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key, self.slices = None, None

    def get(self, weight: torch.Tensor, layout: tuple[tuple[int, int], ...]) -> dict | None:
        if not layout:
            return None
        key = (weight.data_ptr(), tensor_version(weight), weight.requires_grad, weight.numel(), layout)
        if self.slices is not None and self.key[0] is weight and self.key[1:] == key:
            return self.slices
        sizes, pieces, at = [], [], 0
        for offset, numel in layout:
            if offset < at or offset + numel > weight.numel():
                return None  # overlapping or out of range: the caller narrows
            if offset > at:
                sizes.append(offset - at)
                pieces.append(None)
            sizes.append(numel)
            pieces.append((offset, numel))
            at = offset + numel
        if at < weight.numel():
            sizes.append(weight.numel() - at)
            pieces.append(None)
        outputs = torch.split_with_sizes(weight, sizes)
        self.key = (weight, *key)
        self.slices = {p: t for p, t in zip(pieces, outputs) if p is not None}
        return self.slices

    def __reduce__(self):
        return (_SliceCache, ())
