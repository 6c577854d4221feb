"""Step time of the attention twin: TraDy with and without it, and LoRA, interleaved.

The attention twin recomputes each attention block in backward, so a TraDy step runs one more
attention forward per layer. This times forward + backward of one batch for three methods on a
Llama-style (or GPT-2) model built from config, interleaved step by step (so load on the machine
hits all three alike), and prints the median of ``--steps`` steps after ``--warmup`` steps:

* TraDy with every frozen-path twin (the default),
* the same model with its attention twins swapped back to the stock classes,
* peft LoRA r=8 on every linear layer.

    PYTHONPATH=. python benchmarks/attention_twin_step_time.py                  # hidden 256, 4 layers, 4x128
    PYTHONPATH=. python benchmarks/attention_twin_step_time.py --family gpt2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import trady_peft


def build(args):
    torch.manual_seed(0)
    if args.family == "gpt2":
        config = GPT2Config(
            vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, use_cache=False
        )
        return GPT2LMHeadModel(config).train()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        use_cache=False,
    )
    return LlamaForCausalLM(config).train()


def set_attention_twins(model, on: bool, originals: dict) -> None:
    """Swap the attention twins of ``model`` to their stock classes (``on=False``) and back."""
    for module, (stock, twin) in originals.items():
        module.__class__ = twin if on else stock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    trady = get_peft_model(
        build(args), trady_peft.TraDyConfig(channels_per_layer=args.channels, strategy="d-full-random")
    ).train()
    originals = {
        m: (type(m)._trady_original, type(m))
        for m in trady.modules()
        if "_trady_original" in type(m).__dict__ and "Attention" in type(m).__name__
    }
    lora = get_peft_model(build(args), LoraConfig(r=8, target_modules="all-linear")).train()

    def step(model) -> float:
        start = time.perf_counter()
        model(**inputs).loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    def trady_with(on: bool):
        def run() -> float:
            set_attention_twins(trady, on, originals)
            return step(trady)

        return run

    methods = {
        "TraDy, all twins": trady_with(True),
        "TraDy, stock attention": trady_with(False),
        "LoRA r=8 all-linear": lambda: step(lora),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(args.warmup + args.steps):
        for name, run in methods.items():
            t = run()
            if i >= args.warmup:
                times[name].append(t)
    print(
        f"{args.family}: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
        f"{len(originals)} attention twins, fp32 CPU, {torch.get_num_threads()} threads. "
        f"Median of {args.steps} interleaved steps (forward + backward) after {args.warmup} warm-up steps."
    )
    lora_median = statistics.median(times["LoRA r=8 all-linear"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:<24} {median * 1e3:8.1f} ms   {median / lora_median:5.2f} x LoRA")


if __name__ == "__main__":
    main()
