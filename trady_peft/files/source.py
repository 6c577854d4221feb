"""Which adapter file is being loaded, so that errors raised deep inside a load can name it.

``PeftModel.load_adapter`` (used by ``from_pretrained`` and by the Trainer's checkpoint resume) runs
inside `loading_from`, and the safetensors reader records the exact file (`naming_path`), so the
checks run by each TraDy layer's ``_load_from_state_dict`` (`trady_peft.files.format`), which see
only a state dict, can name the file. A truncated or garbage file makes safetensors raise an error
that names no file; `naming_path` re-raises it as a ``ValueError`` with the path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import safetensors

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


def naming_path(load_file):
    """Wrap a safetensors ``load_file``: record the file being read, and name it in read errors."""

    @functools.wraps(load_file)
    def wrapped(filename, *args, **kwargs):
        record_source(filename)
        try:
            return load_file(filename, *args, **kwargs)
        except safetensors.SafetensorError as err:  # a bad header or short data; not a missing file or OOM
            raise ValueError(
                f"Could not read adapter file {os.fspath(filename)!r}: {err}. The file is truncated or corrupt "
                "(an interrupted save or download?); save the adapter again, or delete the file and download it "
                "again."
            ) from err

    return wrapped


def naming_source(load_adapter):
    """Wrap ``PeftModel.load_adapter`` in `loading_from` its model id (the reader fills in the exact file)."""

    @functools.wraps(load_adapter)
    def wrapped(self, model_id, *args, **kwargs):
        with loading_from(model_id):
            return load_adapter(self, model_id, *args, **kwargs)

    return wrapped
