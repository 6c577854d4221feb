"""What a TraDy adapter file holds, and how it is checked when it is loaded.

Per TraDy layer and adapter, a file (``adapter_model.safetensors``) holds two tensors:

* ``<layer>.trady_indices`` -- the input channels ever updated: a 1-D integer tensor, sorted,
  unique, each in ``[0, in_channels)`` (saved as int32);
* ``<layer>.trady_values`` -- their accumulated deltas, ``[n, *slice_shape]`` floating point
  (fp32), finite, one row per index.

peft inserts the adapter name before loading (``trady_indices.<adapter>``). A file that breaks
any of these rules would load silently and fail, or compute wrong outputs, at the first forward;
`check_layer_state` refuses it at load time instead, with an error that names the file (see
`trady_peft.files.source.loading_from`), the layer and the likely remedy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .source import current_source

#: The prefix of every TraDy tensor name (peft's tuner prefix): peft finds an adapter's tensors by it.
PREFIX = "trady_"
INDICES = PREFIX + "indices"
VALUES = PREFIX + "values"


class AdapterFileError(ValueError):
    """An adapter file (or state dict) that does not fit the model it is loaded into."""


def _where() -> str:
    source = current_source()
    return f"adapter file {source!r}" if source else "the adapter state dict"


def _fail(layer: str, adapter: str, problem: str, remedy: str) -> None:
    raise AdapterFileError(
        f"Cannot load TraDy adapter {adapter!r} from {_where()}: layer {layer!r} {problem}. {remedy}"
    )


def refuse_adapter(adapter: str, problem: str, remedy: str) -> None:
    """Raise `AdapterFileError` for a whole adapter: ``problem`` says what is wrong, ``remedy`` what to do."""
    raise AdapterFileError(f"Cannot load TraDy adapter {adapter!r} from {_where()}: {problem}. {remedy}")


_OTHER_MODEL = "Was this adapter saved from another base model? Load it into the model it was trained on."
_DAMAGED = "The file looks damaged or was edited; save the adapter again or restore it from a backup."


def check_layer_state(state_dict: Mapping[str, torch.Tensor], prefix: str, adapters, geometry) -> None:
    """Check one TraDy layer's ``(indices, values)`` in ``state_dict`` for each adapter in ``adapters``.

    ``prefix`` is the layer's key prefix (``"...layer."``) and ``geometry`` its
    `trady_peft.core.geometry.ChannelGeometry`. Raises `AdapterFileError` (a
    ``ValueError``) naming the file, the layer and the remedy; returns None when all is well.
    """
    layer = prefix.rstrip(".")
    for adapter in adapters:
        idx = state_dict.get(f"{prefix}{INDICES}.{adapter}")
        val = state_dict.get(f"{prefix}{VALUES}.{adapter}")
        if idx is None and val is None:
            continue
        if idx is None or val is None:
            if (idx if val is None else val).numel() == 0:
                continue  # an empty store, one of whose empty tensors a saver dropped (see `absent_means_empty`)
            have, lacks = (INDICES, VALUES) if val is None else (VALUES, INDICES)
            _fail(layer, adapter, f"has {have} but no {lacks}", _DAMAGED)
        _check_pair(layer, adapter, idx, val, geometry)


def check_model_state(layers: Iterable, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """`check_layer_state` for every ``(name, layer)`` of ``layers`` (TraDy layers), before anything is loaded.

    Called by the tuner, whose ``_load_from_state_dict`` runs before any child loads (and before it
    restarts a live delta), so a refused file leaves the model exactly as it was. Also refuses an
    adapter file that holds no TraDy tensor at all (another method's weights beside a TraDy
    ``adapter_config.json``) and one with stores for layers this model's config does not wrap (an
    edited, narrower ``target_modules``), which would otherwise load as a silent no-op or drop deltas.
    """
    layers = list(layers)
    source = current_source()
    if source is not None and state_dict and not any(f".{PREFIX}" in f".{k}" for k in state_dict):
        sample = sorted(state_dict)[:2]
        raise AdapterFileError(
            f"Cannot load TraDy adapter from {_where()}: it holds no TraDy tensor (its tensors are named like "
            f"{sample}), although its adapter_config.json says peft_type 'TRADY'. It was saved by another method: "
            "load it with that method's adapter_config.json, or load the TraDy adapter's own directory."
        )
    names = {name for name, _ in layers}
    # peft passes the keys of layers it did not wrap through unchanged, without the adapter name.
    marker = f".{INDICES}"
    stranded = sorted(
        {key[len(prefix) :].rpartition(marker)[0] for key in state_dict if key.startswith(prefix) and marker in key}
        - names
    )
    if stranded:
        raise AdapterFileError(
            f"Cannot load TraDy adapter from {_where()}: it holds deltas for {len(stranded)} layer(s) this model's "
            f"TraDy config does not wrap (e.g. {stranded[:3]}), which would be dropped. Load it with the "
            "adapter_config.json it was saved with (add those layers back to target_modules)."
        )
    for name, layer in layers:
        check_layer_state(state_dict, f"{prefix}{name}.", layer.trady_delta.keys(), layer.geometry)


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


def check_tensors_loaded(peft_type, unexpected_keys, model_id) -> None:
    """Refuse a load that left TraDy tensors unused because the adapter's config names another method
    (a LoRA ``adapter_config.json`` beside TraDy weights): the adapter would silently do nothing."""
    stray = sorted((k for k in unexpected_keys or () if f".{PREFIX}" in f".{k}"), key=lambda k: INDICES not in k)
    if stray and str(getattr(peft_type, "value", peft_type)) != "TRADY":
        raise AdapterFileError(
            f"The adapter {str(model_id)!r} holds TraDy tensors (e.g. {stray[0]!r}) but its adapter_config.json "
            f"says peft_type {str(getattr(peft_type, 'value', peft_type))!r}, so none of them was loaded and the "
            "adapter would do nothing. Load it with the TraDy adapter_config.json it was saved with (peft_type "
            "'TRADY', after import trady_peft)."
        )
