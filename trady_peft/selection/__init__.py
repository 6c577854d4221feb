"""Where channels are chosen.

* `strategies`: the paper's selection strategies (TraDy, S-Top-K, D-/S-Full Random, D-/S-Det RGN,
  MeDyate): candidate layers, their prices and statistics -> a period's channels;
* `draws`: the random and greedy draws every strategy is built from;
* `state`: one adapter's selection state, what a checkpoint carries of it;
* `statistics`: the gradient statistics of the gradient-informed strategies;
* `importance`: layer rankings per architecture family, and the built-in `tables/`.
"""
