"""Every private peft / torch / transformers API trady-peft relies on, in one place.

Each entry says what it is and the version it was checked against; ``tests/test_compat.py`` holds
one test per assumption, so that an upgrade that breaks one fails one clear test.
"""

from __future__ import annotations

import torch

# peft 0.21.2: names of sequence-classification heads (peft.utils.constants, not exported).
from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # noqa: F401


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
