"""What a redraw does to the optimizer.

At a redraw (`TraDyModel.resample`) the bank entries whose channel changed are zeroed and
start over on a new channel. Their optimizer state must start over too: each re-targeted entry
must be updated exactly as a freshly created optimizer would update it, while the entries that
keep their channel are left exactly as they are.

* **Adam / AdamW** (``torch.optim.Adam`` and subclasses, any of the for-loop, foreach or fused
  implementations, ``amsgrad`` included): the moments of the re-targeted entries are zeroed. The
  parameter's ``step`` counter is shared by all its entries and keeps counting, so torch's bias
  correction for those entries would use the global step ``t`` instead of their own step
  ``s = t - t_reset`` (first updates 1.2-1.8x too large). A step post-hook therefore replaces,
  for those entries only, torch's update by the fresh optimizer's:
  ``param += lr*m/bc1(t)/(sqrt(v)/sqrt(bc2(t))+eps) - lr*m/bc1(s)/(sqrt(v)/sqrt(bc2(s))+eps)``.
* **SGD with momentum**: the momentum buffer of the re-targeted entries is zeroed. With
  ``dampening == 0`` the next step sets ``buf = grad``, as a fresh SGD does; with dampening it
  would set ``buf = (1 - dampening) * grad``, so the post-hook rescales the buffer and the step
  (``dampening == 1`` cannot be corrected and warns).
* **Any other optimizer** (Adafactor, 8-bit or paged optimizers, RAdam, ...): every state
  tensor shaped like the parameter is zeroed on the re-targeted entries, without any step
  correction; a warning says so once per optimizer class.

The bookkeeping lives in the optimizer state of the parameter, so it travels with
``optimizer.state_dict()`` (a Trainer's ``optimizer.pt``): one row ``(start, stop, step_at_reset,
last_corrected_step)`` per re-targeted range, no per-value memory. torch's ``load_state_dict``
casts every state tensor to the parameter's dtype, so the int64 rows are stored as their bytes
(a uint8 tensor, whose values any float dtype holds exactly). A record is dropped once both bias
corrections agree to ~1e-10. The hook is registered once, globally
(``torch.optim.optimizer.register_optimizer_step_post_hook``), so it also serves an optimizer
re-created and loaded from a checkpoint, and one wrapped by accelerate; it only acts on
parameters whose state holds a record.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..compat import has_zero_master
from .distributed import reset_deepspeed_state

_KEY = "trady_reset"  # optimizer-state key of the records
_CHUNK = 1 << 20  # values corrected at a time (bounds the hook's temporaries)
_NEGLIGIBLE = 1e-10  # beta ** s below which a record's correction no longer matters
_warned: set[type] = set()


def _unwrap(optimizer):
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _group_of(optimizer, parameter: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is parameter for p in group["params"]):
            return group
    raise ValueError("The parameter is not trained by this optimizer.")


def _read(state: dict) -> list[list[int]]:
    rows = state.get(_KEY)
    if rows is None:
        return []
    if rows.dtype != torch.uint8 or rows.device.type != "cpu":  # cast by load_state_dict
        rows = rows.to("cpu").to(torch.uint8)
        state[_KEY] = rows
    return rows.contiguous().view(torch.int64).tolist()


def _write(state: dict, rows: list[list[int]]) -> None:
    if rows:
        state[_KEY] = torch.tensor(rows, dtype=torch.int64).view(torch.uint8)
    else:
        state.pop(_KEY, None)


def _coalesce(segments) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in segments if b > a):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]


def _add_records(state: dict, segments: list[tuple[int, int]], step: int) -> None:
    """Record ``segments`` as reset at ``step``; older records lose what overlaps them."""
    new = _coalesce(segments)
    rows = []
    for start, stop, reset, last in _read(state):
        pieces = [(start, stop)]
        for a, b in new:
            pieces = [p for s, e in pieces for p in ((s, min(e, a)), (max(s, b), e)) if p[1] > p[0]]
        rows += [[s, e, reset, last] for s, e in pieces]
    rows += [[a, b, step, step] for a, b in new]
    rows.sort()
    merged: list[list[int]] = []
    for row in rows:
        if merged and merged[-1][1] == row[0] and merged[-1][2:] == row[2:]:
            merged[-1][1] = row[1]
        else:
            merged.append(row)
    _write(state, merged)


def reset_optimizer_state(optimizer, parameter: torch.Tensor, segments: list[tuple[int, int]]) -> int:
    """Make ``optimizer`` treat ``parameter[start:stop]`` (each segment) as freshly created.

    Zeroes the per-entry state (moments, momentum) of the segments and, for Adam/AdamW and
    dampened SGD, records them so that their next updates are those of a fresh optimizer (see
    the module docstring). Works with torch optimizers and accelerate's ``AcceleratedOptimizer``.
    Returns the number of state tensors touched.
    """
    if has_zero_master(parameter):  # DeepSpeed ZeRO: the state lives in its flat partitions
        return reset_deepspeed_state(parameter, segments) if segments else 0
    optimizer = _unwrap(optimizer)
    state = optimizer.state.get(parameter) if hasattr(optimizer, "state") else None
    if not state or not segments:
        return 0
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            for start, stop in segments:
                value[start:stop].zero_()
            touched += 1
    group = _group_of(optimizer, parameter)
    if isinstance(optimizer, torch.optim.Adam):
        if group.get("differentiable"):
            raise NotImplementedError("TraDy cannot reset the state of a differentiable Adam.")
        step = state.get("step")
        if step is not None and float(step) > 0:
            _add_records(state, segments, int(float(step)))
    elif isinstance(optimizer, torch.optim.SGD):
        if group["momentum"] and group["dampening"] and state.get("momentum_buffer") is not None:
            if group["dampening"] == 1:
                _warn_once(type(optimizer), "with dampening=1 the momentum of re-targeted entries stays zero")
            else:
                _add_records(state, segments, 0)
    else:
        _warn_once(type(optimizer), "their state is zeroed but not step-corrected")
    return touched


def forget_optimizer_state(optimizer, parameter: torch.Tensor) -> bool:
    """Drop ``optimizer``'s state for ``parameter`` if it no longer matches the parameter's shape (a
    resized bank), so that its next step starts it afresh. Returns whether state was dropped."""
    optimizer = _unwrap(optimizer)
    state = (optimizer.state.get(parameter) if hasattr(optimizer, "state") else None) or {}
    # per-entry state (moments, momentum) has the parameter's shape; the step and TraDy's records do not
    per_entry = [v for k, v in state.items() if k != _KEY and isinstance(v, torch.Tensor) and v.dim()]
    if all(v.shape == parameter.shape for v in per_entry):
        return False
    del optimizer.state[parameter]
    return True


def _warn_once(cls: type, what: str) -> None:
    if cls not in _warned:
        _warned.add(cls)
        warnings.warn(
            f"TraDy resets {cls.__name__} for re-targeted bank entries only approximately: {what}. "
            "Adam, AdamW and SGD are reset exactly.",
            stacklevel=3,
        )


@torch.no_grad()
def _correct_adam(group: dict, param: torch.Tensor, state: dict) -> None:
    rows = _read(state)
    t = int(float(state["step"]))
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps = float(group["lr"]), group["eps"]
    m = state["exp_avg"]
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    keep = []
    for start, stop, reset, last in rows:
        if t <= last:  # this parameter did not step (no gradient), or already corrected
            keep.append([start, stop, reset, last])
            continue
        s = t - reset
        # torch's non-capturable formula, undone with the global step, redone with the local one
        for k, sign in ((t, 1.0), (s, -1.0)):
            step_size = lr / (1 - beta1**k)
            bc2_sqrt = (1 - beta2**k) ** 0.5
            for a in range(start, stop, _CHUNK):
                b = min(stop, a + _CHUNK)
                denom = (v[a:b].sqrt() / bc2_sqrt).add_(eps)
                param[a:b].addcdiv_(m[a:b], denom, value=sign * step_size)
        if max(beta1**s, beta2**s) >= _NEGLIGIBLE:
            keep.append([start, stop, reset, t])
    _write(state, keep)


@torch.no_grad()
def _correct_sgd(group: dict, param: torch.Tensor, state: dict) -> None:
    # First step after the reset: torch set buf = (1 - d) * g where a fresh SGD sets buf = g.
    keep = 1.0 - group["dampening"]
    lr = float(group["lr"])
    buf = state["momentum_buffer"]
    for start, stop, _, _ in _read(state):
        for a in range(start, stop, _CHUNK):
            b = min(stop, a + _CHUNK)
            grad = buf[a:b] / keep
            param[a:b].add_(grad - buf[a:b], alpha=-lr)
            buf[a:b].copy_(grad)
    _write(state, [])


def _after_step(optimizer, args, kwargs) -> None:
    """Global step post-hook: correct the entries recorded by `reset_optimizer_state`."""
    state = getattr(optimizer, "state", None)
    if not state:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = state.get(param)
            if not entry or _KEY not in entry:
                continue
            if isinstance(optimizer, torch.optim.Adam):
                _correct_adam(group, param, entry)
            elif isinstance(optimizer, torch.optim.SGD) and param.grad is not None:
                _correct_sgd(group, param, entry)


_hook = register_optimizer_step_post_hook(_after_step)
