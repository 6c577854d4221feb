"""The channel-sparse layer and what it stands on.

* `layer`: `TraDyLayer`, a frozen base layer plus deltas on a few input channels;
* `bank`: each adapter's trainable values, one flat parameter shared out among its layers;
* `geometry`: how a layer's weight is cut into input channels;
* `autograd`: the autograd functions that decide what a step keeps;
* `quantized`: quantized base layers;
* `targets`: which layers are wrapped by default;
* `optim`: what a redraw does to the optimizer;
* `distributed`, `collectives`: the bank under FSDP2/ZeRO, and the few collectives TraDy runs.
"""
