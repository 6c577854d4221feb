"""Tests of `trady_peft.memory`: the budget, measurement, the backprop stop and the frozen path."""
