"""Step time of the bank's backward: one ``narrow`` view per layer against one shared split.

Two measurements, on CPU, single thread (``torch.set_num_threads(1)``), median of ``--steps``:

1. micro: a flat fp32 bank of ``--bank`` values read by ``--views`` equal segments, each through
   its own ``narrow`` view (the previous `trady_peft.core.bank.DeltaBank` reading) or all from one
   ``split_with_sizes``; backward time of ``sum(segment.sum())``.
2. model: a config-built Llama (``--layers`` blocks, 7 TraDy layers each) trained one step
   (forward, backward, AdamW step) on one ``--seq``-token block, with LoRA r=8 and with TraDy at
   ``--budget`` values (``memory_budget`` in values), TraDy's layers reading the bank through
   `DeltaBank.segment` (split) or through the previous per-layer ``narrow``.

    PYTHONPATH=. python benchmarks/bank_split_step_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import trady_peft
from trady_peft.core.bank import DeltaBank


def _median_time(fn, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def micro(bank_numel: int, views: int, steps: int) -> dict[str, float]:
    bank = torch.nn.Parameter(torch.zeros(bank_numel))
    size = bank_numel // views

    def narrow():
        bank.grad = None
        sum(bank.narrow(0, i * size, size).sum() for i in range(views)).backward()

    def split():
        bank.grad = None
        pieces = torch.split_with_sizes(bank, [size] * views + [bank_numel - size * views])
        sum(p.sum() for p in pieces[:views]).backward()

    return {"narrow": _median_time(narrow, steps), "split": _median_time(split, steps)}


@contextmanager
def narrow_segments():
    """The previous reading: each layer's own ``narrow`` view of the bank."""
    original = DeltaBank.segment
    DeltaBank.segment = lambda self, offset, numel: self.weight.narrow(0, offset, numel)
    try:
        yield
    finally:
        DeltaBank.segment = original


def _llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def model_steps(layers: int, seq: int, budget: int, steps: int) -> dict[str, float]:
    ids = torch.randint(0, 2000, (1, seq), generator=torch.Generator().manual_seed(0))

    def stepper(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    lora = get_peft_model(_llama(layers), LoraConfig(r=8, target_modules="all-linear"))
    trady = get_peft_model(_llama(layers), trady_peft.TraDyConfig(memory_budget=budget, strategy="d-full-random"))
    tuner = trady.base_model
    n_layers = len(tuner.trady_layers())
    bank = tuner.trady_bank["default"].weight.numel()
    out = {"trady_layers": n_layers, "bank_values": bank, "lora": _median_time(stepper(lora), steps)}
    out["trady_split"] = _median_time(stepper(trady), steps)
    with narrow_segments():
        out["trady_narrow"] = _median_time(stepper(trady), steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=10_000_000)
    parser.add_argument("--views", type=int, default=210)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--budget", type=int, default=2_000_000, help="TraDy memory_budget, in values")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    m = micro(args.bank, args.views, args.steps)
    print(
        f"micro: bank {args.bank:,} values, {args.views} views: "
        f"backward narrow {m['narrow']:.3f} s, split {m['split']:.3f} s"
    )
    r = model_steps(args.layers, args.seq, args.budget, args.steps)
    print(
        f"model: llama {args.layers} blocks, {r['trady_layers']} TraDy layers, bank {r['bank_values']:,} values, "
        f"seq {args.seq}: step LoRA r=8 {r['lora']:.3f} s, TraDy split {r['trady_split']:.3f} s, "
        f"TraDy narrow (before) {r['trady_narrow']:.3f} s"
    )


if __name__ == "__main__":
    main()
