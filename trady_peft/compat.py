"""Every private peft/torch/transformers API that trady-peft patches or relies on, in one place.

Installed by ``import trady_peft`` (`install`, idempotent). Each assumption below is
commented with the versions it was checked against and has one test in ``tests/test_compat.py``,
so that an upgrade which breaks one fails one clear test.

What is patched, and why:

* **Atomic saves.** ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` in place;
  a failure half-way (disk full, a crash) leaves a truncated file and the adapter saved before
  is lost. `atomic_save_file` writes a temporary file in the same directory, fsyncs it and
  ``os.replace``-s it over the target. Harmless for other methods (LoRA files are written the
  same way).
* **Errors that name the file.** A truncated or garbage file makes safetensors raise an error
  that names no file; `_load_file_naming_path` re-raises it as a ``ValueError`` with the path.
* **Which file is being loaded.** ``PeftModel.load_adapter`` (used by ``from_pretrained`` and by
  the Trainer's checkpoint resume) is wrapped in `trady_peft.adapter_file.loading_from`,
  so the checks run by each TraDy layer's ``_load_from_state_dict`` can name the file.

Private APIs used where they are needed (kept there because they are one line of the data path),
each with its own test in ``tests/test_compat.py`` as well: the `PeftType` member recipe
(``_registration.py``), ``peft.tuners._buffer_dict.BufferDict`` (``layer.py``),
``torch.ops.aten.convolution_backward`` and ``Conv._reversed_padding_repeated_twice``
(``geometry.py``), peft's state-dict classmethods ``_get_adapter_state_dict`` /
``_remove_adapter_name_from_key`` (``model.py``), and ``__class__`` swaps of frozen modules
(``frozen_path.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid

import safetensors.torch
import torch

# peft 0.21.2: names of sequence-classification heads (peft.utils.constants, not exported).
from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # noqa: F401

from .adapter_file import loading_from, record_source

_MARK = "__trady_compat__"


# --------------------------------------------------------------------------------------- saving
def atomic_save_file(tensors, filename, metadata=None) -> None:
    """``safetensors.torch.save_file``, but the target is replaced only by a complete, synced file."""
    filename = os.fspath(filename)
    directory = os.path.dirname(os.path.abspath(filename))
    # A fresh name in the same directory (same file system, so os.replace is atomic), created by
    # the writer itself so that it gets the usual permissions (umask), unlike mkstemp's 0600.
    tmp = os.path.join(directory, f".{os.path.basename(filename)}.{uuid.uuid4().hex}.tmp")
    try:
        # Looked up at call time: `safetensors.torch.save_file` (safetensors 0.8) is the writer.
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -------------------------------------------------------------------------------------- loading
def _load_file_naming_path(original):
    @functools.wraps(original)
    def load_file(filename, *args, **kwargs):
        record_source(filename)
        try:
            return original(filename, *args, **kwargs)
        except safetensors.SafetensorError as err:  # a bad header or short data; not a missing file or OOM
            raise ValueError(
                f"Could not read adapter file {os.fspath(filename)!r}: {err}. The file is truncated or corrupt "
                "(an interrupted save or download?); save the adapter again, or delete the file and download it "
                "again."
            ) from err

    setattr(load_file, _MARK, True)
    return load_file


def _load_adapter_naming_source(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, *args, **kwargs):
        # The reader fills in the exact file (local or from the Hub cache); the id is a fallback.
        with loading_from(model_id):
            return original(self, model_id, *args, **kwargs)

    setattr(load_adapter, _MARK, True)
    return load_adapter


# -------------------------------------------------------------------------------------- install
def install() -> None:
    """Apply the patches above (idempotent)."""
    import peft.peft_model
    import peft.utils.save_and_load

    # peft 0.21.2, peft/peft_model.py: `from safetensors.torch import save_file as safe_save_file`;
    # PeftModel.save_pretrained calls `safe_save_file(state_dict, path, metadata={"format": "pt"})`.
    peft.peft_model.safe_save_file = atomic_save_file

    # peft 0.21.2, peft/utils/save_and_load.py: `from safetensors.torch import load_file as
    # safe_load_file`; load_peft_weights calls `safe_load_file(filename, device=...)` with the
    # resolved local path (also for files downloaded from the Hub).
    module = peft.utils.save_and_load
    if not getattr(module.safe_load_file, _MARK, False):
        module.safe_load_file = _load_file_naming_path(module.safe_load_file)

    # peft 0.21.2: PeftModel.from_pretrained calls `model.load_adapter(model_id, adapter_name, ...)`,
    # and transformers 5.24's Trainer resumes a PeftModel checkpoint with `model.load_adapter(dir, name)`.
    # load_adapter reads the weights (load_peft_weights) then calls set_peft_model_state_dict, which
    # ends in torch's `load_state_dict` (torch 2.13: each module's `_load_from_state_dict` gets the
    # keys under its prefix, before its children load).
    cls = peft.peft_model.PeftModel
    if not getattr(cls.load_adapter, _MARK, False):
        cls.load_adapter = _load_adapter_naming_source(cls.load_adapter)

    # peft 0.21.2: `PeftModel.save_pretrained` writes its card by calling
    # `self.create_or_update_model_card(save_directory)` (once, on the main process); there is no
    # hook for a method to add to that card, so the TraDy section is added after it.
    if not getattr(cls.create_or_update_model_card, _MARK, False):
        cls.create_or_update_model_card = _with_trady_card_section(cls.create_or_update_model_card)

    # transformers 5.24, transformers/trainer.py: `DEFAULT_CALLBACKS = [DefaultFlowCallback]` is read
    # by every Trainer.__init__; a class appended there runs in every Trainer (here: a watchdog that
    # warns when a dynamic strategy trains for epochs without TraDyCallback).
    import transformers.trainer

    from .callback import PeriodWatchdog

    if PeriodWatchdog not in transformers.trainer.DEFAULT_CALLBACKS:
        transformers.trainer.DEFAULT_CALLBACKS.append(PeriodWatchdog)


def _with_trady_card_section(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        from .hub import add_card_section

        original(self, output_dir)
        add_card_section(self, output_dir)

    setattr(create_or_update_model_card, _MARK, True)
    return create_or_update_model_card


# ------------------------------------------------------------------------- periods and Trainer
def in_backward() -> bool:
    """Whether the caller runs inside an autograd backward pass.

    torch 2.13: ``torch._C._current_autograd_node()`` returns the node being executed during
    backward and None outside of it.
    """
    return torch._C._current_autograd_node() is not None


def move_callback_first(callback) -> bool:
    """Put ``callback`` first in the ``CallbackHandler`` that is calling it (from ``on_init_end``).

    transformers 5.24: integrations (TensorBoard, W&B, ...) are registered before user callbacks
    and all share one ``logs`` dict in ``on_log``; metrics added by a later callback never reach
    them. The handler is not passed to callbacks, so it is found as ``self`` of the calling
    ``CallbackHandler.call_event`` frame. Returns whether it was found.
    """
    import inspect

    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        while frame is not None:
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and callback in handler.callbacks:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
                return True
            frame = frame.f_back
        return False
    finally:
        del frame


def tensor_leaves(tree) -> list:
    """Every tensor in nested tuples, lists and dicts (torch 2.13: ``torch.utils._pytree.tree_leaves``)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


# -------------------------------------------------------------------------------- DeepSpeed ZeRO
def is_zero3_param(tensor) -> bool:
    """Whether ``tensor`` is a parameter DeepSpeed ZeRO-3 partitions.

    deepspeed 0.19.8: ``deepspeed.initialize`` (or ``zero.Init``) gives each ZeRO-3 parameter a
    ``ds_id`` and its full size as ``ds_numel`` (``param.numel()`` is 0 while it is partitioned);
    ``deepspeed.utils.safe_get_full_fp32_param`` tells stage 3 apart by the same attribute.
    """
    return hasattr(tensor, "ds_id")


def has_zero_master(tensor) -> bool:
    """Whether a DeepSpeed ZeRO optimizer keeps an fp32 master copy of ``tensor`` (any stage).

    deepspeed 0.19.8: stages 1 and 2 link each parameter to its fp32 fragment as ``_hp_mapping``
    (what ``deepspeed.utils.safe_set_full_fp32_param`` looks for); stage 3 parameters carry ``ds_id``.
    """
    return is_zero3_param(tensor) or getattr(tensor, "_hp_mapping", None) is not None


# ------------------------------------------------------------------ backprop stop (trady_peft.backprop)
def reentrant_checkpointing(module) -> bool:
    """Whether ``module`` (a transformers ``GradientCheckpointingLayer``) runs under torch's reentrant
    checkpoint when it trains.

    transformers 5.24, modeling_layers.py: ``activation_checkpointing_enable`` sets
    ``layer.gradient_checkpointing = True`` and ``layer._gradient_checkpointing_func =
    functools.partial(checkpoint, **kwargs)``; torch 2.13's ``checkpoint`` treats a missing
    ``use_reentrant`` as True (with a warning).
    """
    if not getattr(module, "gradient_checkpointing", False):
        return False
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", True)) if func is not None else False


# The forward hooks that make the input embeddings' output require grad: transformers'
# ``enable_input_require_grads`` (``make_inputs_require_grads``, modeling_utils.py) and peft's
# fallback in ``prepare_model_for_kbit_training`` / ``PeftModel`` (``make_inputs_require_grad``).
REQUIRE_GRAD_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def has_require_grad_hook(module) -> bool:
    """Whether one of ``module``'s forward hooks is transformers' or peft's "make the output require
    grad" hook (by function name; torch 2.13 keeps forward hooks in ``Module._forward_hooks``)."""
    return any(getattr(hook, "__name__", None) in REQUIRE_GRAD_HOOK_NAMES for hook in module._forward_hooks.values())


def run_forward_hook_last(module, handle) -> None:
    """Move the forward hook of ``handle`` to the end of ``module``'s forward hooks, so that it sees
    what hooks registered later (e.g. transformers' ``enable_input_require_grads``) did.

    torch 2.13: ``Module._forward_hooks`` is an ``OrderedDict`` keyed by ``RemovableHandle.id``, run
    in order.
    """
    hooks = module._forward_hooks
    if handle.id in hooks:
        hooks.move_to_end(handle.id)


class _GlobalModuleTracker:
    """Stands in for torch's ``ModuleTracker`` inside a ``FlopCounterMode``: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def flop_counter_without_module_tracking():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no display) that counts totals only.

    Its module tracker hooks every module call, including those TraDy's frozen path makes inside
    ``backward()`` (a recomputation differentiated with ``torch.autograd.grad``), where its
    multi-grad hooks raise on leaf inputs. Private: replaces the counter's ``mod_tracker``
    attribute, whose ``parents`` set names where each count goes; ``get_total_flops()`` reads
    "Global".
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalModuleTracker()
    return counter


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place modification counter of ``tensor`` (shared by all its views).

    torch 2.x: ``Tensor._version`` is bumped by every in-place operation (an optimizer step,
    ``zero_()``, ``copy_``); autograd uses the same counter to detect saved tensors modified in
    place. TraDy uses it to know when one forward's split of a bank may no longer be reused.
    """
    return tensor._version
