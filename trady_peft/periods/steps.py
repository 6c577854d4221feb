"""What each training step tells the periods: MeDyate's channel norms, and whether the bank stayed finite.

`StepWatch` is the part of `trady_peft.periods.Periods` that follows the optimizer steps: MeDyate's
gradient hook records a backward's channel norms provisionally, and they count only once the
optimizer step they feed has happened (a step a ``GradScaler`` skips is skipped here too); every
step notes whether the bank is still finite, so that a diverged period is refused, with the step
named, before it is folded or saved (`StepWatch.check_finite`).
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..compat import has_zero_master
from ..core.optim import forget_optimizer_state
from ..selection.statistics import ChannelNormStatistics, channel_norms

logger = logging.getLogger(__name__)


class StepWatch:
    """Follows the optimizer steps of the adapters of ``periods`` (a `Periods`)."""

    def __init__(self, periods):
        self.periods = periods
        self._norm_hooks: dict = {}
        # Per adapter: whether a torch optimizer step was seen updating its bank (MeDyate's norms are
        # then committed at each step, else at each backward), the optimizer steps of the current
        # period, and (on the bank's device) the first of them after which the bank was not finite.
        self._stepped: set[str] = set()
        self._steps: dict[str, int] = {}
        self._first_nonfinite: dict[str, torch.Tensor] = {}
        self._warned_nonfinite: set[str] = set()
        _LIVE.add(self)

    def __setstate__(self, state: dict) -> None:  # a copy (copy.deepcopy, pickle) is told about steps too
        self.__dict__.update(state)
        _LIVE.add(self)

    def watch_norms(self, name: str) -> None:
        """Record MeDyate's channel norms of adapter ``name`` at every backward (a hook on its bank)."""
        bank = self.periods.host.trady_bank[name]
        trains = bank.weight.requires_grad
        bank.weight.requires_grad_(True)  # a tensor hook needs a tensor that requires grad
        self._norm_hooks[name] = bank.weight.register_hook(lambda grad, name=name: self._record_norms(name, grad))
        bank.weight.requires_grad_(trains)

    def bank_replaced(self, name: str) -> None:
        """Hook adapter ``name``'s new bank parameter if the old one was hooked (the hook went with it)."""
        if self._norm_hooks.pop(name, None) is not None:
            self.watch_norms(name)

    def forget(self, name: str) -> None:
        """Stop following adapter ``name`` (it is being deleted)."""
        hook = self._norm_hooks.pop(name, None)
        if hook is not None:
            hook.remove()

    def new_period(self, name: str) -> None:
        """Start counting adapter ``name``'s steps afresh (a period change)."""
        self._steps[name] = 0
        self._first_nonfinite.pop(name, None)

    def _record_norms(self, name: str, grad: torch.Tensor) -> None:
        """MeDyate's tensor hook on the bank: record this backward's channel norms provisionally.

        They count once the optimizer step they feed has happened (`after_optimizer_step`), so that
        a step a GradScaler skips (or a loop skips on a non-finite loss) is skipped here too; a
        bank no torch optimizer step was seen updating (before the first step, DeepSpeed, a manual
        update) commits each backward whose norms are all finite.
        """
        statistics = self.periods.states[name].statistics
        bank = self.periods.host.trady_bank[name].weight
        if bank.grad is None and statistics.pending_steps and not has_zero_master(bank):
            # The first backward after zero_grad: what earlier backwards recorded fed no step.
            statistics.discard()
            self._warn_dropped(name)
        for layer_name, layer in self.periods.host.trady_layers(name):
            view = layer.trady_delta[name]
            if view.count:
                seg = grad.narrow(0, view.offset, view.numel).view(view.count, -1).detach()
                statistics.add(layer_name, layer.trady_idx[name], channel_norms(seg))
        statistics.step()
        if name not in self._stepped:
            self._commit_norms(name, statistics)

    def _commit_norms(self, name: str, statistics: ChannelNormStatistics) -> None:
        if not statistics.commit():
            self._warn_dropped(name)

    def _warn_dropped(self, name: str) -> None:
        if name in self._warned_nonfinite:
            return
        self._warned_nonfinite.add(name)
        logger.warning(
            "TraDy adapter %r (strategy=%r): a training step was skipped or its gradient was not finite (e.g. an "
            "overflow GradScaler skipped); its channel norms were left out of the statistics the next draw uses. "
            "Shown once.",
            name,
            self.periods.host.peft_config[name].strategy,
        )

    def before_optimizer_step(self, optimizer) -> None:
        """Called before every torch optimizer step: drop ``optimizer``'s state of a bank that step_memory
        resized since (`trady_peft.periods.Periods.resize_bank`, e.g. when a loaded run re-measures its
        step before this optimizer, loaded from a checkpoint, was seen stepping)."""
        params = {id(p) for g in getattr(optimizer, "param_groups", None) or () for p in g["params"]}
        for module in getattr(self.periods.host, "trady_bank", {}).values():
            if id(module.weight) in params:
                forget_optimizer_state(optimizer, module.weight)

    def after_optimizer_step(self, optimizer) -> None:
        """Called after every torch optimizer step: for each adapter whose bank ``optimizer`` updates,
        commit MeDyate's norms of the step, count the step, and note when the bank stopped being finite;
        then, in a distributed run, agree on the prices of larger inputs met (`reprice_agreed`)."""
        groups = getattr(optimizer, "param_groups", None) or ()
        stepped = False
        for name, module in getattr(self.periods.host, "trady_bank", {}).items():
            bank = module.weight
            if name not in self.periods.states or not any(p is bank for g in groups for p in g["params"]):
                continue
            stepped = True
            self._stepped.add(name)
            statistics = self.periods.states[name].statistics
            if statistics is not None:
                self._commit_norms(name, statistics)
            step = self._steps[name] = self._steps.get(name, 0) + 1
            with torch.no_grad():  # no synchronisation: read only when a refusal names the step
                first = self._first_nonfinite.get(name)
                if first is None:
                    first = torch.full((), -1, dtype=torch.long, device=bank.device)
                bad = ~torch.isfinite(bank).all()
                self._first_nonfinite[name] = torch.where(bad & (first < 0), step, first)
        if stepped:  # every process steps the optimizer that trains the bank
            self.periods.remember_optimizer(optimizer)
            self.periods.prices.reprice_agreed()
        else:
            self._refuse_a_foreign_optimizer(optimizer, groups)

    def _refuse_a_foreign_optimizer(self, optimizer, groups) -> None:
        """An optimizer that steps the TraDy layers' frozen base weights but not the bank was built
        before ``get_peft_model``: refuse it at its first step, not a period later."""
        host = self.periods.host
        if not any(bank.weight.requires_grad for bank in getattr(host, "trady_bank", {}).values()):
            return
        frozen = {id(layer.base_layer.weight) for _, layer in host.trady_layers()}
        if not any(id(p) in frozen and not p.requires_grad for g in groups for p in g["params"]):
            return
        raise ValueError(
            f"This {type(optimizer).__name__} steps the frozen base weights of the TraDy layers but not the "
            "adapter's trainable bank, so the adapter would never train: it was built before get_peft_model. "
            "Build the optimizer after get_peft_model, from model.parameters() (the parameters that require grad)."
        )

    def check_finite(self, name: str, what: str) -> None:
        """Refuse to let adapter ``name``'s bank be ``what`` (folded, saved) when it holds NaN or infinite
        values, naming the layers and the step; nothing is changed, so the store keeps its last good state."""
        bank = self.periods.host.trady_bank[name].weight
        if bank.numel() == 0 or bool(torch.isfinite(bank).all()):
            return
        named = [(n, layer.current_delta(name)) for n, layer in self.periods.host.trady_layers(name)]
        named = [(n, d) for n, d in named if d is not None]
        counts = torch.stack([(~torch.isfinite(d)).sum() for _, d in named]).tolist() if named else []
        bad = [(n, c) for (n, _), c in zip(named, counts) if c]
        first = self._first_nonfinite.get(name)
        step = int(first) if first is not None else -1
        when = f"first seen after optimizer step {step} of the period" if step > 0 else "the step is unknown"
        layers = ", ".join(f"{n!r} ({c} values)" for n, c in bad[:3])
        layers += f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise FloatingPointError(
            f"TraDy adapter {name!r}: the delta trained in period {self.periods.states[name].period} holds NaN or "
            f"infinite values in layer {layers or '(outside the installed layers)'} ({when}), so it cannot be {what}. "
            "Nothing was changed: the adapter's store keeps the last good state (the periods before). A step "
            "diverged: lower the learning rate, clip gradients (or train with torch.amp.GradScaler, which skips "
            "overflowing steps), and restart from the last adapter or checkpoint saved before (every saved file "
            "is finite)."
        )


#: Every live `StepWatch`, told about each torch optimizer step (`after_optimizer_step`).
_LIVE: weakref.WeakSet[StepWatch] = weakref.WeakSet()


def _before_any_optimizer_step(optimizer, args, kwargs) -> None:
    for watch in list(_LIVE):
        watch.before_optimizer_step(optimizer)


def _after_any_optimizer_step(optimizer, args, kwargs) -> None:
    for watch in list(_LIVE):
        watch.after_optimizer_step(optimizer)


register_optimizer_step_pre_hook(_before_any_optimizer_step)
register_optimizer_step_post_hook(_after_any_optimizer_step)
