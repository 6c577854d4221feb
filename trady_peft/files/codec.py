"""Exact plain-text encoding of tensors, for the JSON that a checkpoint's selection state is stored as."""

from __future__ import annotations

import base64

import numpy as np
import torch


def pack_tensor(t: torch.Tensor) -> str:
    """A 1-D float64/bool/int64 tensor as exact plain text (base64 of its little-endian bytes), for JSON."""
    t = t.detach().cpu().contiguous()
    return (
        f"{str(t.dtype).removeprefix('torch.')}:"
        + base64.b64encode(t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()).decode()
    )


def unpack_tensor(text: str) -> torch.Tensor:
    """Inverse of `pack_tensor`."""
    dtype, data = text.split(":", 1)
    array = np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype).newbyteorder("<"))
    return torch.from_numpy(array.astype(np.dtype(dtype)).copy())
