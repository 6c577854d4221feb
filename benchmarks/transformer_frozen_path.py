"""Saved activations of one training step on a Llama-style (or GPT-2) model, by module type (issue 12).

Four methods, each measured by `trady_peft.measure_training_step` on a fresh model built from
config (fp32 unless --dtype, CPU): TraDy with the stock frozen path (``memory_saving_frozen_path=False``),
TraDy with the frozen-path twins but the stock LM head and loss (`trady_peft.frozen_path_loss`
undone), TraDy with all twins (the default: the frozen head's fused loss keeps no logits), and
peft LoRA r=8 on every linear layer. The fused loss shows in the top-level model's row
(``LlamaForCausalLM``/``GPT2LMHeadModel``: the loss runs in its forward).

    PYTHONPATH=. python benchmarks/transformer_frozen_path.py            # hidden 512, 6 layers, 8x256
    PYTHONPATH=. python benchmarks/transformer_frozen_path.py --seq 64   # smaller, faster
    PYTHONPATH=. python benchmarks/transformer_frozen_path.py --family gpt2  # intermediate 4 x hidden
    PYTHONPATH=. python benchmarks/transformer_frozen_path.py --dtype bfloat16  # a bf16 model
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import trady_peft
from trady_peft.frozen_path_loss import FrozenPathLMHead, restore_loss


def build(args):
    torch.manual_seed(0)
    if args.family == "gpt2":  # GELU "gelu_new" and dropout 0.1 on the frozen path
        config = GPT2Config(
            vocab_size=args.vocab,
            n_embd=args.hidden,
            n_layer=args.layers,
            n_head=args.heads,
            n_positions=max(args.seq, 64),
            use_cache=False,  # a cache would hold k and v outside autograd's saved tensors
        )
        return GPT2LMHeadModel(config).to(args.dtype).train()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
        use_cache=False,  # a cache would hold k and v outside autograd's saved tensors
    )
    return LlamaForCausalLM(config).to(args.dtype).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--channels", type=int, default=32, help="TraDy channels per layer (d-full-random)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}

    def trady(on: bool, fused_loss: bool = True, attention: bool = True):
        config = trady_peft.TraDyConfig(
            channels_per_layer=args.channels, strategy="d-full-random", memory_saving_frozen_path=on
        )
        model = get_peft_model(build(args), config)
        if on and not fused_loss:
            restore_loss(model)
            for module in model.modules():
                if type(module) is FrozenPathLMHead:
                    module.__class__ = torch.nn.Linear
        if on and not attention:  # the attention twin undone (it recomputes the block in backward)
            for module in model.modules():
                if "_trady_original" in type(module).__dict__ and "Attention" in type(module).__name__:
                    module.__class__ = type(module)._trady_original
        return model

    methods = {
        "TraDy, stock path": lambda: trady(False),
        "TraDy, twins, stock head": lambda: trady(True, fused_loss=False),
        "TraDy, twins, stock attn": lambda: trady(True, attention=False),
        "TraDy, all twins": lambda: trady(True),
        "LoRA r=8 all-linear": lambda: get_peft_model(build(args), LoraConfig(r=8, target_modules="all-linear")),
    }
    results = {}
    for name, make in methods.items():
        model = make().train()
        start = time.perf_counter()
        results[name] = trady_peft.measure_training_step(model, inputs)
        print(f"# {name}: step {time.perf_counter() - start:.1f} s, loss {results[name].loss:.4f}")

    def row_key(kind: str) -> str:  # a twin counts with the stock class it replaces
        return "Linear" if kind == "FrozenPathLMHead" else kind.removeprefix("FrozenPath")

    kinds = sorted({row_key(k) for mem in results.values() for k in mem.saved_by_module_type})
    mib = 2**20
    dtype_name = str(args.dtype).removeprefix("torch.")
    inter = args.intermediate if args.family == "llama" else 4 * args.hidden
    print(
        f"\n{args.family}: hidden {args.hidden}, intermediate {inter}, {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, {dtype_name}, CPU. Saved activations, MiB.\n"
    )
    header = f"| {'module type':<22} | " + " | ".join(f"{n:>24}" for n in results) + " |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for kind in kinds:
        cells = []
        for mem in results.values():
            nbytes = sum(v for k, v in mem.saved_by_module_type.items() if row_key(k) == kind)
            cells.append(f"{nbytes / mib:>24.1f}")
        print(f"| {kind:<22} | " + " | ".join(cells) + " |")
    print(f"| {'total':<22} | " + " | ".join(f"{m.saved_activations / mib:>24.1f}" for m in results.values()) + " |")


if __name__ == "__main__":
    main()
