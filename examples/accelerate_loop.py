"""TraDy in a plain Accelerate loop (no Trainer): EfficientNet-Lite0 -> Fashion-MNIST under a budget.

Shows the three calls a custom loop needs: ``get_peft_model`` with a ``memory_budget``, the first
forward pass (which probes layer sizes and draws the first channels), and
``trady_peft.next_period`` at each new epoch. Runs offline on a CPU with its defaults; launch it
with ``accelerate launch examples/accelerate_loop.py`` for several processes.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from peft import get_peft_model
from quickstart import Classifier, FashionMNIST, accuracy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import trady_peft


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="2MiB", help="memory_budget: an int (paper units) or bytes, e.g. 2MiB")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(memory_budget=args.budget, modules_to_save=["_fc"])
    model = get_peft_model(Classifier(), config)
    train = FashionMNIST("train", args.train_size, args.image_size)
    test = FashionMNIST("test", args.test_size, args.image_size, seed=1)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for epoch in range(args.epochs):
        if epoch:
            trady_peft.next_period(model, optimizer)  # fold, redraw, reset re-targeted moments
        model.train()
        for batch in tqdm(loader, desc=f"epoch {epoch}", disable=not accelerator.is_main_process):
            loss = model(**batch)["loss"]  # the very first call probes sizes and draws channels
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        summary = trady_peft.find_tuner(model).selection_summary()
        accelerator.print(
            f"epoch {epoch}: loss {loss.item():.3f}, {summary['selected_channels']} channels, "
            f"{summary['selected_cost']:,} of {summary['budget']:,} bytes of budget used"
        )
    result = {"accuracy": accuracy(accelerator.unwrap_model(model), test), "summary": summary}
    accelerator.print(f"test accuracy: {result['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
