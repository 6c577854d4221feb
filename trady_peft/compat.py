"""Every private peft/torch/transformers API that trady-peft relies on, in one leaf module.

Nothing here imports from the rest of the package: callers hand in what is theirs. Each
assumption is commented with the versions it was checked against and has one test in
``tests/test_compat.py``, so that an upgrade which breaks one fails one clear test.

* **Registration.** peft has no plugin hook: ``register_peft_method`` only accepts names that
  are already members of the ``PeftType`` enum. `ensure_peft_type` adds a ``TRADY`` member with
  a recipe that works on Python 3.10-3.13 (3.12 removed ``EnumType.__getattr__``; 3.13 stopped
  appending to ``_member_names_``); `register_method` registers the config and tuner classes.
  Both are idempotent, so importing twice or ``importlib.reload`` is safe.
* **Patches** (applied by ``trady_peft._patches``): the safetensors writer and reader peft's
  saving and loading call, ``PeftModel`` methods, and the Trainer's default callbacks.
* **Helpers** over private attributes: the autograd node being run, the module calls on the
  stack, the Trainer's callback
  handler, pytree flattening, DeepSpeed's parameter attributes, transformers' checkpointing
  attributes and input-grad hooks, torch's forward-hook order, a tensor's version counter,
  peft's ``BufferDict`` and the sequence-classification head names.

Private APIs that are one line of a data path stay there, each with its own test in
``tests/test_compat.py`` as well: ``torch.ops.aten.convolution_backward`` and
``Conv._reversed_padding_repeated_twice`` (``core/geometry.py``), peft's state-dict classmethod
``_get_adapter_state_dict`` (``model.py``), and ``__class__`` swaps of frozen modules
(``memory/frozen_path``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

# peft 0.21.2: a dict of buffers that moves with the module (peft.tuners._buffer_dict, not exported).
from peft.tuners._buffer_dict import BufferDict  # noqa: F401
from peft.utils import PeftType

# peft 0.21.2: names of sequence-classification heads (peft.utils.constants, not exported).
from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # noqa: F401

_MARK = "__trady_compat__"


# --------------------------------------------------------------------------------- registration
def ensure_peft_type() -> PeftType:
    """Return ``PeftType.TRADY``, adding the member to peft's enum the first time."""
    member = PeftType._value2member_map_.get("TRADY")
    if member is not None:
        return member
    member = str.__new__(PeftType, "TRADY")
    member._name_ = "TRADY"
    member._value_ = "TRADY"
    type.__setattr__(PeftType, "TRADY", member)
    PeftType._member_map_["TRADY"] = member
    PeftType._value2member_map_["TRADY"] = member
    if "TRADY" not in PeftType._member_names_:
        PeftType._member_names_.append("TRADY")
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register a config and tuner class with peft under ``PeftType.TRADY`` (idempotent).

    peft 0.21.2: ``register_peft_method`` fills ``PEFT_TYPE_TO_CONFIG_MAPPING``,
    ``PEFT_TYPE_TO_TUNER_MAPPING`` and ``PEFT_TYPE_TO_PREFIX_MAPPING`` and refuses a second call;
    after a reload the mappings are pointed at the new classes directly.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


# -------------------------------------------------------------------------------------- patches
def _marked(function):
    setattr(function, _MARK, True)
    return function


def replace_peft_save_file(save_file) -> None:
    """Make ``PeftModel.save_pretrained`` write ``adapter_model.safetensors`` with ``save_file``.

    peft 0.21.2, peft/peft_model.py: ``from safetensors.torch import save_file as
    safe_save_file``; ``PeftModel.save_pretrained`` calls ``safe_save_file(state_dict, path,
    metadata={"format": "pt"})``.
    """
    import peft.peft_model

    peft.peft_model.safe_save_file = save_file


def wrap_peft_load_file(wrapper) -> None:
    """Wrap the safetensors reader peft loads adapter weights with (once): ``wrapper(original)``.

    peft 0.21.2, peft/utils/save_and_load.py: ``from safetensors.torch import load_file as
    safe_load_file``; ``load_peft_weights`` calls ``safe_load_file(filename, device=...)`` with the
    resolved local path (also for files downloaded from the Hub).
    """
    import peft.utils.save_and_load as module

    if not getattr(module.safe_load_file, _MARK, False):
        module.safe_load_file = _marked(wrapper(module.safe_load_file))


def wrap_peft_model_method(name: str, wrapper) -> None:
    """Replace ``PeftModel.<name>`` by ``wrapper(original)`` (once).

    peft 0.21.2: ``PeftModel.from_pretrained`` calls ``model.load_adapter(model_id, adapter_name,
    ...)``, and transformers 5.24's Trainer resumes a PeftModel checkpoint with
    ``model.load_adapter(dir, name)``; ``PeftModel.save_pretrained`` writes its card by calling
    ``self.create_or_update_model_card(save_directory)`` once, on the main process, with no hook
    for a method to add to that card.
    """
    from peft.peft_model import PeftModel

    original = getattr(PeftModel, name)
    if not getattr(original, _MARK, False):
        setattr(PeftModel, name, _marked(functools.wraps(original)(wrapper(original))))


def add_default_trainer_callback(callback_cls: type) -> None:
    """Make every ``transformers.Trainer`` run ``callback_cls`` (once).

    transformers 5.24, transformers/trainer.py: ``DEFAULT_CALLBACKS = [DefaultFlowCallback]`` is
    read by every ``Trainer.__init__``.
    """
    import transformers.trainer

    if callback_cls not in transformers.trainer.DEFAULT_CALLBACKS:
        transformers.trainer.DEFAULT_CALLBACKS.append(callback_cls)


# ------------------------------------------------------------------------- periods and Trainer
def in_backward() -> bool:
    """Whether the caller runs inside an autograd backward pass.

    torch 2.13: ``torch._C._current_autograd_node()`` returns the node being executed during
    backward and None outside of it.
    """
    return torch._C._current_autograd_node() is not None


def module_calls_on_stack(module) -> int:
    """How many calls of ``module`` are running on this thread's stack (nested calls count each).

    torch 2.13: ``Module.__call__`` (``_wrapped_call_impl``) runs ``Module._call_impl(self, ...)``,
    which calls the forward hooks and ``forward``; one such frame whose ``self`` is ``module`` is one call.
    """
    code = torch.nn.Module._call_impl.__code__
    frame, count = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("self") is module:
            count += 1
        frame = frame.f_back
    return count


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


def tree_flatten(tree, is_leaf) -> tuple[list, Any]:
    """``(leaves, spec)`` of ``tree``, with every node for which ``is_leaf`` is true kept whole.

    torch 2.13: ``torch.utils._pytree.tree_flatten`` asks ``is_leaf`` before it opens any node
    (even a type pytree knows, such as a namedtuple), keeps a dict's keys in insertion order,
    and its spec rebuilds plain tuples, lists and dicts with `tree_unflatten`.
    """
    from torch.utils._pytree import tree_flatten as flatten

    return flatten(tree, is_leaf=is_leaf)


def tree_unflatten(leaves: list, spec) -> Any:
    """The structure `tree_flatten` gave ``spec`` for, with ``leaves`` in its leaves' places
    (torch 2.13: ``torch.utils._pytree.tree_unflatten``)."""
    from torch.utils._pytree import tree_unflatten as unflatten

    return unflatten(leaves, spec)


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


# ------------------------------------------------------------------ backprop stop (memory/backprop.py)
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


def resize_parameter(parameter: torch.Tensor, data: torch.Tensor) -> None:
    """Give ``parameter`` (the same object) ``data`` of another shape, with no gradient.

    torch 2.13: ``parameter.data = data`` keeps the gradient accumulator autograd caches for the
    parameter while a graph of an earlier step (the last loss, still referenced) holds it, and that
    accumulator expects the old shape; ``set_data`` drops it only on a dtype or device change. So
    the data passes through another dtype first.
    """
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    with torch.no_grad():
        parameter.data = data.new_empty(0, dtype=other)
        parameter.data = data
    parameter.grad = None


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place modification counter of ``tensor`` (shared by all its views).

    torch 2.x: ``Tensor._version`` is bumped by every in-place operation (an optimizer step,
    ``zero_()``, ``copy_``); autograd uses the same counter to detect saved tensors modified in
    place. TraDy uses it to know when one forward's split of a bank may no longer be reused.
    """
    return tensor._version


# -------------------------------------------------------------------------- the causal-LM loss
def causal_lm_loss():
    """transformers' stock causal-LM loss (``LOSS_MAPPING["ForCausalLM"]``, transformers 5.24
    ``transformers.loss.loss_utils``), or None where it cannot be found."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # pragma: no cover
        return None
    return LOSS_MAPPING.get("ForCausalLM")


def loss_function_of(module):
    """What ``module.loss_function`` returns, without reading the property.

    transformers 5.24, ``PreTrainedModel.loss_function``: the loss set on the model (kept as
    ``_loss_function``), else the one its ``loss_type`` (from the class name) maps to in
    ``LOSS_MAPPING``, else the causal-LM loss. The last case logs that ``loss_type=None`` is
    unrecognized, which must not appear for a model nothing asked for its loss.
    """
    if "_loss_function" in module.__dict__:
        return module.__dict__["_loss_function"]
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING.get(getattr(module, "loss_type", None)) or causal_lm_loss()
