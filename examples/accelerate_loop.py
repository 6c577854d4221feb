"""TraDy in a plain Accelerate loop (no Trainer): EfficientNet-Lite0 -> Fashion-MNIST under a budget.

Shows the three calls a custom loop needs: ``get_peft_model`` with a ``memory_budget``, the first
forward pass (which probes layer sizes and draws the first channels), and
``trady_peft.next_period`` at each new epoch. Runs offline on a CPU with its defaults; launch it
with ``accelerate launch examples/accelerate_loop.py`` for several processes.
"""

from __future__ import annotations

import argparse

# torch, accelerate and the data are imported in main(), after the arguments: `--help` is instant.


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="memory_budget: an int (paper units) or bytes, e.g. 2MiB; None: TraDy's default, a bank of the values "
        "LoRA r=8 would train on the same layers and as many bytes again for saved inputs."
        " A byte budget bounds everything the adapter adds to a training step: the bank parameter that holds "
        "the selected channels' trainable values, its gradient, its optimizer state, and the saved inputs of "
        "the selected channels.",
    )
    parser.add_argument(
        "--strategy",
        default="trady",
        help="TraDyConfig strategy, e.g. trady, d-full-random, medyate, or d-det-rgn (which scores channels "
        "on the full gradient of the first training batch, then at each new epoch, chunk by chunk within the budget)",
    )
    parser.add_argument("--train-size", type=int, default=1000, help="Fashion-MNIST training images")
    parser.add_argument("--test-size", type=int, default=500, help="test images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the resized images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; each after the first starts a period")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    args = parser.parse_args(argv)

    import trady_peft  # first: it keeps the quantization backends' import logs out (evaluate loads them)

    # isort: split
    import evaluate
    import torch
    from accelerate import Accelerator
    from offline_assets import ACCURACY, Classifier, budget_label, fashion_mnist, say
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(memory_budget=args.budget, strategy=args.strategy, modules_to_save=["_fc"])
    say("loading EfficientNet-Lite0 and Fashion-MNIST")
    model = get_peft_model(Classifier(), config)
    budget = budget_label(args.budget, model.peft_config["default"])
    train = fashion_mnist("train", args.train_size, args.image_size)
    test = fashion_mnist("test", args.test_size, args.image_size, seed=1)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test, batch_size=128)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, test_loader)

    for epoch in range(args.epochs):
        if epoch:
            # fold, redraw, reset re-targeted moments (batches: for the strategies that score channels)
            trady_peft.next_period(model, optimizer, batches=loader)
        model.train()
        for batch in tqdm(loader, desc=f"TraDy ({budget}), epoch {epoch}", disable=not accelerator.is_main_process):
            loss = model(**batch)["loss"]  # the very first call probes sizes (d-det-rgn: scores) and draws
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        summary = trady_peft.find_tuner(model).selection_summary()
        accelerator.print(
            f"epoch {epoch}: loss {loss.item():.3f}, {summary['selected_channels']} channels, "
            f"{summary['selected_cost']:,} of {summary['budget']:,} bytes of budget used"
        )
    metric = evaluate.load(str(ACCURACY))  # offline: a local metric module
    model.eval()
    for batch in tqdm(test_loader, desc="evaluating: TraDy", disable=not accelerator.is_main_process):
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"])["logits"]
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        metric.add_batch(predictions=predictions, references=labels)
    result = {"accuracy": metric.compute()["accuracy"], "summary": summary}
    accelerator.print(f"test accuracy: {result['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
