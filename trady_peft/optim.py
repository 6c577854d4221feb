"""What a redraw does to the optimizer: the state of re-targeted bank entries starts afresh."""

from __future__ import annotations

import torch


def reset_optimizer_state(optimizer, parameter: torch.Tensor, segments: list[tuple[int, int]]) -> int:
    """Zero the per-entry optimizer state (moments, momentum) of ``parameter`` in ``segments``.

    Works with torch optimizers and accelerate's ``AcceleratedOptimizer`` (its ``.state`` proxies
    the real one). Returns the number of state tensors touched.
    """
    state = optimizer.state.get(parameter) if hasattr(optimizer, "state") else None
    if not state or not segments:
        return 0
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            for start, stop in segments:
                value[start:stop].zero_()
            touched += 1
    return touched
