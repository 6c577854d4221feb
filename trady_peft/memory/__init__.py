"""What a training step keeps in memory, and how it is counted.

* `budget`: per-channel prices, the budget and its units;
* `measure`: what one training step really keeps (saved tensors, parameters, gradients, optimizer state);
* `step`: under ``step_memory``, what the rest of a training step keeps besides the adapter, measured;
* `backprop`: backprop stops at the lowest trained block;
* `frozen_path`: frozen modules swapped for twins that keep only what the input gradient needs.
"""
