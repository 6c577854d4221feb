"""Atomic saves: an adapter file is replaced only by a complete, synced file.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` in place; a failure half-way
(disk full, a crash) would leave a truncated file and lose the adapter saved before.
`atomic_save_file` writes a temporary file in the same directory, fsyncs it and ``os.replace``-s
it over the target. ``import trady_peft`` makes peft save with it (harmless for other methods:
LoRA files are written the same way).
"""

from __future__ import annotations

import contextlib
import os
import uuid

import safetensors.torch


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
