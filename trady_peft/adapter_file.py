"""What a TraDy adapter file holds, and how it is checked when it is loaded.

Per TraDy layer and adapter, a file (``adapter_model.safetensors``) holds two tensors:

* ``<layer>.trady_indices`` -- the input channels ever updated: a 1-D integer tensor, sorted,
  unique, each in ``[0, in_channels)`` (saved as int32);
* ``<layer>.trady_values`` -- their accumulated deltas, ``[n, *slice_shape]`` floating point
  (fp32), finite, one row per index.

peft inserts the adapter name before loading (``trady_indices.<adapter>``). A file that breaks
any of these rules would load silently and fail, or compute wrong outputs, at the first forward;
`check_layer_state` refuses it at load time instead, with an error that names the file (see
`loading_from`), the layer and the likely remedy.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

import torch

INDICES = "trady_indices"
VALUES = "trady_values"

# The file being read by the current ``load_adapter`` call, when there is one. A one-element
# list set by ``loading_from`` and filled in by the reader (see ``compat``), so that the checks
# below, which only see a state dict, can name the file.
_SOURCE: contextvars.ContextVar[list | None] = contextvars.ContextVar("trady_adapter_source", default=None)


@contextlib.contextmanager
def loading_from(path: str | os.PathLike | None = None) -> Iterator[list]:
    """Scope in which adapter tensors come from ``path`` (which the reader may fill in later)."""
    holder = [os.fspath(path) if path is not None else None]
    token = _SOURCE.set(holder)
    try:
        yield holder
    finally:
        _SOURCE.reset(token)


def record_source(path: str | os.PathLike) -> None:
    """Tell the enclosing `loading_from` scope which file is being read (no-op outside one)."""
    holder = _SOURCE.get()
    if holder is not None:
        holder[0] = os.fspath(path)


def current_source() -> str | None:
    """The adapter file being loaded, or None when the state dict did not come from a file."""
    holder = _SOURCE.get()
    return holder[0] if holder is not None else None


class AdapterFileError(ValueError):
    """An adapter file (or state dict) that does not fit the model it is loaded into."""


def _where() -> str:
    source = current_source()
    return f"adapter file {source!r}" if source else "the adapter state dict"


def _fail(layer: str, adapter: str, problem: str, remedy: str) -> None:
    raise AdapterFileError(
        f"Cannot load TraDy adapter {adapter!r} from {_where()}: layer {layer!r} {problem}. {remedy}"
    )


_OTHER_MODEL = "Was this adapter saved from another base model? Load it into the model it was trained on."
_DAMAGED = "The file looks damaged or was edited; save the adapter again or restore it from a backup."


def check_layer_state(state_dict: Mapping[str, torch.Tensor], prefix: str, adapters, geometry) -> None:
    """Check one TraDy layer's ``(indices, values)`` in ``state_dict`` for each adapter in ``adapters``.

    ``prefix`` is the layer's key prefix (``"...layer."``) and ``geometry`` its
    `trady_peft.geometry.ChannelGeometry`. Raises `AdapterFileError` (a
    ``ValueError``) naming the file, the layer and the remedy; returns None when all is well.
    """
    layer = prefix.rstrip(".")
    for adapter in adapters:
        idx = state_dict.get(f"{prefix}{INDICES}.{adapter}")
        val = state_dict.get(f"{prefix}{VALUES}.{adapter}")
        if idx is None and val is None:
            continue
        if idx is None or val is None:
            have, lacks = (INDICES, VALUES) if val is None else (VALUES, INDICES)
            _fail(layer, adapter, f"has {have} but no {lacks}", _DAMAGED)
        _check_pair(layer, adapter, idx, val, geometry)


def check_model_state(root, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """`check_layer_state` for every TraDy layer under ``root``, before anything is loaded.

    Called by the tuner, whose ``_load_from_state_dict`` runs before any child loads (and before it
    restarts a live delta), so a refused file leaves the model exactly as it was.
    """
    from .layer import TraDyLayer

    for name, module in root.named_modules():
        if isinstance(module, TraDyLayer):
            check_layer_state(state_dict, f"{prefix}{name}.", module.trady_delta.keys(), module.geometry)


def _check_pair(layer: str, adapter: str, idx: torch.Tensor, val: torch.Tensor, geometry) -> None:
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        _fail(layer, adapter, f"has channel indices of dtype {idx.dtype} (expected an integer dtype)", _DAMAGED)
    if idx.dim() != 1:
        _fail(layer, adapter, f"has channel indices of shape {tuple(idx.shape)} (expected 1-D)", _DAMAGED)
    if not val.dtype.is_floating_point:
        _fail(layer, adapter, f"has values of dtype {val.dtype} (expected floating point)", _DAMAGED)
    n = idx.numel()
    if val.dim() == 0 or val.shape[0] != n:
        rows = val.shape[0] if val.dim() else "no"
        _fail(layer, adapter, f"has {n} channel indices but {rows} rows of values", _DAMAGED)
    expected = tuple(geometry.slice_shape)
    if tuple(val.shape[1:]) != expected:
        _fail(
            layer,
            adapter,
            f"has channel slices of shape {tuple(val.shape[1:])}, but this model's layer has slices of shape "
            f"{expected} ({geometry.out_channels} outputs, {geometry.in_channels} inputs)",
            _OTHER_MODEL,
        )
    if n == 0 or idx.device.type == "meta" or val.device.type == "meta":
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= geometry.in_channels:
        bad = lo if lo < 0 else hi
        _fail(
            layer,
            adapter,
            f"refers to input channel {bad}, outside [0, {geometry.in_channels}) for this model",
            _OTHER_MODEL,
        )
    if n > 1 and not bool((idx[1:] > idx[:-1]).all()):
        if torch.unique(idx).numel() != n:
            _fail(layer, adapter, "lists some channel indices more than once", _DAMAGED)
        _fail(layer, adapter, "has channel indices that are not sorted in increasing order", _DAMAGED)
    if not bool(torch.isfinite(val).all()):
        _fail(layer, adapter, "has non-finite (NaN or infinite) delta values", _DAMAGED)
