"""Text classification under a memory budget: all-MiniLM-L6-v2 -> Rotten Tomatoes (fresh/rotten).

Real pretrained weights and real data, offline (see examples/offline_assets.py). TraDy trains
input channels of the top-K layers of the shipped ``bert`` importance table, redrawn every
epoch, plus the classifier head, with the Hugging Face Trainer: data as a ``datasets.Dataset``
(tokenized with ``map``, split with ``train_test_split``), accuracy from an offline ``evaluate``
metric as ``compute_metrics``, evaluated every epoch. Prints test accuracy before and after, and
the measured memory of one training step. Real-scale: ``--train-size 10000 --epochs 5``.
"""

from __future__ import annotations

import argparse

# torch, transformers and the data are imported in main(), after the arguments: `--help` is instant.


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="memory_budget: int (paper units) or bytes such as 4MiB; None: TraDy's default, a bank of the values "
        "LoRA r=8 would train on the same layers and as many bytes again for saved inputs."
        " A byte budget bounds everything the adapter adds to a training step: the bank parameter that holds "
        "the selected channels' trainable values, its gradient, its optimizer state, and the saved inputs of "
        "the selected channels.",
    )
    parser.add_argument("--train-size", type=int, default=2000, help="Rotten Tomatoes training reviews")
    parser.add_argument("--test-size", type=int, default=1000, help="test reviews")
    parser.add_argument("--max-length", type=int, default=64, help="tokens kept per review")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; TraDy redraws its channels every epoch")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate of the adapter's bank; None: trady_peft.recommended_learning_rate for its budget "
        "(the fresh classifier trains at 1e-2, trady_peft.create_optimizer)",
    )
    parser.add_argument(
        "--output-dir", default="runs/text_classification", help="Trainer output and the saved adapter"
    )
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from offline_assets import (
        MiniLMClassifier,
        budget_label,
        compute_accuracy,
        minilm_tokenizer,
        rotten_tomatoes,
        say,
        with_method_label,
    )
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    import trady_peft

    say("loading Rotten Tomatoes and the all-MiniLM-L6-v2 tokenizer")
    pairs = rotten_tomatoes(args.train_size + args.test_size, seed=0)
    raw = Dataset.from_dict({"text": [t for t, _ in pairs], "labels": [y for _, y in pairs]})
    tokenizer = minilm_tokenizer()

    def tokenize(batch):
        enc = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=args.max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    data = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    data.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    split = data.train_test_split(test_size=args.test_size, shuffle=False)  # already shuffled with seed 0
    train, test = split["train"], split["test"]

    say("loading all-MiniLM-L6-v2")
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(memory_budget=args.budget, modules_to_save=["classifier"])
    model = get_peft_model(MiniLMClassifier(), config)
    budget = budget_label(args.budget, model.peft_config["default"])
    # AdamW: the bank at the rate recommended for its size (or --lr), the fresh classifier at the head rate
    optimizer = trady_peft.create_optimizer(model, lr=args.lr)
    lr, head_lr = (g["lr"] for g in optimizer.param_groups)
    say(f"strategy {model.peft_config['default'].strategy!r}, AdamW learning rate {lr:.2g} (classifier {head_lr:.2g})")
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        run_name=f"TraDy ({budget})",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=lr,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
        remove_unused_columns=False,  # the dataset holds exactly the model's inputs
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=compute_accuracy(),
        optimizers=(optimizer, None),  # the Trainer adds its linear schedule
        callbacks=[trady_peft.TraDyCallback()],
    )

    with_method_label(trainer, f"TraDy ({budget})")
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    memory = trady_peft.measure_training_step(model.train(), train[: args.batch_size])
    model.save_pretrained(f"{args.output_dir}/adapter")
    summary, strategy = model.base_model.selection_summary(), model.peft_config["default"].strategy
    print(
        f"test accuracy: {before:.3f} (untrained head) -> {after:.3f} (TraDy {strategy}, {budget} budget, lr {lr:.2g})"
    )
    print(
        f"one training step keeps {memory.saved_activations / 2**20:.1f} MiB of activations for backward; "
        f"{summary['candidate_layers']} of {summary['layers']} layers (bert table), "
        f"{summary['touched_channels']} channels touched; adapter in {args.output_dir}/adapter"
    )
    return {"before": before, "after": after, "summary": summary}


if __name__ == "__main__":
    main()
