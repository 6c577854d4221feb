"""What a period does: prices, draws, redraws, and the moves from one period to the next.

* `lifecycle`: `Periods`, the tuner's component that owns every adapter's selection lifecycle,
  and `PeriodHost`, what it needs of the tuner;
* `prices`: `Prices`, what one channel costs (the shape probe, repricing for larger inputs);
* `steps`: `StepWatch`, what each optimizer step tells (MeDyate's norms, a finite bank).
"""

from .lifecycle import PeriodHost, Periods

__all__ = ["PeriodHost", "Periods"]
