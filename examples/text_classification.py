"""Text classification under a memory budget: all-MiniLM-L6-v2 -> Rotten Tomatoes (fresh/rotten).

Real pretrained weights and real data, offline (see examples/offline_assets.py). TraDy trains
input channels of the top-K layers of the shipped ``bert`` importance table, redrawn every
epoch, plus the classifier head, with the Hugging Face Trainer. Prints test accuracy before and
after, and the measured memory of one training step. Real-scale: ``--train-size 10000 --epochs 5``.
"""

from __future__ import annotations

import argparse

import torch
from offline_assets import MiniLMClassifier, minilm_tokenizer, rotten_tomatoes
from peft import get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import trady_peft


class Snippets(Dataset):
    def __init__(self, pairs, tokenizer, max_length: int):
        enc = tokenizer(
            [t for t, _ in pairs], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.tensor([y for _, y in pairs])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def accuracy(model, data: Snippets) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask)["logits"]
    return (logits.argmax(-1) == data.labels).float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="4MiB", help="memory_budget: int (paper units) or bytes such as 4MiB")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="runs/text_classification")
    args = parser.parse_args(argv)

    pairs = rotten_tomatoes(args.train_size + args.test_size, seed=0)
    tokenizer = minilm_tokenizer()
    train = Snippets(pairs[: args.train_size], tokenizer, args.max_length)
    test = Snippets(pairs[args.train_size :], tokenizer, args.max_length)

    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(memory_budget=args.budget, modules_to_save=["classifier"])
    model = get_peft_model(MiniLMClassifier(), config)
    before = accuracy(model, test)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
    )
    Trainer(model=model, args=training_args, train_dataset=train, callbacks=[trady_peft.TraDyCallback()]).train()
    after = accuracy(model, test)
    batch = {k: v[: args.batch_size] for k, v in vars(train).items()}
    memory = trady_peft.measure_training_step(model.train(), batch)
    model.save_pretrained(f"{args.output_dir}/adapter")
    summary = model.base_model.selection_summary()
    print(f"test accuracy: {before:.3f} (untrained head) -> {after:.3f} (TraDy, {args.budget} budget)")
    print(
        f"one training step keeps {memory.saved_activations / 2**20:.1f} MiB of activations for backward; "
        f"{summary['candidate_layers']} of {summary['layers']} layers (bert table), "
        f"{summary['touched_channels']} channels touched; adapter in {args.output_dir}/adapter"
    )
    return {"before": before, "after": after, "summary": summary}


if __name__ == "__main__":
    main()
